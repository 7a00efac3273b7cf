"""Turn the yardstick results (``eval/results/reference.json``) into the Markdown tables of README.

    python -m vtprune.eval.report eval/results/reference.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtprune.eval import synth
from vtprune.eval.accuracy import CHANCE

ROWS = ("unpruned", "blind", "oracle@0.11", "random@0.11", "uniform@0.11", "random@0.22", "uniform@0.22",
        "random@0.33", "uniform@0.33")


def family_table(family: str, accuracy: dict) -> str:
    categories = [c for c in synth.CATEGORIES if c in accuracy.get("unpruned", {})]
    image = [c for c in categories if c in synth.IMAGE_CATEGORIES]
    header = ["run"] + categories + ["image avg", "all avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines.append("| chance | " + " | ".join(f"{100 * CHANCE[c]:.0f}" for c in categories) + " | | |")
    for row in ROWS:
        result = accuracy.get(row)
        if not isinstance(result, dict) or "error" in result or not result:
            continue
        cells = [f"{100 * result[c]['accuracy']:.1f}" for c in categories]
        image_avg = sum(result[c]["accuracy"] for c in image) / len(image)
        all_avg = sum(result[c]["accuracy"] for c in categories) / len(categories)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {100 * image_avg:.1f} | {100 * all_avg:.1f} |")
    n = accuracy["unpruned"][categories[0]]["n"]
    return f"**{family}** ({n} test items per category)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    for family, entry in data["families"].items():
        print(family_table(family, entry["accuracy"]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
