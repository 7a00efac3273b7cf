"""Why does the object oracle lose to ``uniform`` on a v2 checkpoint? Rows on the ``val`` split (ablations are tuned
and read on val only), per category, plus the count answers' signed error.

    python -m vtprune.eval.jobs.oracle_ablation --checkpoint out/run6/llava --limit 100 --out oracle_ablation.json

Rows: unpruned; ``uniform`` and the oracle (object / glyph tokens with coverage >= 0.2, then a background lattice)
at keep 0.11 and 0.22; the oracle with a stricter coverage (0.5: fewer, fully covered object tokens, more lattice);
``random`` at 0.11. For ``count`` each row also records the mean of (predicted − true) number and the share of
over-counts: a model that counts from the share of object-coloured tokens among those it sees over-counts when a
selection enriches objects, which is what the oracle does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CATEGORIES = ("colour", "shape", "exist", "position", "count", "text")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a v2 reference checkpoint folder")
    parser.add_argument("--limit", type=int, default=100, help="val items per category")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").exists():
        parser.error(f"--checkpoint {args.checkpoint} holds no config.json: give a folder saved by train_reference.")
    if args.limit < 1:
        parser.error("--limit must be at least 1.")

    import torch
    import transformers

    import vtprune
    from vtprune.eval import accuracy, reference

    config = transformers.AutoConfig.from_pretrained(args.checkpoint)
    spec = reference.spec_for(config)
    if spec.version != 2:
        parser.error(f"{args.checkpoint} is a version-{spec.version} checkpoint; this ablation reads version 2.")
    model = getattr(transformers, spec.model_class).from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    numbers = {w: i for i, w in enumerate(spec.task.NUMBERS)}
    items = {c: spec.task.split_items("val", c, args.limit) for c in CATEGORIES if c in spec.categories}

    def oracle(keep: float, coverage: float = 0.2):
        def install():
            pruner = accuracy.ObjectOracle(accuracy.OracleConfig(keep=keep, min_coverage=coverage), spec)
            adapter, _ = accuracy.install_eval_pruner(model, pruner)
            return adapter, pruner.prepare
        return install

    def wrapped(method: str, keep: float):
        def install():
            vtprune.wrap(model, method, keep=keep)
            return None, None
        return install

    rows = {"unpruned": None, "uniform@0.11": wrapped("uniform", 0.11), "oracle@0.11": oracle(0.11),
            "oracle[min_coverage=0.5]@0.11": oracle(0.11, 0.5), "random@0.11": wrapped("random", 0.11),
            "uniform@0.22": wrapped("uniform", 0.22), "oracle@0.22": oracle(0.22)}
    results: dict = {"checkpoint": str(args.checkpoint), "split": "val", "limit": args.limit, "rows": {}}
    for name, install in rows.items():
        started = time.time()
        adapter, before = install() if install is not None else (None, None)
        row: dict = {}
        try:
            for category, chunked in items.items():
                guesses = []
                for start in range(0, len(chunked), 32):
                    chunk = chunked[start:start + 32]
                    guesses += accuracy.predict(model, spec, chunk, before=before)
                hits = [spec.task.score(g, it.answer) for g, it in zip(guesses, chunked, strict=True)]
                row[category] = round(sum(hits) / len(hits), 4)
                if category == "count":
                    errors = [numbers[g] - numbers[it.answer] for g, it in zip(guesses, chunked, strict=True)
                              if g in numbers]
                    row["count_mean_error"] = round(sum(errors) / max(len(errors), 1), 3)
                    row["count_over_share"] = round(sum(e > 0 for e in errors) / max(len(errors), 1), 3)
                    row["count_under_share"] = round(sum(e < 0 for e in errors) / max(len(errors), 1), 3)
        finally:
            if adapter is not None:
                adapter.remove()
            if vtprune.is_wrapped(model):
                vtprune.unwrap(model)
        row["seconds"] = round(time.time() - started, 1)
        results["rows"][name] = row
        print(name, row, flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
