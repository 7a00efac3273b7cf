"""Ask a VLM about an image or a video, pruned by any vtprune method, next to the unpruned model.

    pip install -e '.[demo]'                    # from the repository: gradio, and decord for videos
    python demo/app.py --model DIR              # a local transformers VLM; no --model: the LLaVA reference checkpoint

The page shows both answers, the visual tokens the method kept drawn over the image as the model saw it (dropped
ones dimmed), and the measured prefill time, decode time per token, peak GPU memory and KV cache of the pruned and
the unpruned model.
Everything it shows comes from :func:`compare`, which works without gradio (and is what the tests run). The demo is
not part of the installed package; it runs from the repository.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import vtprune
from vtprune.cli import load_model, media_inputs
from vtprune.eval.measure import measure_setting

# Dropped tokens keep this fraction of their brightness in the overlay.
DIMMED = 0.25


@dataclass
class DemoResult:
    """What the page shows for one question."""

    answers: dict[str, str]  # "unpruned" and the method's name -> answer
    rows: list[dict[str, Any]]  # per setting: visual tokens in / entering the LLM, prefill ms, speed-up, memory
    overlay: Image.Image | None  # kept tokens over the image as the model saw it; None where there is no grid
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The measurements as a Markdown table."""
        lines = ["| setting | visual tokens | K_avg | prefill | speed-up | decode per token | speed-up | "
                 "peak GPU memory | KV cache |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            peak = f"{r['peak_bytes'] / 2**20:,.0f} MiB" if r["peak_bytes"] is not None else "n/a (CPU)"
            lines.append(f"| {r['setting']} | {r['visual_in']} → {r['K_in']} | {r['K_avg']:.1f} | "
                         f"{1000 * r['prefill_s']:.1f} ms | {r['speedup']:.2f}× | {1000 * r['decode_s']:.2f} ms | "
                         f"{r['decode_speedup']:.2f}× | {peak} | "
                         f"{r['kv_bytes'] / 2**20:.2f} MiB |")
        return "\n".join(lines)


def read_video(path: str | Path, num_frames: int = 8) -> list[Image.Image]:
    """``num_frames`` frames spread evenly over a video file (decord)."""
    try:
        import decord
    except ImportError as error:
        raise ImportError("Reading videos needs decord: pip install 'vtprune[video]'.") from error
    reader = decord.VideoReader(str(path))
    count = min(num_frames, len(reader))
    if count == 0:
        raise ValueError(f"{path}: the video has no frames.")
    picks = [round((i + 0.5) * len(reader) / count - 0.5) for i in range(count)]
    return [Image.fromarray(frame) for frame in reader.get_batch(picks).asnumpy()]


def seen_image(processor: Any, inputs: dict[str, torch.Tensor], image: Image.Image) -> Image.Image:
    """The image as the vision tower got it (resized and cropped), where the inputs hold it as one (3, H, W) image;
    otherwise the original."""
    pixels = inputs.get("pixel_values")
    processing = getattr(processor, "image_processor", None)
    if pixels is None or pixels.dim() != 4 or processing is None:
        return image
    mean = torch.tensor(getattr(processing, "image_mean", [0.0, 0.0, 0.0]))[:, None, None]
    std = torch.tensor(getattr(processing, "image_std", [1.0, 1.0, 1.0]))[:, None, None]
    restored = (pixels[0].float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((restored.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def kept_overlay(image: Image.Image, kept: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """``image`` with the cells of a (rows, cols) token grid that are not in ``kept`` (raster indices) dimmed."""
    rows, cols = grid
    mask = torch.full((rows * cols,), DIMMED)
    mask[kept.cpu()] = 1.0
    cells = Image.fromarray((mask.view(rows, cols).numpy() * 255).astype("uint8"), mode="L")
    shade = cells.resize(image.size, Image.NEAREST)
    black = Image.new("RGB", image.size)
    return Image.composite(image.convert("RGB"), black, shade)


def compare(model: Any, processor: Any, question: str, method: str, keep: float, *, image: Image.Image | None = None,
            frames: list[Image.Image] | None = None, budget: str = "input", repeats: int = 3,
            max_new_tokens: int = 16) -> DemoResult:
    """Answer ``question`` about an image or a video with the unpruned model and with ``method`` at ``keep``, and
    measure both. The model is left unwrapped."""
    if vtprune.is_wrapped(model):
        raise ValueError("compare() needs the unwrapped model; call vtprune.unwrap(model) first.")
    device = str(next(model.parameters()).device)
    inputs = media_inputs(processor, question, device, image=image, frames=frames)
    base = measure_setting(model, processor, inputs, repeats, max_new_tokens)
    vtprune.wrap(model, method, keep=keep, budget=budget)
    try:
        pruned = measure_setting(model, processor, inputs, repeats, max_new_tokens)
        stats = model.vtprune.engine.last_stats
        sample = model.vtprune.last_stats["samples"][0]
    finally:
        vtprune.unwrap(model)
    answers = {"unpruned": base["answer"], method: pruned["answer"]}
    # The prunable visual tokens, as the adapter counted them (layout tokens such as row newlines left out).
    visual_in = sample["visual_tokens"]
    rows = [
        {"setting": "unpruned", "visual_in": visual_in, "K_in": visual_in, "K_avg": float(visual_in), "speedup": 1.0,
         "decode_speedup": 1.0, **base},
        {"setting": f"{method} keep={keep:g} ({budget})", "visual_in": visual_in, "K_in": sample["K_in"],
         "K_avg": sample["K_avg"], "speedup": base["prefill_s"] / pruned["prefill_s"],
         "decode_speedup": base["decode_s"] / pruned["decode_s"], **pruned},
    ]
    notes = []
    if device == "cpu":
        notes.append("CPU wall times: indicative only, not GPU speed-ups.")
    overlay = None
    grid = stats.image_grid[0] if stats.image_grid else None
    if image is None:
        notes.append("The overlay is drawn for images; this was a video.")
    elif grid is None or not stats.stages:
        notes.append("This model's image has no single token grid (tiles or a packed sequence): no overlay.")
    else:
        # The tokens that entered the LLM: the last stage before it, or the first in-LLM stage's survivors.
        kept = stats.stages[0].kept[0]
        overlay = kept_overlay(seen_image(processor, inputs, image), kept, grid)
        if stats.stages[0].point.kind in ("llm", "decode"):
            notes.append(f"The overlay shows the tokens kept at {stats.stages[0].point.kind} layer "
                         f"{stats.stages[0].layer}.")
    return DemoResult(answers, rows, overlay, notes)


def build_ui(model: Any, processor: Any, note: str) -> Any:
    """The gradio page around :func:`compare`."""
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError("The demo page needs gradio: pip install 'vtprune[demo]'.") from error

    def run(image, video, question, method, keep, budget):
        if (image is None) == (video is None):
            raise gr.Error("Give either an image or a video.")
        frames = read_video(video) if video is not None else None
        result = compare(model, processor, question, method, float(keep), image=image, frames=frames,
                         budget=budget)
        answers = "\n".join(f"**{name}**: {text}" for name, text in result.answers.items())
        return answers, result.overlay, result.table() + "\n\n" + "\n".join(result.notes)

    with gr.Blocks(title="vtprune") as page:
        gr.Markdown(f"# vtprune\n{note}")
        with gr.Row():
            image = gr.Image(type="pil", label="image")
            video = gr.Video(label="or a video")
        question = gr.Textbox(value="what colour is the cross ?", label="question")
        with gr.Row():
            method = gr.Dropdown(vtprune.list_methods(), value="uniform", label="method")
            keep = gr.Slider(0.02, 1.0, value=0.11, step=0.01, label="keep")
            budget = gr.Radio(["input", "average"], value="input", label="budget")
        go = gr.Button("Run")
        answers = gr.Markdown()
        overlay = gr.Image(label="kept visual tokens (dropped ones dimmed)")
        table = gr.Markdown()
        go.click(run, [image, video, question, method, keep, budget], [answers, overlay, table])
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local checkpoint directory (default: the LLaVA reference checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    model, processor, note = load_model(args.model, args.device, args.dtype, args.attn)
    build_ui(model, processor, note).launch(server_port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
