"""Method specs of the evaluation jobs and benchmarks: ``"apet[merge=false]"`` (a method with options, for
ablations) and whether a method plans differently under the two budget conventions."""

from __future__ import annotations

from typing import Any

from vtprune.config import BUDGETS


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"apet[merge=false,inject=false]"`` -> ("apet", {"merge": False, "inject": False}): a method with options,
    for ablations."""
    if "[" not in spec:
        return spec, {}
    from vtprune.config import option_value

    name, _, rest = spec.partition("[")
    if not rest.endswith("]") or spec.count("[") != spec.count("]"):
        raise ValueError(f"method spec {spec!r} opens '[' without closing it: write e.g. 'pdrop[layers=[1,2]]'.")
    options = {}
    for item in _split_top_level(rest[:-1]):
        key, _, value = item.partition("=")
        options[key.strip()] = option_value(value.strip())
    return name, options


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets: "layers=[1,2],ratio=0.5" -> ["layers=[1,2]", "ratio=0.5"]."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def plans_differ(spec: str, keep: float, num_layers: int) -> bool:
    """Whether ``spec`` drops differently under the two budgets on an LLM of ``num_layers`` layers. A method whose
    plan is the same under both (one drop before the LLM, or ToDRE whose in-LLM stage is outside the budget) needs
    to be measured once for both."""
    from vtprune.budget import size_plan
    from vtprune.registry import get_pruner_class

    method, options = parse_spec(spec)
    cls = get_pruner_class(method)
    plans = []
    for budget in BUDGETS:
        try:
            plans.append(size_plan(cls(cls.config_cls(keep=keep, budget=budget, **options)), num_layers))
        except ValueError:
            return True  # infeasible under one budget: run both so the error is recorded
    return plans[0] != plans[1]
