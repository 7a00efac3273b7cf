"""ADSC: the schedule meets ``keep`` under both budgets, the bottlenecks down-sample on the grid, bad options raise.

The registry-driven matrix (tests/test_equivalence.py) already checks keep=1 identity, the staged reference, batches
and kept counts for every family; these tests cover what is ADSC's own.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FACTORIES, Prompt

import vtprune
from vtprune.pruners.adsc import ADSCConfig, ADSCPruner, default_layers, schedule_counts, solve_ratio
from vtprune.pruners.uniform import lattice, nearest_present, nearest_present_rows, spread_all
from vtprune.state import ImageTokens


@pytest.mark.parametrize("num_layers, expected",
                         [(32, (2, 8, 16, 24)), (28, (2, 7, 14, 21)), (12, (1, 3, 6, 9)), (4, (1, 2, 3))])
def test_default_layers_scale_the_paper_schedule(num_layers, expected):
    assert default_layers(num_layers) == expected


@pytest.mark.parametrize("keep", [0.11, 0.22, 0.33, 0.75])
@pytest.mark.parametrize("num_layers", [4, 28, 32])
def test_average_budget_is_met(keep, num_layers):
    if keep <= 1 / num_layers:
        # The first bottleneck sits at layer >= 1: layer 0 alone holds 1/L of the full budget.
        with pytest.raises(ValueError, match="cannot be met with the first in-LLM stage at layer 1"):
            schedule_counts(ADSCConfig(keep=keep, budget="average"), num_layers, 576)
        return
    counts = schedule_counts(ADSCConfig(keep=keep, budget="average"), num_layers, 576)
    # Rounding each bottleneck to whole tokens moves the mean by well under a token per layer.
    assert sum(counts) / num_layers == pytest.approx(keep * 576, abs=1.0)
    assert counts == sorted(counts, reverse=True)


def test_input_budget_keeps_keep_at_the_first_bottleneck_then_the_default_ratio():
    counts = schedule_counts(ADSCConfig(keep=0.25), 32, 576)
    assert counts[:2] == [576, 576]
    assert counts[2] == counts[7] == 144
    # 0.65 of what is left at each later bottleneck (rounded to whole tokens).
    assert counts[8] == 94 and counts[16] == 61 and counts[24] == 40
    assert schedule_counts(ADSCConfig(keep=0.25, ratio=0.5), 32, 576)[8] == 72
    counts = schedule_counts(ADSCConfig(keep=0.25, ratio=1.0, layers=(4,)), 32, 576)
    assert counts == [576] * 4 + [144] * 28


def test_solve_ratio_against_a_hand_computed_schedule():
    # (2 + 6ρ + 8ρ² + 8ρ³ + 8ρ⁴) / 32 at ρ = 0.5 is 8.5 / 32 (K̄ = 153 of 576, METHODS.md §4).
    ratio = solve_ratio(8.5 / 32, (2, 8, 16, 24), 32)
    assert ratio == pytest.approx(0.5, abs=1e-9)


def test_first_bottleneck_is_the_uniform_lattice_on_a_full_grid():
    image = ImageTokens(0, 0, (24, 24), torch.arange(576), None, None, 64)
    from vtprune.state import PruneContext

    ctx = PruneContext(point="llm:2", num_layers=32, images=[image])
    kept = ADSCPruner(ADSCConfig(keep=0.11)).select(ctx).keep[0]
    assert torch.equal(kept.sort().values, lattice(24, 24, 64).sort().values)
    rows, cols = kept // 24, kept % 24
    assert rows.unique().numel() == 8 and cols.unique().numel() == 8  # the stride-3 lattice


def test_nearest_present_picks_present_lattice_points_exactly_and_distinct_tokens():
    present = lattice(24, 24, 288).sort().values
    image = ImageTokens(0, 0, (24, 24), present, None, None, 72)
    wanted = lattice(24, 24, 72)
    local = nearest_present(image, wanted)
    assert local.unique().numel() == 72
    hits = torch.isin(wanted, present)
    assert torch.isin(wanted[hits], present[local]).all()
    rng = random.Random(0)
    for _ in range(5):
        scattered = torch.tensor(sorted(rng.sample(range(576), 150)))
        image = ImageTokens(0, 0, (24, 24), scattered, None, None, 40)
        local = nearest_present(image, lattice(24, 24, 40))
        assert local.unique().numel() == 40 and int(local.max()) < 150



def test_batched_nearest_present_equals_one_image_at_a_time_and_breaks_ties_by_index():
    rng = random.Random(1)
    present = torch.stack([torch.tensor(sorted(rng.sample(range(576), 150))) for _ in range(4)])
    wanted = lattice(24, 24, 40)
    batched = nearest_present_rows(present, wanted, 24)
    for row, local in zip(present, batched, strict=True):
        alone = nearest_present(ImageTokens(0, 0, (24, 24), row, None, None, 40), wanted)
        assert torch.equal(local.sort().values, alone.sort().values)
    # Two present tokens equally far from the one wanted point that has none in its cell: the lower index wins.
    tie = nearest_present_rows(torch.tensor([[0, 2]]), torch.tensor([1]), 3)
    assert tie.tolist() == [[0]]
    # spread_all groups equal images and leaves the others to spread: same result as one at a time.
    images = [ImageTokens(0, 0, (24, 24), row, None, None, 40) for row in present]
    images.append(ImageTokens(1, 0, (24, 24), torch.arange(576), None, None, 64))
    grouped = spread_all(images, torch.device("cpu"))
    assert torch.equal(grouped[-1].sort().values, lattice(24, 24, 64).sort().values)
    for image, local in zip(images[:-1], grouped[:-1], strict=True):
        assert torch.equal(local.sort().values, nearest_present(image, wanted).sort().values)


def test_later_bottlenecks_stay_spread_over_the_image():
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1)], seed=0)
    vtprune.wrap(model, "adsc", keep=0.5)
    with torch.no_grad():
        model(**inputs)
    stats = model.vtprune.last_stats["samples"][0]
    grid = int(len(factory.image_positions(model, inputs)[0][0]) ** 0.5)
    previous = None
    for stage in stats["stages"]:
        kept = torch.tensor(stage["kept"][0])
        if previous is not None:
            assert set(kept.tolist()) <= set(previous.tolist())
        # Every quadrant of the grid keeps tokens at every bottleneck with more than a handful of tokens.
        if kept.numel() >= 8:
            quadrant = (kept // grid >= grid // 2).long() * 2 + (kept % grid >= grid // 2).long()
            assert quadrant.unique().numel() == 4
        previous = kept


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ratio": 0.5, "budget": "average"}, "solved from keep"),
        ({"ratio": 0.0}, "outside"),
        ({"layers": (8, 2)}, "strictly increasing"),
        ({"layers": ()}, "non-empty"),
        ({"stride": "3d"}, "stride"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        ADSCConfig(keep=0.25, **options)


def test_unreachable_average_budget_and_too_deep_layers_raise():
    with pytest.raises(ValueError, match="cannot be met"):
        ADSCPruner(ADSCConfig(keep=0.05, budget="average")).plan(32)
    with pytest.raises(ValueError, match="decoder layer 40"):
        ADSCPruner(ADSCConfig(keep=0.25, layers=(2, 40))).plan(32)
