"""PyramidDrop: each stage keeps the top of the last token's attention of the layer before it (checked against eager
``output_attentions``), the stages scale the paper's 8 / 16 / 24 of 32, λ meets ``keep`` under both budgets, bad
options raise.

The registry-driven matrix (tests/test_equivalence.py) already checks keep=1 identity, the staged reference, batches
and kept counts for every family; these tests cover what is PyramidDrop's own.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.budget import average_fraction
from vtprune.pruners.pdrop import PDropConfig, PDropPruner, default_layers, stage_fractions

from .conftest import FACTORIES, Prompt

PROMPTS = [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5)]


def _hide_from(model, from_layer: int, dropped: torch.Tensor) -> list:
    """Pre-hooks that hide the (B, L) dropped keys from decoder layers >= from_layer (eager 4-D masks)."""

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.masked_fill(dropped[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True)
            for layer in model.model.language_model.layers[from_layer:]]


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_first_stage_keeps_the_top_last_token_attention_of_the_layer_before(family):
    factory = FACTORIES[family]
    model = factory.build("eager")
    inputs = factory.inputs(model, PROMPTS, seed=2)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
        vtprune.wrap(model, "pdrop", keep=0.5)
        model(**inputs)
    first = model.vtprune.pruner.plan(len(attentions))[0].layer
    assert first == 1  # 8 of 32 on the 4-layer test LLM
    scores = attentions[first - 1].mean(1)[:, -1]  # heads averaged, the last query row: (B, L)
    stats = model.vtprune.last_stats
    for b, (sample, positions) in enumerate(zip(stats["samples"], factory.image_positions(model, inputs),
                                                strict=True)):
        for image_positions, kept in zip(positions, sample["stages"][0]["kept"], strict=True):
            assert len(kept) == round(0.5 * image_positions.numel())
            expected = scores[b, image_positions].topk(len(kept)).indices
            assert sorted(kept) == sorted(expected.tolist())


def test_second_stage_ranks_the_survivors_by_the_attention_without_the_dropped_tokens():
    factory = FACTORIES["llava"]
    model, reference = factory.build("eager"), factory.build("eager")
    inputs = factory.inputs(model, PROMPTS, seed=3)
    with torch.no_grad():
        vtprune.wrap(model, "pdrop", keep=0.5)
        model(**inputs)
    stages = model.vtprune.last_stats["samples"]
    positions = factory.image_positions(model, inputs)
    dropped = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b, sample in enumerate(stages):
        for image_positions, kept in zip(positions[b], sample["stages"][0]["kept"], strict=True):
            gone = torch.ones(image_positions.numel(), dtype=torch.bool)
            gone[kept] = False
            dropped[b, image_positions[gone]] = True
    first, second = (stage.layer for stage in model.vtprune.pruner.plan(4)[:2])
    handles = _hide_from(reference, first, dropped)
    try:
        with torch.no_grad():
            scores = reference(**inputs, output_attentions=True).attentions[second - 1].mean(1)[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    for b, sample in enumerate(stages):
        for image_positions, survivors, kept in zip(positions[b], sample["stages"][0]["kept"],
                                                    sample["stages"][1]["kept"], strict=True):
            survivors = torch.tensor(survivors)
            assert len(kept) == round(0.25 * image_positions.numel())
            expected = survivors[scores[b, image_positions[survivors]].topk(len(kept)).indices]
            assert sorted(kept) == sorted(expected.tolist())


@pytest.mark.parametrize("num_layers, expected", [(4, (1, 2, 3)), (12, (3, 6, 9)), (28, (7, 14, 21)),
                                                  (32, (8, 16, 24)), (2, (1,))])
def test_plan_scales_the_paper_stages_to_the_depth(num_layers, expected):
    assert default_layers(num_layers) == expected
    stages = PDropPruner(PDropConfig(keep=0.5)).plan(num_layers)
    assert tuple(stage.layer for stage in stages) == expected
    assert all(stage.point.kind == "llm" for stage in stages)


def test_input_budget_is_the_official_pyramid():
    # keep=0.5: the code's --image_token_ratio_list "[0.5,0.25,0.125]" at --layer_list '[8,16,24]'.
    stages = PDropPruner(PDropConfig(keep=0.5)).plan(32)
    assert [(stage.layer, stage.fraction) for stage in stages] == [(8, 0.5), (16, 0.25), (24, 0.125)]
    # The first stage keeps keep, each later one λ of what is left: the code's 0.5 by default, or the one given.
    stages = PDropPruner(PDropConfig(keep=0.4, ratio=0.3)).plan(32)
    assert [stage.fraction for stage in stages] == pytest.approx([0.4, 0.12, 0.036])
    assert stage_fractions(0.3, "input", None, (3, 6, 9), 12) == pytest.approx([0.3, 0.15, 0.075])


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("num_layers", [4, 12, 32])
def test_average_budget_solves_lambda_to_meet_keep(keep, num_layers):
    layers = default_layers(num_layers)
    fractions = [stage.fraction for stage in PDropPruner(PDropConfig(keep=keep, budget="average")).plan(num_layers)]
    lam = fractions[0]
    assert fractions == pytest.approx([lam ** (m + 1) for m in range(len(layers))])
    assert average_fraction(lam, layers, num_layers) == pytest.approx(keep, abs=1e-9)
    # The same mean, layer by layer.
    shares = [1.0] * num_layers
    for layer, fraction in zip(layers, fractions, strict=True):
        shares[layer:] = [fraction] * (num_layers - layer)
    assert sum(shares) / num_layers == pytest.approx(keep, abs=1e-9)


def test_average_budget_of_the_paper_setting_is_lambda_one_half():
    # λ = 0.5 on 8 / 16 / 24 of 32 averages (8 + 4 + 2 + 1) / 32 of the visual tokens.
    fractions = stage_fractions(15 / 32, "average", None, (8, 16, 24), 32)
    assert fractions == pytest.approx([0.5, 0.25, 0.125], abs=1e-9)


def test_infeasible_average_budget_raises():
    # The first stage sits at layer 1 of 4: that layer alone holds 1/4 of the full budget.
    with pytest.raises(ValueError, match="cannot be met with the first pdrop stage at layer 1 of 4"):
        PDropPruner(PDropConfig(keep=0.2, budget="average")).plan(4)
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="cannot be met"):
        vtprune.wrap(model, "pdrop", keep=0.25, budget="average")


@pytest.mark.parametrize("options, error, match", [
    ({"layers": ()}, ValueError, "layers=.*non-empty tuple"),
    ({"layers": (0, 2)}, ValueError, "every layer must be >= 1"),
    ({"layers": (2, 2)}, ValueError, "strictly increasing"),
    ({"layers": (3, 1)}, ValueError, "strictly increasing"),
    ({"layers": (1.5,)}, TypeError, "must hold ints"),
    ({"layers": (True,)}, TypeError, "must hold ints"),
    ({"layers": "8,16"}, ValueError, "non-empty tuple"),
    ({"ratio": 0.0}, ValueError, r"ratio=0.0 is outside \(0, 1\]"),
    ({"ratio": 1.5}, ValueError, r"ratio=1.5 is outside \(0, 1\]"),
    ({"ratio": "half"}, TypeError, "ratio must be a number"),
    ({"ratio": 0.5, "budget": "average"}, ValueError, "ratio is solved from keep under budget='average'"),
])
def test_bad_options_raise(options, error, match):
    with pytest.raises(error, match=match):
        PDropConfig(keep=0.5, **options)


def test_layers_beyond_the_model_and_too_shallow_models_raise():
    with pytest.raises(ValueError, match="name decoder layer 8, but the model has 4 decoder layers"):
        PDropPruner(PDropConfig(keep=0.5, layers=(2, 8))).plan(4)
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        default_layers(1)
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="name decoder layer 8"):
        vtprune.wrap(model, "pdrop", keep=0.5, layers=[1, 8])


def test_config_round_trips_with_layers_from_json():
    config = PDropConfig.from_dict({"method": "pdrop", "keep": 0.5, "layers": [1, 3], "ratio": 0.5})
    assert config.layers == (1, 3)
    assert PDropConfig.from_dict(config.to_dict()) == config
