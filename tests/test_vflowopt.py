"""VFlowOpt's own rules: the encoder attention and patch pixels the LLaVA adapter hands it (checked against the
tower's eager attention weights and the pixel values), the entropy on de-normalised pixels (negative normalised
values included), the context relevance, the recycled cells' means, the stage layers and budget solving, the search
space, and bad arguments. The generic properties (keep=1 identity, equivalence with feeding the kept rows,
batching, counts) come from the matrix."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import FACTORIES, Prompt

import vtprune
from vtprune.pruners.vflowopt import (
    VFlowOptConfig,
    context_relevance,
    default_layers,
    grid_cells,
    layer_mean,
    patch_entropy,
    recycle_select,
    stage_fractions,
)
from vtprune.state import ImageTokens

SIGLIP = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _normalise(levels: torch.Tensor, mean, std) -> torch.Tensor:
    """(n, 3, p, p) bytes 0..255 -> (n, 3·p·p) processor-normalised pixels."""
    m = torch.tensor(mean)[None, :, None, None]
    s = torch.tensor(std)[None, :, None, None]
    return ((levels / 255.0 - m) / s).flatten(1)


def test_entropy_is_computed_on_de_normalised_pixels():
    p = 4
    # Patch 0: constant; patch 1: half black (normalised -1, where the code's uint8 cast wraps), half at 102
    # (normalised -0.2, which the code would read as 205); patch 2: 16 distinct gray levels.
    levels = torch.zeros(3, 3, p, p)
    levels[0] = 77.0
    levels[1, :, :2] = 0.0
    levels[1, :, 2:] = 102.0
    levels[2] = torch.arange(16.0).reshape(p, p)[None] * 16
    pixels = _normalise(levels, *SIGLIP)
    assert pixels.min() < 0
    entropy = patch_entropy(pixels, *SIGLIP)
    torch.testing.assert_close(entropy, torch.tensor([0.0, 1.0, 4.0]), atol=1e-5, rtol=0)


def test_entropy_matches_a_histogram_of_random_bytes_with_clip_normalisation():
    gen = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (5, 1, 6, 6), generator=gen).float()
    levels = gray.expand(5, 3, 6, 6)
    config = VFlowOptConfig()
    entropy = patch_entropy(_normalise(levels, config.pixel_mean, config.pixel_std), config.pixel_mean,
                            config.pixel_std)
    for row, patch in zip(entropy, gray, strict=True):
        prob = torch.bincount(patch.long().flatten(), minlength=256).float() / patch.numel()
        prob = prob[prob > 0]
        assert row.item() == pytest.approx(-(prob * prob.log2()).sum().item(), abs=1e-4)


def test_context_relevance_averages_the_rows_of_the_global_tokens():
    # attention[k, j]; token 2 receives far more than the others, so it alone is global at t = 1.5.
    attention = torch.tensor([[0.1, 0.1, 0.8], [0.2, 0.1, 0.7], [0.3, 0.3, 0.4]])
    received = attention.T  # ImageTokens.encoder_attention layout: [j, k] = A[k, j]
    torch.testing.assert_close(context_relevance(received, 1.5), attention[2])
    # No token above the threshold: every query counts.
    torch.testing.assert_close(context_relevance(received, 100.0), attention.mean(0))


def _image(n: int, grid) -> ImageTokens:
    return ImageTokens(sample=0, index_in_sample=0, grid=grid, original_indices=torch.arange(n), positions=None,
                       features=None, budget=0)


def test_grid_cells_follow_the_image_grid():
    cells, count = grid_cells(_image(12, (3, 4)), 2.0)
    assert count == 4
    assert cells.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3]
    cells, count = grid_cells(_image(12, (3, 4)), 2.5)  # fractional a, as the code's
    assert count == 2 and cells.tolist() == [0, 0, 0, 1] * 3


@pytest.mark.parametrize("weighted", [False, True])
def test_recycling_writes_each_cells_mean_into_its_best_dropped_slot(weighted):
    # 4 x 4 grid, cells of 2 x 2: importance falls with the index, so the top k are the first tokens.
    n = 16
    features = torch.randn(n, 3, generator=torch.Generator().manual_seed(1))
    importance = torch.linspace(1.0, 0.1, n)
    cells, count = grid_cells(_image(n, (4, 4)), 2.0)
    budget = 6
    keep, values = recycle_select(features, importance, cells, count, budget, weighted)
    assert keep.numel() == budget and len(set(keep.tolist())) == budget
    # k = 2 (tokens 0, 1) + the 4 cells of the 14 dropped: each represented by its most important dropped token.
    assert keep.tolist() == [0, 1, 2, 4, 8, 10]
    dropped = set(range(2, n))
    by_slot = dict(zip(keep.tolist(), values, strict=True))
    for slot in (2, 4, 8, 10):
        members = [i for i in dropped if cells[i] == cells[slot]]
        w = importance[members] if weighted else torch.ones(len(members))
        expected = (features[members] * w[:, None]).sum(0) / w.sum()
        torch.testing.assert_close(by_slot[slot], expected)
    torch.testing.assert_close(by_slot[0], features[0])


def test_recycling_with_more_cells_than_the_budget_keeps_the_best_cells():
    n = 16
    features = torch.randn(n, 2)
    importance = torch.arange(n, 0, -1).float()
    cells, count = grid_cells(_image(n, (4, 4)), 1.0)  # every token its own cell
    keep, _ = recycle_select(features, importance, cells, count, 5, False)
    assert sorted(keep.tolist()) == [0, 1, 2, 3, 4]


def test_stage_layers_scale_with_depth():
    assert default_layers(28) == (9, 18)
    assert default_layers(32) == (10, 21)
    assert default_layers(4) == (1, 3)
    assert default_layers(1) == ()


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("layers", [(9, 18), (1, 3)])
def test_average_budget_is_met(keep, layers):
    num_layers = 28 if layers == (9, 18) else 4
    fractions = stage_fractions(VFlowOptConfig(keep=keep, budget="average"), layers, num_layers)
    assert all(0 < f <= 1 for f in fractions)
    assert layer_mean(fractions, layers, num_layers) == pytest.approx(keep)
    solved = stage_fractions(VFlowOptConfig(keep=0.25, budget="average", r1=0.3, r2=0.9), (9, 18), 28)
    assert solved[0] == pytest.approx(0.3) and solved[1] == pytest.approx(0.27)
    assert layer_mean(solved, (9, 18), 28) == pytest.approx(0.25)


def test_input_budget_and_released_defaults():
    fractions = stage_fractions(VFlowOptConfig(keep=0.25), (9, 18), 28)
    assert fractions == pytest.approx([0.25, 0.25 * 0.9833, 0.25 * 0.9833 * 0.8773])
    # The released 25 % config averages about 25 % at 28 layers with its own R1 (the code's constraint).
    assert layer_mean([0.2651, 0.2651 * 0.9833, 0.2651 * 0.9833 * 0.8773], (9, 18), 28) == pytest.approx(0.25,
                                                                                                       abs=2e-3)


def test_search_space_names_tunable_fields_within_bounds():
    fields = {f.name: f for f in dataclasses.fields(VFlowOptConfig)}
    space = VFlowOptConfig.search_space
    assert set(space) == {"t", "a", "alpha", "r2", "r3"}
    for name, (kind, low, high) in space.items():
        assert name in fields and name not in ("keep", "budget")
        assert kind == "float" and low < high
        VFlowOptConfig(**{name: low}), VFlowOptConfig(**{name: high})
    assert space["t"][1:] == (0.0, 50.0) and space["a"][1:] == (3.0, 24.0) and space["alpha"][1:] == (-1.0, 1.0)


@pytest.mark.parametrize("options", [
    {"t": -1.0}, {"a": 0.0}, {"r2": 0.0}, {"r3": 1.5}, {"r1": 0.3}, {"budget": "average", "r1": 0.3, "r3": 0.5},
    {"layers": (1, 2, 3)}, {"layers": (0, 2)}, {"recycle_value": "max"}, {"pixel_mean": (0.5, 0.5)},
    {"pixel_std": (0.5, 0.0, 0.5)},
])
def test_bad_arguments_raise(options):
    with pytest.raises(ValueError):
        VFlowOptConfig(**options)


def _recorded(model) -> list[ImageTokens]:
    pruner = model.vtprune.pruner
    seen: list[ImageTokens] = []
    original = pruner.importance

    def record(image):
        seen.append(image)
        return original(image)

    pruner.importance = record
    return seen


def test_llava_adapter_gives_the_consumed_layers_attention_and_patch_pixels():
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=2, prefix=2)], seed=3)
    eager = factory.build("eager")
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
        layer = model.config.vision_feature_layer
        index = layer if layer < 0 else layer - 1
        expected = out.attentions[index].mean(1)[:, 1:, 1:].transpose(1, 2).float()
        vtprune.wrap(model, "vflowopt", keep=0.25, alpha=0.5)
        seen = _recorded(model)
        model(**inputs)
    assert len(seen) == 2
    size = model.config.vision_config.patch_size
    for j, image in enumerate(seen):
        torch.testing.assert_close(image.encoder_attention, expected[j], atol=1e-5, rtol=1e-4)
        patches = inputs["pixel_values"][j].unfold(1, size, size).unfold(2, size, size)  # (3, h, w, p, p)
        flat = patches.permute(1, 2, 0, 3, 4).reshape(-1, 3 * size * size)
        torch.testing.assert_close(image.patch_pixels.float(), flat)
    sample = model.vtprune.last_stats["samples"][0]
    n = factory.tokens_per_image(model)
    assert [len(k) for k in sample["stages"][0]["kept"]] == [round(0.25 * n)] * 2
    assert not math.isnan(sample["K_avg"])
