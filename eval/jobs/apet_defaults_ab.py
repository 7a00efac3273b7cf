"""A/B rows of the seed methods' new defaults (issue "Seed methods I") on the reference checkpoints: ApET's
per-family official choices, the previous vtprune defaults and one switch at a time; ADSC's schedule.

    python -m vtprune.eval.jobs.apet_defaults_ab --limit 60 --out eval/results/apet_defaults_ab.json
    python -m vtprune.eval.jobs.apet_defaults_ab --method adsc --limit 60 --out eval/results/adsc_schedule_ab.json

Accuracy does not depend on the device; this runs on CPU. Image categories of the test split, ``keep=0.11``,
``budget="input"`` (one step before the LLM, as the released Qwen code), first ``--limit`` items per category.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# Per method and family: row name -> options (the rest: the method's defaults; ApET's "auto" fields take the
# official code's choice for the family).
ROWS = {"apet": {
    "llava": {
        "official (encoder, overwrite, renumber)": {},
        "previous default (projector, overwrite, original)": {"stage1_point": "projector", "positions": "original"},
        "positions=original": {"positions": "original"},
        "stage1_point=projector": {"stage1_point": "projector"},
        "blend=average": {"blend": "average"},
    },
    "qwen2_5_vl": {
        "official (projector, average, original)": {},
        "previous default (projector, overwrite, original)": {"blend": "overwrite"},
    },
}, "adsc": {
    "llava": {
        "default (first bottleneck at layer >= 1, ratio 0.65)": {},
        "previous default (layers 0, 1, 2, 3; ratio 0.5)": {"layers": (0, 1, 2, 3), "ratio": 0.5},
    },
}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="apet", choices=sorted(ROWS))
    parser.add_argument("--limit", type=int, default=60, help="items per category")
    parser.add_argument("--families", help="default: every family the method has rows for")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows_of = ROWS[args.method]
    families = [f for f in (args.families or ",".join(rows_of)).split(",") if f]
    unknown = sorted(set(families) - set(rows_of))
    if unknown or args.limit < 1:
        parser.error(f"families must be among {list(rows_of)} and --limit >= 1 (got {unknown}, {args.limit}).")
    missing = [f for f in families if not (args.checkpoints / f / "config.json").is_file()]
    if missing:
        parser.error(f"no checkpoint for {missing} under {args.checkpoints}.")

    import torch
    import transformers

    import vtprune
    from vtprune.eval import accuracy, reference

    torch.set_num_threads(2)
    command = "python -m vtprune.eval.jobs.apet_defaults_ab " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"date": time.strftime("%Y-%m-%d"), "card": "cpu", "keep": 0.11, "budget": "input", "limit": args.limit,
           "command": command, "families": {}}
    for family in families:
        checkpoint = args.checkpoints / family
        spec = reference.spec_for(transformers.AutoConfig.from_pretrained(checkpoint))
        model = getattr(transformers, spec.model_class).from_pretrained(checkpoint, dtype=torch.float32).eval()
        categories = list(spec.task.IMAGE_CATEGORIES)
        rows = {"unpruned": {}, **rows_of[family]}
        results = {}
        for name, options in rows.items():
            started = time.time()
            if name != "unpruned":
                vtprune.wrap(model, args.method, keep=0.11, budget="input", **options)
                resolved = model.vtprune.config.to_dict()
            try:
                per = accuracy.evaluate(model, spec, categories, limit=args.limit, batch_size=30, progress=False)
            finally:
                if vtprune.is_wrapped(model):
                    vtprune.unwrap(model)
            n = sum(v["n"] for v in per.values())
            mean = sum(v["accuracy"] * v["n"] for v in per.values()) / n
            results[name] = {"config": resolved if name != "unpruned" else None,
                             "image_avg": round(100 * mean, 1),
                             "stderr": round(100 * math.sqrt(mean * (1 - mean) / n), 1),
                             "per_category": {c: round(100 * v["accuracy"], 1) for c, v in per.items()},
                             "seconds": round(time.time() - started, 1)}
            print(family, name, results[name]["image_avg"], "±", results[name]["stderr"], flush=True)
        out["families"][family] = results
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
