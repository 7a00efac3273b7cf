"""DivPrune keeps, per image, the tokens the official max–min rule picks: first the token farthest (cosine
distance) from its nearest neighbour, then repeatedly the token farthest from its nearest pick, on the projector
output; and it renumbers positions on LLaVA as the official code does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune import kernels

from .conftest import FACTORIES, Prompt


def _official_rule(features: torch.Tensor, count: int) -> list[int]:
    """The rule written the way the official code states it: a loop over picks on the distance matrix."""
    x = F.normalize(features.double(), dim=-1)
    distance = 1.0 - x @ x.T
    picks = [int(torch.topk(distance, 2, dim=0, largest=False).values[1].argmax())]
    while len(picks) < count:
        picks.append(int(distance[picks].min(dim=0).values.argmax()))
    return picks


def test_divprune_keeps_the_official_max_min_picks_of_the_projector_output():
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5)], seed=3)
    projected = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out))
    with torch.no_grad():
        vtprune.wrap(model, "divprune", keep=0.25)
        model(**inputs)
    hook.remove()
    features = projected[0]  # (images, n, D), prompt order
    stats = model.vtprune.last_stats
    kept = [image for sample in stats["samples"] for image in sample["stages"][0]["kept"]]
    assert len(kept) == features.shape[0] == 3
    for image_features, image_kept in zip(features, kept, strict=True):
        assert sorted(image_kept) == sorted(_official_rule(image_features, len(image_kept)))
    assert model.vtprune.pruner.config.positions == "renumber"


def test_diverse_subset_isolated_first_pick_and_memory_split(monkeypatch):
    x = F.normalize(torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    picks = kernels.diverse_subset(x, "isolated", 5, "kcenter")
    assert [row.tolist() for row in picks] == [_official_rule(x[b], 5) for b in range(3)]
    monkeypatch.setattr(kernels, "_BATCH_SIMILARITY_BYTES", 1)  # one sample at a time: same picks
    assert torch.equal(kernels.diverse_subset(x, "isolated", 5, "kcenter"), picks)
    with pytest.raises(ValueError, match="first='middle'"):
        kernels.diverse_subset(x, "middle", 5, "kcenter")


def test_divprune_refuses_the_decode_point():
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="where='projector'"):
        vtprune.wrap(model, "divprune", keep=0.5, where="decode:1")
