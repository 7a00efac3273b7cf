"""Recovery fine-tune of a reference checkpoint under a pruning method, measured before and after.

    python -m vtprune.eval.train_adsc --checkpoint checkpoints/llava --method adsc --steps 600 --limit 200 \\
        --out "$OUT/adsc_finetune.json"

The demonstration job of ``vtprune.train``: it evaluates the checkpoint unpruned and under ``--method`` at every
keep of the curriculum (``accuracy.evaluate`` on the test split, ``--limit`` items per category), fine-tunes LoRA on
the language model with ``vtprune.train`` on synth training items (one category per step, round-robin, as the VQA
phase of ``train_reference`` does), evaluates the same settings again and writes one JSON file with both tables, the
training log and the timings. ``--save DIR`` also writes the merged checkpoint. Any registered method works; ADSC
(uniform down-sampling at several LLM layers) is the one this job was written for.

For a method with learned heads (ATP) the LLM stays frozen and the heads train under soft masks; the trained
config goes to ``--config-out`` and "after" is measured with it.

Tiny settings run on CPU as a smoke test: ``--steps 2 --limit 2 --batch 2 --categories colour``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

import vtprune
from vtprune.config import BUDGETS, option_value
from vtprune.training import CURRICULA, TrainConfig

# The recipe's defaults are TrainConfig's; the flags below only override them.
DEFAULTS = TrainConfig()


def training_batches(spec: Any, categories: list[str], batch: int, seed: int, device: str) -> Iterator[dict]:
    """Endless batches with labels (answer + eos), each of ``batch`` items from one category, round-robin."""
    from vtprune.eval import reference, synth

    streams = {category: synth.train_stream((category,), seed=seed) for category in categories}
    for step in itertools.count():
        category = categories[step % len(categories)]
        items = [next(streams[category]) for _ in range(batch)]
        yield reference.encode(spec, items, device, with_answers=True)


def measure(model: Any, spec: Any, categories: list[str], method: str, keeps: tuple[float, ...], budget: str,
            options: dict[str, Any], limit: int | None) -> dict[str, dict]:
    """Per setting ("unpruned", "{method}@{keep}"): per-category results, overall and image-average accuracy."""
    from vtprune.eval import accuracy

    table = {}
    for keep in (None, *keeps):
        name = "unpruned" if keep is None else f"{method}@{keep}"
        if keep is not None:
            vtprune.wrap(model, method, keep=keep, budget=budget, **options)
        try:
            results = accuracy.evaluate(model, spec, categories, split="test", limit=limit, batch_size=64,
                                        progress=False)
        finally:
            if keep is not None:
                vtprune.unwrap(model)
        table[name] = {
            "image_average": accuracy.image_average(results),
            "overall": accuracy.overall(results),
            "categories": results,
        }
    return table


def format_table(before: dict[str, dict], after: dict[str, dict], categories: list[str]) -> str:
    """Image-average accuracy before / after per setting, then every category as before->after."""
    def pct(value: float | None) -> str:
        return "   -" if value is None else f"{100 * value:4.1f}"

    head = f"{'setting':<18} {'img avg before':>14} {'after':>6} {'delta':>6}  " + "  ".join(
        f"{c:>11}" for c in categories
    )
    lines = [head, "-" * len(head)]
    for name, old in before.items():
        new = after[name]
        delta = None if old["image_average"] is None else new["image_average"] - old["image_average"]
        cells = "  ".join(
            f"{pct(old['categories'][c]['accuracy'])}->{pct(new['categories'][c]['accuracy'])}" for c in categories
        )
        lines.append(f"{name:<18} {pct(old['image_average']):>14} {pct(new['image_average']):>6} "
                     f"{'   -' if delta is None else f'{100 * delta:+5.1f}':>6}  {cells}")
    return "\n".join(lines)


def parse_keeps(text: str) -> tuple[float, ...]:
    """"0.11,0.22" -> (0.11, 0.22)."""
    try:
        return tuple(float(keep) for keep in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--keeps takes comma-separated numbers such as 0.11,0.22, got {text!r}."
        ) from None


def parse_option(text: str) -> tuple[str, Any]:
    """"where=llm:2" -> ("where", "llm:2"); values that read as JSON ("0", "true", "[1, 2]") are decoded."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE (e.g. where=llm:2), got {text!r}.")
    key, value = text.split("=", 1)
    return key, option_value(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/llava"))
    parser.add_argument("--method", default="adsc", help="a registered method (vtprune.list_methods())")
    parser.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a method option for vtprune.wrap, e.g. --option where=llm:2 (repeatable)")
    parser.add_argument("--keeps", type=parse_keeps, default=DEFAULTS.keeps, help="comma-separated keep ratios")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32, help="training items per step")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--warmup", type=int, default=DEFAULTS.warmup_steps, help="warm-up steps")
    parser.add_argument("--curriculum", default=DEFAULTS.curriculum, choices=CURRICULA)
    parser.add_argument("--budget", default=DEFAULTS.budget, choices=BUDGETS)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--limit", type=int, help="test items per category (default: the whole test split)")
    parser.add_argument("--categories", help="comma-separated categories (default: every category of the family)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--save", type=Path, help="also write the merged checkpoint to this folder")
    parser.add_argument("--config-out", type=Path,
                        help="methods with learned heads (atp): write the trained method config here (loads with "
                             "vtprune.wrap(model, path); keep = the curriculum's first)")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.head_temperature,
                        help="methods with learned heads: sharpness of the soft masks")
    parser.add_argument("--budget-weight", type=float, default=DEFAULTS.budget_weight,
                        help="methods with learned heads: weight of the budget loss")
    args = parser.parse_args(argv)

    import transformers

    from vtprune.eval import reference
    from vtprune.eval.train_reference import save

    started = time.time()
    spec = reference.get_family(transformers.AutoConfig.from_pretrained(args.checkpoint).model_type)
    categories = args.categories.split(",") if args.categories else list(spec.categories)
    unknown = sorted(set(categories) - set(spec.categories))
    if unknown:
        parser.error(f"categories {unknown} are not in the {spec.name} family's {list(spec.categories)}.")
    options = dict(args.option)
    config = TrainConfig(keeps=args.keeps, curriculum=args.curriculum, steps=args.steps, lr=args.lr,
                         warmup_steps=args.warmup, budget=args.budget, seed=args.seed,
                         head_temperature=args.temperature, budget_weight=args.budget_weight)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_cls = getattr(transformers, spec.model_class)
    model = model_cls.from_pretrained(args.checkpoint, dtype=torch.float32).to(device).eval()

    def run_measure() -> dict[str, dict]:
        return measure(model, spec, categories, args.method, config.keeps, config.budget, options, args.limit)

    before = run_measure()
    # Seed + 1: train_reference drew the checkpoint's own training items from the seed-0 streams, so these are
    # items the checkpoint has not seen.
    data = training_batches(spec, categories, args.batch, args.seed + 1, device)
    result = vtprune.train(model, args.method, data, config=config, progress=True, **options)
    if result.method_config is not None:
        # Learned heads: the model is unchanged, the trained config is what "after" measures.
        options["heads"] = result.method_config.heads
        if args.config_out is not None:
            args.config_out.parent.mkdir(parents=True, exist_ok=True)
            result.method_config.save(args.config_out)
    after = run_measure()
    options.pop("heads", None)

    record = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "accelerate", "vtprune")},
        "command": "python -m vtprune.eval.train_adsc " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "method": args.method,
        "options": options,
        "config": config.to_dict(),
        "categories": categories,
        "before": before,
        "after": after,
        "log": result.log,
        "seconds": {"train": round(result.seconds, 1), "total": round(time.time() - started, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    if args.save is not None and result.method_config is None:
        save(result.model, spec, args.save, {k: v for k, v in record.items() if k not in ("before", "after")})
    print(format_table(before, after, categories))
    print(f"wrote {args.out} (training {record['seconds']['train']} s, total {record['seconds']['total']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
