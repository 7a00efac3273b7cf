"""VisionZip's own rules: the dominant tokens are the top of the vision encoder's CLS attention (checked against the
eager attention weights of a tiny LLaVA), the official 54 + 10 / 108 + 20 / 162 + 30 splits, the contextual merge
values on a hand-computed case, the no-CLS fallback, the per-family defaults, and bad arguments. The generic
properties (keep=1 identity, equivalence with feeding the kept rows, batching, counts) come from the matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import FACTORIES, Prompt

import vtprune
from vtprune.eval.tiny import tiny_llava
from vtprune.pruners import visionzip
from vtprune.pruners.visionzip import VisionZipConfig, VisionZipPruner, split_budget
from vtprune.state import ImageTokens, PruneContext


def _eager_cls_attention(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(images, P) head-mean CLS row of the vision tower's last layer, from its own eager attention weights."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_attentions=True)
    return out.attentions[-1][:, :, 0, 1:].mean(1).float()


def _kept(model) -> list[list[int]]:
    return [kept for sample in model.vtprune.last_stats["samples"] for kept in sample["stages"][0]["kept"]]


def test_dominant_tokens_are_the_top_of_the_eager_cls_attention():
    factory = FACTORIES["llava"]
    model = factory.build("eager")
    inputs = factory.inputs(model, [Prompt(images=2, prefix=2), Prompt(images=1, prefix=5)], seed=4)
    expected = _eager_cls_attention(model, inputs["pixel_values"])
    n = factory.tokens_per_image(model)
    budget = round(0.25 * n)
    with torch.no_grad():
        vtprune.wrap(model, "visionzip", keep=0.25, contextual_fraction=0.0)
        model(**inputs)
        dominant_only = _kept(model)
        vtprune.unwrap(model)
        vtprune.wrap(model, "visionzip", keep=0.25)
        model(**inputs)
        default = _kept(model)
        vtprune.unwrap(model)
    dominant, _ = split_budget(budget, VisionZipConfig().contextual_fraction)
    for row, only, both in zip(expected, dominant_only, default, strict=True):
        assert sorted(only) == sorted(row.topk(budget).indices.tolist())
        assert set(row.topk(dominant).indices.tolist()) <= set(both) and len(both) == budget


def test_official_splits_for_64_128_192_of_576(monkeypatch):
    assert [split_budget(k, VisionZipConfig().contextual_fraction) for k in (64, 128, 192)] == [
        (54, 10), (108, 20), (162, 30)
    ]
    # End to end on LLaVA-1.5's 24 x 24 geometry: keep = 64 / 576 reaches compress as 54 dominant + 10 contextual.
    model = tiny_llava("llava15", seed=0, attn_implementation="sdpa")
    inputs = FACTORIES["llava"].inputs(model, [Prompt(images=1)], seed=0)
    seen = []
    compress = visionzip.compress

    def spy(x, scores, dominant, contextual, value="code"):
        seen.append((x.shape[1], dominant, contextual))
        return compress(x, scores, dominant, contextual, value)

    monkeypatch.setattr(visionzip, "compress", spy)
    vtprune.wrap(model, "visionzip", keep=64 / 576)
    with torch.no_grad():
        model(**inputs)
    assert seen == [(576, 54, 10)]
    assert model.vtprune.config.point == "encoder" and model.vtprune.config.positions == "renumber"


def _image(features, cls_attention, budget) -> ImageTokens:
    n = features.shape[0]
    return ImageTokens(0, 0, None, torch.arange(n), None, features, budget, cls_attention)


# 8 tokens of 2 channels: dominant by CLS attention are 1 and 4; the others in index order are 0, 2, 3, 5, 6, 7;
# with c = 2 the step is 6 // 2 = 3, so the targets are 0 and 5; 2 and 3 point along token 0, 6 and 7 along 5.
FEATURES = torch.tensor(
    [[1.0, 0.0], [5.0, 5.0], [2.0, 0.1], [3.0, 0.2], [-1.0, -1.0], [0.0, 1.0], [0.1, 2.0], [0.2, 4.0]]
)
CLS = torch.tensor([0.1, 0.9, 0.0, 0.05, 0.8, 0.02, 0.03, 0.04])


@pytest.mark.parametrize(
    ("value", "targets"),
    [
        # The code: target + mean(merged).
        ("code", [[1.0 + 2.5, 0.0 + 0.15], [0.0 + 0.15, 1.0 + 3.0]]),
        # The mean over the target and its merged tokens.
        ("mean", [[6.0 / 3, 0.3 / 3], [0.3 / 3, 7.0 / 3]]),
    ],
)
def test_contextual_values_are_the_hand_computed_merges(value, targets):
    config = VisionZipConfig(keep=0.5, contextual_fraction=0.5, point="encoder", contextual_value=value)
    pruner = VisionZipPruner(config)
    selection = pruner.select(PruneContext("encoder", 4, [_image(FEATURES, CLS, 4)]))
    assert selection.keep[0].tolist() == [1, 4, 0, 5]
    expected = torch.cat((FEATURES[[1, 4]], torch.tensor(targets)))
    torch.testing.assert_close(selection.values[0], expected)


def test_a_target_without_merged_tokens_keeps_its_features():
    # c = 3 of the 6 non-dominant tokens (step 2): targets 0, 3, 6; 2 and 5 go to 0 and 6 (their direction) and 7
    # to 6, so target 3 receives nothing and stays as it is under both rules.
    features = FEATURES.clone()
    features[3] = torch.tensor([-3.0, 1.0])
    features[5] = torch.tensor([0.3, 3.0])
    for value in ("code", "mean"):
        config = VisionZipConfig(keep=0.5, contextual_fraction=0.6, point="encoder", contextual_value=value)
        selection = VisionZipPruner(config).select(PruneContext("encoder", 4, [_image(features, CLS, 5)]))
        assert selection.keep[0].tolist() == [1, 4, 0, 3, 6]
        torch.testing.assert_close(selection.values[0][3], features[3])


def test_without_a_cls_row_the_dominant_tokens_are_the_largest_norms():
    pruner = VisionZipPruner(VisionZipConfig(keep=0.5, contextual_fraction=0.0, point="projector"))
    selection = pruner.select(PruneContext("projector", 4, [_image(FEATURES, None, 3)]))
    assert selection.keep[0].tolist() == FEATURES.norm(dim=-1).argsort(descending=True)[:3].tolist()
    assert selection.values is None  # nothing merged: the kept rows go on unchanged


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_families_without_cls_prune_by_the_fallback(family, monkeypatch):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1)], seed=0)
    seen = []
    compress = visionzip.compress

    def spy(x, scores, dominant, contextual, value="code"):
        seen.append((x, scores))
        return compress(x, scores, dominant, contextual, value)

    monkeypatch.setattr(visionzip, "compress", spy)
    vtprune.wrap(model, "visionzip", keep=0.5)
    assert model.vtprune.engine.family.vision_cls_attention() is None
    with torch.no_grad():
        model(**inputs)
    assert seen
    for x, scores in seen:
        torch.testing.assert_close(scores, x.float().norm(dim=-1))


@pytest.mark.parametrize(
    ("model_type", "point", "positions"),
    [("llava", "encoder", "renumber"), ("llava_next", "encoder", "renumber"), ("internvl", "encoder", "renumber"),
     ("qwen2_vl", "projector", "original"), ("qwen2_5_vl", "projector", "original"),
     ("qwen3_vl", "projector", "original")],
)
def test_official_defaults_per_family(model_type, point, positions):
    pruner = VisionZipPruner(VisionZipConfig(keep=0.5))
    pruner.resolve(model_type)
    assert (pruner.config.point, pruner.config.positions) == (point, positions)
    # Set fields win over the family's defaults.
    pruner = VisionZipPruner(VisionZipConfig(keep=0.5, point="projector", positions="original"))
    pruner.resolve("llava")
    assert (pruner.config.point, pruner.config.positions) == ("projector", "original")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"contextual_fraction": 1.5}, ValueError, "contextual_fraction=1.5"),
        ({"contextual_fraction": -0.1}, ValueError, "contextual_fraction=-0.1"),
        ({"contextual_fraction": True}, TypeError, "contextual_fraction"),
        ({"contextual_fraction": "0.2"}, TypeError, "contextual_fraction"),
        ({"point": "llm:2"}, ValueError, "point='llm:2'"),
        ({"contextual_value": "sum"}, ValueError, "contextual_value='sum'"),
        ({"keep": 0.0}, ValueError, "keep=0.0"),
        ({"positions": "shift"}, ValueError, "positions='shift'"),
    ],
)
def test_bad_arguments_raise(options, error, match):
    with pytest.raises(error, match=match):
        VisionZipConfig(**options)


def test_unresolved_point_and_unknown_options_raise():
    with pytest.raises(ValueError, match="point is 'auto'"):
        VisionZipPruner(VisionZipConfig(keep=0.5)).plan(4)
    with pytest.raises(ValueError, match="Did you mean 'contextual_fraction'"):
        VisionZipConfig.from_dict({"method": "visionzip", "contextual_fractio": 0.2})
    config = VisionZipConfig(keep=0.25, contextual_fraction=0.2, point="encoder", contextual_value="mean")
    assert VisionZipConfig.from_dict(config.to_dict()) == config
