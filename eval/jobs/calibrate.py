"""Calibrate a method on a reference checkpoint (``vtprune.calibrate``) from unlabeled ``val`` prompts.

    python -m vtprune.eval.jobs.calibrate --family llava --method dart --keep 0.11 --trials 30 \
        --out eval/results/calibrated/dart_llava_v1_keep0.11.json

The samples are the first ``--per-category`` val items of each image category of the checkpoint's task (questions
only, no answers: calibration never sees a label; ``val`` is the split methods are tuned on, never ``test``),
batched by ``--batch``. Writes the calibrated config (``vtprune.wrap(model, path)`` loads it) and, next to it,
``<name>.study.json`` with every trial's parameters and discrepancy. With ``--storage`` the optuna study resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=("llava", "qwen2_5_vl", "internvl"))
    parser.add_argument("--checkpoint", type=Path, help="default: checkpoints/<family>")
    parser.add_argument("--method", required=True)
    parser.add_argument("--keep", type=float, required=True)
    parser.add_argument("--budget", default="input", choices=("input", "average"))
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-category", type=int, default=6, help="val items per image category (5 categories)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--fixed", default="", help="fields held fixed, e.g. 'where=llm:2' (comma-separated)")
    parser.add_argument("--storage", help="optuna storage URL, e.g. sqlite:///calib.db, to resume")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or CHECKPOINTS / args.family
    if not (checkpoint / "config.json").is_file():
        parser.error(f"{checkpoint} holds no config.json: give a reference checkpoint directory with --checkpoint.")
    if args.per_category < 1 or args.batch < 1:
        parser.error("--per-category and --batch must be at least 1.")
    from vtprune.eval.methods import parse_spec

    fixed = parse_spec(f"{args.method}[{args.fixed}]")[1] if args.fixed else {}

    import torch
    import transformers

    import vtprune
    from vtprune.eval import reference

    spec = reference.spec_for(transformers.AutoConfig.from_pretrained(checkpoint))
    task = spec.task
    model = getattr(transformers, spec.model_class).from_pretrained(checkpoint, dtype=torch.float32).eval()
    items = [it for category in task.IMAGE_CATEGORIES if category in spec.categories
             for it in task.split_items("val", category, limit=args.per_category)]
    samples = [reference.encode(spec, items[i:i + args.batch]) for i in range(0, len(items), args.batch)]
    import optuna

    storage = args.storage or optuna.storages.InMemoryStorage()  # in memory: still read back for the record
    config = vtprune.calibrate(model, args.method, samples, keep=args.keep, budget=args.budget, trials=args.trials,
                               seed=args.seed, fixed=fixed, storage=storage)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config.save(args.out)
    study = optuna.load_study(study_name=f"{args.method}-keep{args.keep}-{args.budget}", storage=storage)
    record = {"checkpoint": checkpoint.name, "version": spec.version, "samples": len(items), "split": "val",
              "config": config.to_dict(), "command": "python -m vtprune.eval.jobs.calibrate " + " ".join(
                  argv if argv is not None else __import__("sys").argv[1:])}
    record["trials"] = [{"params": t.params, "value": t.value, **t.user_attrs} for t in study.trials]
    args.out.with_suffix(".study.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(config.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
