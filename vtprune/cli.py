"""The ``vtprune`` command: ``vtprune methods`` and ``vtprune compare``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import vtprune
from vtprune.registry import get_pruner_class

REPO = Path(__file__).resolve().parent.parent
SAMPLE_IMAGE = REPO / "eval" / "assets" / "sample.png"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "llava"


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
    if model_dir is None and DEFAULT_CHECKPOINT.is_dir():
        model_dir = str(DEFAULT_CHECKPOINT)
    if model_dir is None:
        from vtprune.eval.tiny import tiny_llava, tiny_llava_processor

        model = tiny_llava("llava15", attn_implementation=attn).to(device=device, dtype=torch_dtype)
        note = (
            "built-in tiny random-weight LLaVA (LLaVA-1.5 token geometry, 576 visual tokens; the reference "
            "checkpoints are not in this install): its answers are meaningless. Pass --model DIR for a real model."
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

    return media_inputs(processor, question, device, image=Image.open(image_path).convert("RGB"))


def media_inputs(processor: Any, question: str, device: str, image: Any = None, frames: list | None = None
                 ) -> dict[str, Any]:
    """Model inputs for one question about one image (a PIL image) or one video (a list of PIL frames)."""
    if (image is None) == (frames is None):
        raise ValueError("Pass either an image or a list of video frames.")
    kind = "image" if image is not None else "video"
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        # No chat template: the format vtprune's reference checkpoints were trained on (question, then media).
        placeholder = getattr(processor, f"{kind}_token", None)
        if placeholder is None:
            raise ValueError(f"This processor has no {kind} token: the model does not take {kind}s.")
        if "_pad" in placeholder:
            placeholder = f"<|vision_start|> {placeholder} <|vision_end|>"
        prompt = f"USER: {question} {placeholder} ASSISTANT:"
    media = {"images": image} if image is not None else {"videos": [frames]}
    inputs = processor(text=prompt, return_tensors="pt", **media)
    return {k: v.to(device) for k, v in inputs.items()}


def cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from vtprune.eval.measure import measure_setting

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods == ["all"]:
        methods = vtprune.list_methods()
    for method in methods:
        get_pruner_class(method)  # fail fast, with "did you mean", before loading anything
    model, processor, note = load_model(args.model, args.device, args.dtype, args.attn)
    print(f"model: {note}")
    image = Path(args.image) if args.image else _sample_image()
    print(f"image: {image}\nquestion: {args.question}\ndevice: {args.device} ({args.dtype}, {args.attn})\n")
    inputs = build_inputs(processor, image, args.question, args.device)
    visual_in = int(torch.isin(inputs["input_ids"], torch.tensor(model.config.image_token_id)).sum())

    results = []
    base = measure_setting(model, processor, inputs, args.repeats, args.max_new_tokens)
    results.append({"method": "unpruned", "keep": 1.0, "visual_in": visual_in, "K_in": visual_in,
                    "K_avg": float(visual_in), **base})
    for method in methods:
        options = {"where": args.where} if args.where else {}
        vtprune.wrap(model, method, keep=args.keep, budget=args.budget, **options)
        try:
            measured = measure_setting(model, processor, inputs, args.repeats, args.max_new_tokens)
            stats = model.vtprune.last_stats["samples"][0]
        finally:
            vtprune.unwrap(model)
        results.append({"method": method, "keep": args.keep, "visual_in": visual_in, "K_in": stats["K_in"],
                        "K_avg": stats["K_avg"], **measured})

    rows = []
    for r in results:
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "n/a (CPU)"
        rows.append((r["method"], f"{r['keep']:.2f}", f"{r['visual_in']} -> {r['K_in']}", f"{r['K_avg']:.1f}",
                     f"{1000 * r['prefill_s']:.2f}", f"{base['prefill_s'] / r['prefill_s']:.2f}x",
                     f"{1000 * r['decode_s']:.2f}", f"{base['decode_s'] / r['decode_s']:.2f}x", peak,
                     f"{r['kv_bytes'] / 2**20:.2f}", repr(r["answer"])))
    _print_table(("method", "keep", "visual tokens in -> LLM", "K_avg", "prefill ms", "speed-up", "decode ms/token",
                  "speed-up", "peak MiB", "KV MiB", "answer"), rows)
    if args.device == "cpu":
        print("\nTimes are CPU wall times of this machine: indicative only, not GPU speed-ups.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vtprune.eval import accuracy

    model_dir = Path(args.model) if args.model else DEFAULT_CHECKPOINT
    if not model_dir.is_dir():
        raise SystemExit(f"--model {model_dir}: no such directory. Pass a reference checkpoint directory.")
    get_pruner_class(args.method)
    spec = accuracy.family_of(AutoConfig.from_pretrained(model_dir))
    splits = spec.task.SPLIT_SIZES
    if args.split not in splits:
        raise SystemExit(f"--split {args.split}: the yardstick-v{spec.version} checkpoint {model_dir} has the splits "
                         f"{list(splits)}.")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    if args.categories == "all":
        categories = list(spec.categories)
    else:
        categories = [c.strip() for c in args.categories.split(",")]
        unknown = [c for c in categories if c not in spec.categories]
        if unknown:
            raise ValueError(f"Unknown categories {unknown} for {spec.name}. Categories: {list(spec.categories)}.")
    run = dict(split=args.split, limit=args.limit, batch_size=args.batch_size)
    print(f"model: {model_dir} ({spec.name}); split {args.split}; {args.method} keep={args.keep} ({args.budget})")
    base = accuracy.evaluate(model, spec, categories, **run)
    options = {"where": args.where} if args.where else {}
    vtprune.wrap(model, args.method, keep=args.keep, budget=args.budget, **options)
    try:
        pruned = accuracy.evaluate(model, spec, categories, **run)
    finally:
        vtprune.unwrap(model)
    rows = []
    for category in categories:
        b, p = base[category]["accuracy"], pruned[category]["accuracy"]
        kept = f"{100 * p / b:.1f}%" if b > 0 else "n/a"
        rows.append((category, base[category]["n"], f"{100 * b:.1f}", f"{100 * p:.1f}", kept,
                     f"{100 * accuracy.chance(spec)[category]:.0f}"))
    b, p = accuracy.overall(base), accuracy.overall(pruned)
    rows.append(("all", sum(r["n"] for r in base.values()), f"{100 * b:.1f}", f"{100 * p:.1f}",
                 f"{100 * p / b:.1f}%" if b > 0 else "n/a", ""))
    _print_table(("category", "items", "unpruned %", f"{args.method} %", "accuracy kept", "chance %"), rows)
    result = {"model": str(model_dir), "family": spec.name, "method": args.method, "keep": args.keep,
              "budget": args.budget, "where": args.where, "split": args.split, "limit": args.limit,
              "unpruned": base, "pruned": pruned, "categories": categories}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the pruning methods and their status").set_defaults(run=cmd_methods)

    compare = sub.add_parser("compare", help="answer, tokens, time and memory per method against the unpruned model")
    compare.add_argument("--model", help="local checkpoint directory (default: a tiny built-in model)")
    compare.add_argument("--image", help="image file (default: the sample image shipped with vtprune)")
    compare.add_argument("--question", default="what colour is the cross ?")
    compare.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (every "
                         "registered method)")
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

    evaluate = sub.add_parser("eval", help="accuracy kept on the synth set, per category, pruned vs unpruned")
    evaluate.add_argument("--model", help="reference checkpoint directory (default: checkpoints/llava)")
    evaluate.add_argument("--method", default="uniform")
    evaluate.add_argument("--keep", type=float, default=0.11)
    evaluate.add_argument("--budget", default="input", choices=["input", "average"])
    evaluate.add_argument("--where", help="insertion point for methods that take one")
    evaluate.add_argument("--split", default="test", choices=["val", "test", "test_shift"],
                          help="test_shift: the held-out split of yardstick-v2 checkpoints")
    evaluate.add_argument("--categories", default="all", help="comma-separated, or 'all'")
    evaluate.add_argument("--limit", type=int, help="items per category (default: the whole split)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--json", default="vtprune-eval.json", help="where to write the results")
    evaluate.set_defaults(run=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:
        print(f"vtprune: error: {error}", file=sys.stderr)
        return 2
