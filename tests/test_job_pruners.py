"""The accuracy job behind README's method tables: method specs parse, and a tiny run records no errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtprune.eval.jobs import pruners
from vtprune.eval.methods import parse_spec, plans_differ

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def test_method_specs_parse_options():
    assert parse_spec("apet") == ("apet", {})
    assert parse_spec("apet[merge=false,inject=true]") == ("apet", {"merge": False, "inject": True})
    assert parse_spec("todre[tau=0,selection=kcenter]") == ("todre", {"tau": 0, "selection": "kcenter"})
    assert parse_spec("adsc[ratio=0.25]") == ("adsc", {"ratio": 0.25})
    assert parse_spec("pdrop[layers=[1,2],ratio=0.5]") == ("pdrop", {"layers": [1, 2], "ratio": 0.5})
    with pytest.raises(ValueError, match="without closing it"):
        parse_spec("pdrop[layers=[1,2]")


def test_plans_differ_only_where_the_budget_matters():
    assert not plans_differ("uniform", 0.11, 4)  # one drop before the LLM
    assert not plans_differ("todre", 0.11, 4)  # stage 2 is outside the budget
    assert plans_differ("apet", 0.11, 4)
    assert plans_differ("adsc", 0.11, 4)


@pytest.mark.skipif(not (CHECKPOINTS / "llava").exists(), reason="needs the shipped LLaVA checkpoint")
def test_a_tiny_run_fans_out_and_records_every_configuration_without_errors(tmp_path):
    code = pruners.main(["--families", "llava", "--methods", "unpruned;uniform;apet[merge=false]", "--keeps", "0.11",
                         "--limit", "1", "--jobs", "2", "--checkpoints", str(CHECKPOINTS), "--out", str(tmp_path)])
    log = (tmp_path / "pruners_llava.log").read_text()  # every worker's output
    data = json.loads((tmp_path / "pruners.json").read_text())
    assert code == 0, log
    # One worker per (family, method, keep); "unpruned" given again is not measured twice.
    assert data["status"] == {"llava/unpruned@0.11": 0, "llava/uniform@0.11": 0, "llava/apet[merge=false]@0.11": 0}
    assert data["command"].startswith("python -m vtprune.eval.jobs.pruners ")
    results = data["families"]["llava"]["accuracy"]
    runs = {k: v for k, v in results.items() if isinstance(v, dict)}
    assert set(runs) == {"unpruned", "uniform@0.11", "apet[merge=false]@0.11/input",
                         "apet[merge=false]@0.11/average"}
    for name, result in runs.items():
        assert "error" not in result, (name, result.get("error"))
        assert {"colour", "count"} <= set(result)
    assert results["uniform@0.11/input"] == results["uniform@0.11/average"] == "uniform@0.11"
    assert "llava uniform@0.11" in log
