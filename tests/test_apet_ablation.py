"""ApET's ablation switches: without merging and injection the step is its error-based selection alone."""

from __future__ import annotations

import pytest
import torch

from vtprune.pruners.apet import ApETConfig, compress


def test_without_merge_and_inject_values_are_the_kept_features():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 16)
    start = torch.zeros(2, dtype=torch.long)
    order, values = compress(x, 12, 4, 1e-5, start, merge=False, inject=False)
    assert torch.equal(values, x.gather(1, order[..., None].expand(-1, -1, 16)))
    full_order, full_values = compress(x, 12, 4, 1e-5, start)
    assert torch.equal(order, full_order)  # the switches change the values, never the selection
    assert not torch.allclose(values, full_values)


def test_inject_alone_changes_only_the_basis_slots():
    torch.manual_seed(1)
    x = torch.randn(1, 40, 8)
    start = torch.zeros(1, dtype=torch.long)
    order, values = compress(x, 10, 3, 1e-5, start, merge=False, inject=True)
    kept = x.gather(1, order[..., None].expand(-1, -1, 8))
    assert torch.equal(values[:, :7], kept[:, :7])
    assert not torch.equal(values[:, 7:], kept[:, 7:])


@pytest.mark.parametrize("name", ["merge", "inject"])
def test_switches_must_be_booleans(name):
    with pytest.raises(TypeError, match=name):
        ApETConfig(keep=0.25, **{name: 1})


def test_coverage_analysis_runs_on_the_reference_checkpoint():
    from vtprune.eval.jobs.apet_coverage import measure

    result = measure("llava", "count", 2, (0.11,))
    assert 0 < result["foreground_share"] < 1 and 0 <= result["basis_on_foreground"] <= 1
    assert set(result["foreground_covered"]) == {"uniform@0.11", "apet[merge=false,inject=false]@0.11", "apet@0.11"}
    assert all(0 <= share <= 1 for share in result["foreground_covered"].values())
    # The switches change ApET's values, never its selection: the same tokens cover the same foreground.
    covered = result["foreground_covered"]
    assert covered["apet@0.11"] == covered["apet[merge=false,inject=false]@0.11"]
