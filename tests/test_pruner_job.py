"""The accuracy job behind README's method tables: method specs parse, and a tiny run records no errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtprune.eval import pruner_job

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def test_method_specs_parse_options():
    assert pruner_job.parse_spec("apet") == ("apet", {})
    assert pruner_job.parse_spec("apet[merge=false,inject=true]") == ("apet", {"merge": False, "inject": True})
    assert pruner_job.parse_spec("todre[tau=0,selection=kcenter]") == ("todre", {"tau": 0, "selection": "kcenter"})
    assert pruner_job.parse_spec("adsc[ratio=0.25]") == ("adsc", {"ratio": 0.25})


def test_plans_differ_only_where_the_budget_matters():
    assert not pruner_job.plans_differ("uniform", 0.11, 4)  # one drop before the LLM
    assert not pruner_job.plans_differ("todre", 0.11, 4)  # stage 2 is outside the budget
    assert pruner_job.plans_differ("apet", 0.11, 4)
    assert pruner_job.plans_differ("adsc", 0.11, 4)


@pytest.mark.skipif(not (CHECKPOINTS / "llava").exists(), reason="needs the shipped LLaVA checkpoint")
def test_a_tiny_run_records_every_configuration_without_errors():
    results = pruner_job.evaluate_family(
        "llava", CHECKPOINTS / "llava", ["unpruned", "uniform", "apet[merge=false]"], (0.11,), limit=1
    )
    runs = {k: v for k, v in results.items() if isinstance(v, dict)}
    assert set(runs) == {"unpruned", "uniform@0.11", "apet[merge=false]@0.11/input",
                         "apet[merge=false]@0.11/average"}
    for name, result in runs.items():
        assert "error" not in result, (name, result.get("error"))
        assert {"colour", "count"} <= set(result)
    assert results["uniform@0.11/input"] == results["uniform@0.11/average"] == "uniform@0.11"
