"""SparseVLM: the first stage keeps the top of the raters' attention (raters, scores and rank recomputed here from
eager ``output_attentions`` and ``output_hidden_states``), recycled tokens become cluster means in dropped slots,
the plan scales the code's 2 / 6 / 15 of 32 and its counts, bad options raise.

The registry-driven matrix (tests/test_equivalence.py) already checks keep=1 identity, the staged reference (with the
written values), batches and kept counts for every family; these tests cover what is SparseVLM's own.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.budget import layer_mean
from vtprune.pruners.sparsevlm import (
    SparseVLMConfig,
    SparseVLMPruner,
    default_layers,
    dpc_knn_merge,
    split_budget,
)

from .conftest import FACTORIES, Prompt

PROMPTS = [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5)]


def _expected_first_stage(model, inputs, positions, layer: int):
    """Per sample and image: (scores (n,), rank) from the raters of the hidden states entering layer ``layer`` + 1
    and the head-mean attention of layer ``layer``, computed from the eager outputs."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    hidden, attention = out.hidden_states[layer + 1].float(), out.attentions[layer].float().mean(1)
    real = inputs["attention_mask"].bool()
    expected = []
    for b, images in enumerate(positions):
        visual = torch.cat(images)
        text = real[b].clone()
        text[visual] = False
        text[: int(visual.min()) + 1] = False  # the text after the image
        candidates = text.nonzero().squeeze(1)
        relevance = (hidden[b, visual] @ hidden[b, candidates].T).softmax(dim=-1).mean(dim=0)
        raters = candidates[relevance > relevance.mean()]
        relations = [attention[b, raters][:, p] for p in images]
        expected.append([(rel.mean(0), int(torch.linalg.matrix_rank(rel))) for rel in relations])
    return expected


def test_first_stage_keeps_the_top_rater_attention_and_recycles_into_dropped_slots():
    factory = FACTORIES["llava"]
    model = factory.build("eager")
    inputs = factory.inputs(model, PROMPTS, seed=2)
    positions = factory.image_positions(model, inputs)
    scale = 1.0  # small, so that the rank (not the budget) sets the count
    with torch.no_grad():
        vtprune.wrap(model, "sparsevlm", keep=0.5, scale=scale, bias=0.0)
        model(**inputs)
    layer = model.vtprune.pruner.config.layers or default_layers(4)
    assert layer == (1, 2)
    stats = model.vtprune.last_stats
    expected = _expected_first_stage(model, inputs, positions, layer[0])
    for b, sample in enumerate(stats["samples"]):
        written = model.vtprune.engine.last_stats.written_values(b, stage=0)
        for j, (kept, (scores, rank)) in enumerate(zip(sample["stages"][0]["kept"], expected[b], strict=True)):
            n = scores.numel()
            top = min(int(rank * scale), n - 1)
            dropped = n - top
            recycled = min(dropped, int(dropped * 0.3) + 1)
            clusters = int(recycled / 10) + 1
            total = min(round(0.5 * n), top + clusters)
            k, c = split_budget(total, n, SparseVLMConfig(keep=0.5))
            assert len(kept) == k + c
            order = torch.argsort(scores, descending=True, stable=True)
            assert set(order[:k].tolist()) <= set(kept)
            # The compact tokens sit in the slots of recycled (best-scored dropped) tokens.
            assert set(kept) - set(order[:k].tolist()) <= set(order[k:k + recycled].tolist())
            assert written is not None and written[j].shape[0] == len(kept)


def test_without_recycling_the_fixed_counts_keep_the_top_of_the_scores():
    factory = FACTORIES["llava"]
    model = factory.build("eager")
    inputs = factory.inputs(model, PROMPTS, seed=3)
    positions = factory.image_positions(model, inputs)
    with torch.no_grad():
        vtprune.wrap(model, "sparsevlm", keep=0.5, counts="fixed", recycle=False)
        model(**inputs)
    expected = _expected_first_stage(model, inputs, positions, default_layers(4)[0])
    stats = model.vtprune.engine.last_stats
    assert all(stage.values is None for stage in stats.stages)
    for b, sample in enumerate(stats.as_dict()["samples"]):
        for kept, (scores, _) in zip(sample["stages"][0]["kept"], expected[b], strict=True):
            assert len(kept) == round(0.5 * scores.numel())
            assert sorted(kept) == sorted(scores.topk(len(kept)).indices.tolist())


