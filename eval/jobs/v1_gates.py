"""The yardstick gates measured on the shipped version-1 checkpoints (CPU), for comparison with version 2.

    python -m vtprune.eval.jobs.v1_gates --families llava,internvl --limit 300 --out eval/results/gates_v1.json

Re-measures the object oracle at keep 0.11 (coverage >= 0.2, then a background lattice: the oracle changed with
yardstick v2) and the share of the top-11% CLS-attention tokens on objects, on the first ``limit`` test items per
category, and takes the other rows (unpruned, blind, uniform) from ``eval/results/reference.json``, which was
measured on the same items. Accuracy does not depend on the device, so a CPU run is a valid measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

EVAL = Path(__file__).resolve().parents[1]  # the eval/ folder, with results/ inside and checkpoints/ beside it
REFERENCE = EVAL / "results" / "reference.json"


def measure(family: str, limit: int, cls_items: int) -> dict:
    import torch
    import transformers

    from vtprune.eval import accuracy

    checkpoint = EVAL.parent / "checkpoints" / family
    model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    spec = accuracy.family_of(model)
    started = time.time()
    adapter, oracle = accuracy.install_oracle(model, spec, 0.11)
    try:
        runs = {"oracle@0.11": accuracy.evaluate(model, spec, list(spec.categories), limit=limit, batch_size=16,
                                                 progress=False, before=oracle.prepare)}
    finally:
        adapter.remove()
    cls_share = None
    if family in ("llava", "internvl"):
        items = [it for c in spec.task.IMAGE_CATEGORIES for it in spec.task.split_items("test", c, cls_items)]
        cls_share = accuracy.cls_on_objects(model, spec, items)
    stored = json.loads(REFERENCE.read_text())["families"][family]["accuracy"]
    for row in ("unpruned", "blind", "uniform@0.11"):
        runs[row] = stored[row]
    gates = accuracy.gates(spec, runs, cls_share)
    return {"oracle@0.11": runs["oracle@0.11"], "cls_share": cls_share, "cls_items_per_category": cls_items,
            "gates": [{**asdict(g), "passed": g.passed} for g in gates], "seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llava,internvl")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--cls-items", type=int, default=100, help="test items per image category for the CLS share")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "limit": args.limit, "families": {}}
    for family in args.families.split(","):
        result["families"][family] = measure(family.strip(), args.limit, args.cls_items)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    from vtprune.eval.report import gate_table

    for family, entry in result["families"].items():
        print(gate_table(family, entry["gates"]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
