"""Turn the yardstick results into the Markdown tables of README.

    python -m vtprune.eval.report eval/results/reference.json     # unpruned / blind / oracle / baselines
    python -m vtprune.eval.report eval/results/pruners.json       # every method x keep x budget
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtprune.eval import reference
from vtprune.eval.accuracy import IMAGE_CATEGORIES, chance, image_average

ROWS = ("unpruned", "blind", "oracle@0.11", "oracle-q@0.11", "cls@0.11", "random@0.11", "uniform@0.11",
        "random@0.22", "uniform@0.22", "random@0.33", "uniform@0.33")


def family_table(family: str, accuracy: dict, version: int = 1, split: str = "test") -> str:
    spec = reference.get_family(family, version)
    unpruned = accuracy.get("unpruned", {})
    if not isinstance(unpruned, dict) or "error" in unpruned or not unpruned:
        reason = unpruned.get("error", "missing") if isinstance(unpruned, dict) else "missing"
        return f"**{family}** ({split}): no table, the unpruned row was not measured ({reason.splitlines()[-1]})"
    categories = [c for c in spec.task.CATEGORIES if c in unpruned]
    header = ["run"] + categories + ["image avg", "all avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines.append("| chance | " + " | ".join(f"{100 * chance(spec)[c]:.0f}" for c in categories) + " | | |")
    for row in ROWS:
        result = accuracy.get(row)
        if not isinstance(result, dict) or "error" in result or not result:
            continue
        cells = [f"{100 * result[c]['accuracy']:.1f}" for c in categories]
        image_avg = image_average(result)
        all_avg = sum(result[c]["accuracy"] for c in categories) / len(categories)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {100 * image_avg:.1f} | {100 * all_avg:.1f} |")
    n = accuracy["unpruned"][categories[0]]["n"]
    return f"**{family}** ({n} {split} items per category)\n\n" + "\n".join(lines)


def gate_table(family: str, gates: list[dict]) -> str:
    """The yardstick's gates of one family: requirement, measured number, verdict (a gate never measured says so)."""
    lines = [f"**{family}** gates (test split)\n", "| gate | required | measured | |", "| --- | --- | --- | --- |"]
    for gate in gates:
        measured = "not measured" if gate["measured"] is None else f"{100 * gate['measured']:.1f}"
        verdict = {True: "met", False: "**missed**", None: "not measured"}[gate["passed"]]
        lines.append(f"| {gate['name']} | {gate['kind']} {100 * gate['threshold']:.0f} | {measured} | {verdict} |")
    return "\n".join(lines)


def pruner_table(family: str, accuracy: dict, keeps: tuple[float, ...] = (0.11, 0.22, 0.33)) -> str:
    """Image-average accuracy per method, keep and budget, with the share of the unpruned model's it keeps."""
    base = accuracy["unpruned"]
    image = [c for c in IMAGE_CATEGORIES if c in base]
    base_avg = image_average(base)
    methods = sorted({name.split("@")[0] for name in accuracy if "@" in name and not name.endswith(".seconds")})
    header = ["method", "budget"] + [f"keep {k}" for k in keeps]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines.append(f"| unpruned | | {100 * base_avg:.1f} (100%) |" + " |" * (len(keeps) - 1))
    for method in methods:
        for budget in ("input", "average"):
            cells, same = [], True
            for keep in keeps:
                result = accuracy.get(f"{method}@{keep}/{budget}")
                if result is None:  # not measured at this keep
                    cells.append("")
                    continue
                if isinstance(result, str):  # the same plan under both budgets: one run, reported under both
                    result = accuracy.get(result)
                else:
                    same = False
                if not isinstance(result, dict) or "error" in result or not result:
                    cells.append("error" if isinstance(result, dict) and "error" in result else "")
                    continue
                avg = image_average(result)
                cells.append(f"{100 * avg:.1f} ({100 * avg / base_avg:.0f}%)")
            if same and budget == "average":
                continue
            label = "both" if same else budget
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    n = base[image[0]]["n"]
    return (f"**{family}** — image average over {', '.join(image)} ({n} test items each); in brackets: share of "
            "the unpruned accuracy\n\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    for family, entry in data["families"].items():
        accuracy = entry["accuracy"]
        if accuracy.get("version") == 2:  # yardstick v2: one table per split, then the gates
            for split in ("test", "test_shift"):
                if split in accuracy:
                    print(family_table(family, accuracy[split], 2, split) + "\n")
            if "gates" in accuracy:
                print(gate_table(family, accuracy["gates"]) + "\n")
            continue
        pruners = any(name.endswith(("/input", "/average")) for name in accuracy)
        print((pruner_table(family, accuracy) if pruners else family_table(family, accuracy)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
