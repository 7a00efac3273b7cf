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