def test_cluster_means_of_separated_groups():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    x = torch.cat([c + 0.1 * torch.randn(5, 3) for c in centres])
    merged, picked = dpc_knn_merge(x, 3)
    means = torch.stack([x[5 * g:5 * g + 5].mean(0) for g in range(3)])
    for row in means:
        assert torch.cdist(row[None], merged).min() < 1e-5
    assert sorted(int(p) // 5 for p in picked) == [0, 1, 2]


@pytest.mark.parametrize("num_layers, expected", [(4, (1, 2)), (12, (1, 2, 6)), (28, (2, 5, 13)), (32, (2, 6, 15))])
def test_plan_scales_the_code_layers_and_drops_after_them(num_layers, expected):
    assert default_layers(num_layers) == expected
    stages = SparseVLMPruner(SparseVLMConfig(keep=0.5)).plan(num_layers)
    assert tuple(stage.layer for stage in stages) == tuple(layer + 1 for layer in expected)
    assert all(stage.point.kind == "llm" and stage.adaptive for stage in stages)
    fixed = SparseVLMPruner(SparseVLMConfig(keep=0.5, counts="fixed")).plan(num_layers)
    assert not any(stage.adaptive for stage in fixed)


def test_input_budget_of_the_192_setting_is_the_code_counts():
    # The code's 300 / 200 / 110 top-k of 576 plus its compact tokens: 309 / 204 / 113 present after each stage.
    stages = SparseVLMPruner(SparseVLMConfig(keep=309 / 576, counts="fixed")).plan(32)
    present = [round(stage.fraction * 576) for stage in stages]
    assert present == [309, 204, 113]
    assert [split_budget(t, n, SparseVLMConfig()) for t, n in zip(present, [576, *present], strict=False)] == [
        (300, 9), (200, 4), (110, 3)]
    without = SparseVLMPruner(SparseVLMConfig(keep=300 / 576, counts="fixed", recycle=False)).plan(32)
    assert [round(stage.fraction * 576) for stage in without] == [300, 200, 110]


# 64 of 576 is below the 2 / 12 layers a 12-layer model runs before its first drop.
@pytest.mark.parametrize("keep, num_layers", [(128 / 576, 12), (192 / 576, 12), (0.6, 12), (64 / 576, 32),
                                              (128 / 576, 32), (192 / 576, 32), (0.6, 32)])
def test_average_budget_meets_keep(keep, num_layers):
    stages = SparseVLMPruner(SparseVLMConfig(keep=keep, budget="average")).plan(num_layers)
    fractions = [stage.fraction for stage in stages]
    assert fractions == sorted(fractions, reverse=True)
    assert layer_mean(fractions, tuple(stage.layer for stage in stages), num_layers) == pytest.approx(keep, abs=1e-9)


def test_infeasible_average_budget_raises():
    with pytest.raises(ValueError, match="cannot be met with the first sparsevlm drop at layer 2 of 4"):
        SparseVLMPruner(SparseVLMConfig(keep=0.4, budget="average")).plan(4)


@pytest.mark.parametrize("options, error, match", [
    ({"layers": ()}, ValueError, "layers=.*non-empty tuple"),
    ({"layers": (-1, 2)}, ValueError, "every layer must be >= 0"),
    ({"layers": (2, 2)}, ValueError, "strictly increasing"),
    ({"layers": (1.5,)}, TypeError, "must hold ints"),
    ({"layers": "2,6"}, ValueError, "non-empty tuple"),
    ({"counts": "auto"}, ValueError, "counts='auto' is not one of"),
    ({"scale": 0.0}, ValueError, "scale=0.0 must be > 0"),
    ({"scale": "big"}, TypeError, "scale must be a number"),
    ({"bias": 1.0, "counts": "fixed"}, ValueError, "needs counts='rank'"),
    ({"recycle": 1}, TypeError, "recycle must be True or False"),
    ({"recycle_ratio": 1.5}, ValueError, r"recycle_ratio=1.5 is outside \[0, 1\]"),
    ({"cluster_size": 0}, ValueError, "cluster_size=0 must be at least 1"),
    ({"cluster_size": 2.5}, TypeError, "cluster_size must be an int"),
])
def test_bad_options_raise(options, error, match):
    with pytest.raises(error, match=match):
        SparseVLMConfig(keep=0.5, **options)


def test_layers_beyond_the_model_and_too_shallow_models_raise():
    with pytest.raises(ValueError, match="name decoder layer 3, but the tokens are dropped from the layer after it"):
        SparseVLMPruner(SparseVLMConfig(keep=0.5, layers=(1, 3))).plan(4)
    with pytest.raises(ValueError, match="at least 3 decoder layers"):
        default_layers(2)
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="name decoder layer 3"):
        vtprune.wrap(model, "sparsevlm", keep=0.5, layers=[1, 3])


def test_config_round_trips_from_json():
    config = SparseVLMConfig.from_dict({"method": "sparsevlm", "keep": 0.5, "layers": [1, 2], "scale": 2.0})
    assert config.layers == (1, 2)
    assert SparseVLMConfig.from_dict(config.to_dict()) == config
