"""The ``vtprune`` command end to end on the LLaVA reference checkpoint: what ``make run`` shows a new user."""

from __future__ import annotations

import json

import vtprune
from vtprune import cli
from vtprune.api import resolve_config
from vtprune.registry import get_pruner_class


def test_compare_all_methods_on_the_reference_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "compare.json"
    code = cli.main(["compare", "--methods", "all", "--keep", "0.11", "--repeats", "1", "--max-new-tokens", "2",
                     "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["unpruned", *vtprune.list_methods()]
    unpruned = rows[0]
    assert unpruned["visual_in"] == unpruned["K_in"] == 576
    for row in rows[1:]:
        pruner = get_pruner_class(row["method"])(resolve_config(row["method"], 0.11, {}))
        pruner.resolve("llava")
        plan = pruner.plan(4)
        first = plan[0].point
        if first.kind == "llm" and first.layer > 0:
            # Methods that drop inside the LLM only (ADSC from layer 1, FastV at layer 2): layer 0 holds every token.
            assert row["K_in"] == 576 and row["K_avg"] < 0.6 * 576
        elif plan[0].adaptive and plan[0].fraction == 1.0:
            # An entry stage that only merges what it finds (MustDrop's windows), outside the budget; the LLM stages
            # after it are sized by keep.
            assert row["K_in"] <= 576 and row["K_avg"] < 0.6 * 576
        else:
            assert row["K_in"] == round(0.11 * 576)
            assert row["K_avg"] <= 0.12 * 576
        assert row["kv_bytes"] < unpruned["kv_bytes"]
        assert row["decode_s"] > 0
    assert "not GPU speed-ups" in capsys.readouterr().out


def test_compare_rejects_an_unknown_method_before_loading(capsys) -> None:
    assert cli.main(["compare", "--methods", "uniform,fastv2"]) == 2
    assert "fastv2" in capsys.readouterr().err
