"""The ``vtprune`` command: ``vtprune methods`` and ``vtprune compare``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import vtprune
from vtprune.registry import get_pruner_class

SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "eval" / "assets" / "sample.png"


def _sample_image() -> Path:
    from importlib.resources import files

    packaged = Path(str(files("vtprune.eval") / "assets" / "sample.png"))
    return packaged if packaged.is_file() else SAMPLE_IMAGE


def cmd_methods(args: argparse.Namespace) -> int:
    rows = []
    for name in vtprune.list_methods():
        cls = get_pruner_class(name)
        rows.append((name, cls.status, ", ".join(cls.points), "yes" if cls.flash_compatible else "no",
                     cls.needs_training, cls.paper))
    header = ("method", "status", "insertion points", "FA-compatible", "training", "paper")
    _print_table(header, rows)
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def load_model(model_dir: str | None, device: str, dtype: str, attn: str) -> tuple[Any, Any, str]:
    """Load a VLM and its processor from a local directory, or build the tiny built-in model when none is given."""
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if model_dir is None:
        from vtprune.eval.tiny import tiny_llava, tiny_llava_processor

        model = tiny_llava("llava15", attn_implementation=attn).to(device=device, dtype=torch_dtype)
        note = (
            "built-in tiny random-weight LLaVA (LLaVA-1.5 token geometry, 576 visual tokens); its answers are "
            "meaningless until trained reference checkpoints ship. Pass --model DIR for a real model."
        )
        return model, tiny_llava_processor(model.config), note
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(model_dir)
    if not path.is_dir():
        raise SystemExit(f"--model {model_dir}: no such directory. Pass a local checkpoint directory.")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor, f"loaded {path}"


def build_inputs(processor: Any, image_path: Path, question: str, device: str) -> dict[str, Any]:
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = f"USER: {processor.image_token} {question} ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in inputs.items()}


def cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from vtprune.eval.measure import answer, measure_prefill

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        get_pruner_class(method)  # fail fast, with "did you mean", before loading anything
    model, processor, note = load_model(args.model, args.device, args.dtype, args.attn)
    print(f"model: {note}")
    image = Path(args.image) if args.image else _sample_image()
    print(f"image: {image}\nquestion: {args.question}\ndevice: {args.device} ({args.dtype}, {args.attn})\n")
    inputs = build_inputs(processor, image, args.question, args.device)
    visual_in = int(torch.isin(inputs["input_ids"], torch.tensor(model.config.image_token_id)).sum())

    results = []
    base = measure_prefill(model, inputs, args.repeats)
    results.append({"method": "unpruned", "keep": 1.0, "visual_in": visual_in, "K_in": visual_in,
                    "K_avg": float(visual_in), "answer": answer(model, processor, inputs, args.max_new_tokens),
                    **base})
    for method in methods:
        options = {"where": args.where} if args.where else {}
        vtprune.wrap(model, method, keep=args.keep, budget=args.budget, **options)
        try:
            measured = measure_prefill(model, inputs, args.repeats)
            stats = model.vtprune.last_stats["samples"][0]
            reply = answer(model, processor, inputs, args.max_new_tokens)
        finally:
            vtprune.unwrap(model)
        results.append({"method": method, "keep": args.keep, "visual_in": visual_in, "K_in": stats["K_in"],
                        "K_avg": stats["K_avg"], "answer": reply, **measured})

    rows = []
    for r in results:
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "n/a (CPU)"
        rows.append((r["method"], f"{r['keep']:.2f}", f"{r['visual_in']} -> {r['K_in']}", f"{r['K_avg']:.1f}",
                     f"{1000 * r['prefill_s']:.2f}", f"{base['prefill_s'] / r['prefill_s']:.2f}x", peak,
                     f"{r['kv_bytes'] / 2**20:.2f}", repr(r["answer"])))
    _print_table(("method", "keep", "visual tokens in -> LLM", "K_avg", "prefill ms", "speed-up", "peak MiB",
                  "KV MiB", "answer"), rows)
    if args.device == "cpu":
        print("\nTimes are CPU wall times of this machine: indicative only, not GPU speed-ups.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the pruning methods and their status").set_defaults(run=cmd_methods)

    compare = sub.add_parser("compare", help="answer, tokens, time and memory per method against the unpruned model")
    compare.add_argument("--model", help="local checkpoint directory (default: a tiny built-in model)")
    compare.add_argument("--image", help="image file (default: the sample image shipped with vtprune)")
    compare.add_argument("--question", default="what is the colour of the circle ?")
    compare.add_argument("--methods", default="uniform,random", help="comma-separated method names")
    compare.add_argument("--keep", type=float, default=0.11, help="fraction of visual tokens kept, in (0, 1]")
    compare.add_argument("--budget", default="input", choices=["input", "average"])
    compare.add_argument("--where", help="insertion point for methods that take one: encoder|projector|llm:K")
    compare.add_argument("--device", default="cpu")
    compare.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    compare.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    compare.add_argument("--max-new-tokens", type=int, default=8)
    compare.add_argument("--repeats", type=int, default=3, help="timed prefill repeats (median reported)")
    compare.add_argument("--json", help="also write the results to this JSON file")
    compare.set_defaults(run=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:
        print(f"vtprune: error: {error}", file=sys.stderr)
        return 2
