"""ToDRE's first pivot from the vision encoder's CLS attention: the adapters' ``cls_attention`` equals the CLS row of
the eager attention weights of the encoder's last layer (per token, packed as the features are), ``global_view``
marks the base image / thumbnail, ToDRE starts from their argmax, and families without a CLS (or methods without
the need) fall back to the token nearest to the mean (and pay for no hook)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import FACTORIES, Prompt

import vtprune
from vtprune.config import PrunerConfig
from vtprune.engine import Engine
from vtprune.point import PATTERNS
from vtprune.pruners import todre
from vtprune.pruners.base import Pruner
from vtprune.state import ImageTokens, PruneContext, Selection, Stage

CLS_FAMILIES = ["internvl", "llava", "llava_next"]
NO_CLS_FAMILIES = sorted(set(FACTORIES) - set(CLS_FAMILIES))
PROMPTS = [Prompt(images=2, prefix=2), Prompt(images=1, prefix=5)]


@dataclasses.dataclass(frozen=True)
class _SpyConfig(PrunerConfig):
    method = "image-spy"


class _Spy(Pruner):
    """Keeps everything at one point and records the context's images."""

    config_cls = _SpyConfig
    points = PATTERNS

    def __init__(self, where: str = "projector", needs: frozenset[str] = frozenset()) -> None:
        super().__init__(_SpyConfig(keep=0.5))
        self.where = where
        self.needs = needs
        self.images: list[ImageTokens] = []

    def plan(self, num_layers: int) -> list[Stage]:
        # Adaptive with no cap: the engine calls select although it keeps everything.
        return [Stage(self.where, 1.0, adaptive=True)]

    def select(self, ctx: PruneContext) -> Selection:
        self.images = ctx.images
        return Selection(keep=[torch.arange(image.num_tokens) for image in ctx.images])


def _last_vision_attention(model, family: str):
    tower = model.model.vision_tower
    return tower.encoder.layer[-1].attention if family == "internvl" else tower.encoder.layers[-1].self_attn


def _eager_cls_rows(model, family: str, inputs) -> torch.Tensor:
    """(tiles, P) head-mean CLS row of the last encoder layer's eager attention weights, CLS column dropped."""
    seen = []
    handle = _last_vision_attention(model, family).register_forward_hook(lambda m, a, out: seen.append(out[1]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    (weights,) = seen
    return weights[:, :, 0].mean(1)[:, 1:].float()


def _expected_per_image(model, factory, family: str, inputs, rows: torch.Tensor) -> list[torch.Tensor]:
    """Per image in batch order, the CLS attention of each prunable token, mapped without the adapter's code."""
    if family == "llava":
        return list(rows)
    if family == "llava_next":
        sizes = inputs["image_sizes"].tolist()
        tiles = [factory.tiled_image(*size)[0] for size in sizes]
        # transformers' own packing, without newlines, gives the order of the prunable tokens.
        packed, _ = model.model.pack_image_features(
            [t[..., None] for t in rows.split(tiles)], inputs["image_sizes"], "default", image_newline=None
        )
        return [p[:, 0] for p in packed]
    # InternVL: every token is a 2 x 2 block of ViT patches; an image is its run of tiles, in prompt order.
    side = int(rows.shape[1] ** 0.5)
    blocks = rows.reshape(-1, side // 2, 2, side // 2, 2).sum((2, 4)).flatten(1)
    counts = [p.numel() // blocks.shape[1] for sample in factory.image_positions(model, inputs) for p in sample]
    return [b.flatten() for b in blocks.split(counts)]


def _expected_global_view(factory, family: str, image: ImageTokens) -> torch.Tensor:
    view = torch.zeros(image.num_tokens, dtype=torch.bool)
    if family == "llava_next":
        view[: factory.side**2] = True  # every factory image is tiled: the base tile comes first
    elif family == "internvl" and image.num_tokens > 16:
        view[-16:] = True  # the thumbnail is the last tile
    else:
        view[:] = True
    return view


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_cls_attention_equals_the_eager_cls_row_of_the_last_encoder_layer(family, attn):
    factory = FACTORIES[family]
    reference = factory.build("eager")
    inputs = factory.inputs(reference, PROMPTS, seed=3)
    expected = _expected_per_image(reference, factory, family, inputs, _eager_cls_rows(reference, family, inputs))
    model = factory.build(attn)
    spy = _Spy("projector", frozenset({"cls_attention", "global_view"}))
    adapter = Engine(model)
    adapter.install(spy)
    with torch.no_grad():
        model(**inputs)
    adapter.remove()
    assert len(spy.images) == len(expected) == 3
    for image, want in zip(spy.images, expected, strict=True):
        assert image.cls_attention.dtype == torch.float32
        torch.testing.assert_close(image.cls_attention, want, atol=1e-5, rtol=0)
        assert image.global_view.tolist() == _expected_global_view(factory, family, image).tolist()


class _EveryOtherThenSpy(_Spy):
    """Keeps every other token at the encoder point, then records the projector point's images."""

    def plan(self, num_layers: int) -> list[Stage]:
        return [Stage("encoder", 0.5), Stage("projector", 0.5, adaptive=True)]

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.point.kind == "encoder":
            self.encoder_images = ctx.images
            return Selection(keep=[torch.arange(0, image.num_tokens, 2) for image in ctx.images])
        return super().select(ctx)


def test_cls_attention_follows_the_tokens_an_earlier_stage_kept():
    factory = FACTORIES["llava_next"]
    model = factory.build("sdpa")
    spy = _EveryOtherThenSpy(needs=frozenset({"cls_attention", "global_view"}))
    adapter = Engine(model)
    adapter.install(spy)
    with torch.no_grad():
        model(**factory.inputs(model, PROMPTS, seed=3))
    adapter.remove()
    for whole, image in zip(spy.encoder_images, spy.images, strict=True):
        assert image.original_indices.tolist() == list(range(0, whole.num_tokens, 2))
        assert torch.equal(image.cls_attention, whole.cls_attention[::2])
        assert torch.equal(image.global_view, whole.global_view[::2])


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_todre_starts_from_the_most_cls_attended_global_view_token(family, monkeypatch):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, PROMPTS, seed=5)
    contexts, pivots = [], []
    select, diversify = todre.ToDREPruner.select, todre.max_sum_diversify

    def spy_select(self, ctx):
        contexts.append(ctx)
        return select(self, ctx)

    def spy_diversify(x, count, pivot):
        pivots.append(pivot)
        return diversify(x, count, pivot)

    monkeypatch.setattr(todre.ToDREPruner, "select", spy_select)
    monkeypatch.setattr(todre, "max_sum_diversify", spy_diversify)
    vtprune.wrap(model, "todre", keep=0.25)
    with torch.no_grad():
        model(**inputs)
    stats = model.vtprune.last_stats
    vtprune.unwrap(model)
    ctx = contexts[0]
    assert str(ctx.point) == "projector"
    got = {j: int(pivot[row]) for group, pivot in zip(ctx.image_groups(), pivots, strict=True)
           for row, j in enumerate(group)}
    kept = [k for sample in stats["samples"] for k in sample["stages"][0]["kept"]]
    for j, image in enumerate(ctx.images):
        attention = image.cls_attention.masked_fill(~image.global_view, -1.0)
        assert got[j] == int(attention.argmax())
        assert bool(image.global_view[got[j]])
        assert int(image.original_indices[got[j]]) in kept[j]


@pytest.mark.parametrize("family", NO_CLS_FAMILIES)
def test_todre_without_a_cls_token_starts_at_the_seeded_random_token(family, monkeypatch):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    prompts = [Prompt(images=1, videos=1), Prompt(images=2)]
    inputs = factory.inputs(model, prompts, seed=2)
    calls = []
    diversify = todre.max_sum_diversify

    def spy_diversify(x, count, pivot):
        calls.append((x, pivot))
        return diversify(x, count, pivot)

    monkeypatch.setattr(todre, "max_sum_diversify", spy_diversify)
    vtprune.wrap(model, "todre", keep=0.25)
    assert model.vtprune.engine.family.vision_cls_attention() is None
    with torch.no_grad():
        model(**inputs)
    vtprune.unwrap(model)
    assert calls
    for x, pivot in calls:
        assert torch.equal(pivot, todre.random_pivot(x.shape[0], x.shape[1], 0, x.device))


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_methods_without_the_need_register_no_vision_hook(family):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    attention = _last_vision_attention(model, family)
    before = len(attention._forward_pre_hooks)
    spy = _Spy("projector")
    adapter = Engine(model)
    adapter.install(spy)
    assert len(attention._forward_pre_hooks) == before
    with torch.no_grad():
        model(**factory.inputs(model, PROMPTS, seed=1))
    adapter.remove()
    assert "cls_attention" not in adapter.captured
    assert all(image.cls_attention is None and image.global_view is None for image in spy.images)
    # ToDRE's hook comes with wrap and goes with unwrap.
    vtprune.wrap(model, "todre", keep=0.5)
    assert len(attention._forward_pre_hooks) == before + 1
    vtprune.unwrap(model)
    assert len(attention._forward_pre_hooks) == before


def test_llm_stages_get_no_cls_attention():
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    spy = _Spy("llm:1", frozenset({"cls_attention", "global_view"}))
    adapter = Engine(model)
    adapter.install(spy)
    with torch.no_grad():
        model(**factory.inputs(model, PROMPTS, seed=1))
    adapter.remove()
    assert spy.images and all(im.cls_attention is None and im.global_view is None for im in spy.images)


def test_unknown_needs_raise():
    model = FACTORIES["llava"].build("sdpa")
    adapter = Engine(model)
    with pytest.raises(ValueError, match="cls_atention"):
        adapter.install(_Spy("projector", frozenset({"cls_atention"})))


def test_first_pivot_falls_back_where_no_global_view_token_is_left():
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(3, 10, 8, generator=gen), dim=-1)
    attention = torch.rand(3, 10, generator=gen)
    view = torch.zeros(3, 10, dtype=torch.bool)
    view[0, 5:] = True
    images = [
        ImageTokens(0, 0, None, torch.arange(10), None, x[0], 3, attention[0], view[0]),
        ImageTokens(1, 0, None, torch.arange(10), None, x[1], 3, attention[1], view[1]),  # no view token left
        ImageTokens(2, 0, None, torch.arange(10), None, x[2], 3, None, None),  # no CLS row
    ]
    pivot = todre.first_pivot(x, images)
    fallback = int(todre.random_pivot(1, 10, 0, x.device)[0])
    assert pivot.tolist() == [5 + int(attention[0, 5:].argmax()), fallback, fallback]
    # A CLS row without a global view: every token is a candidate.
    images[1].global_view = None
    assert int(todre.first_pivot(x, images)[1]) == int(attention[1].argmax())
    # The other rules ignore the CLS row.
    assert todre.first_pivot(x, images, "center").tolist() == todre.nearest_to_mean(x).tolist()
    assert todre.first_pivot(x, images, "random", seed=3).tolist() == [int(todre.random_pivot(1, 10, 3, "cpu")[0])] * 3


def test_random_pivot_is_seeded_and_depends_on_the_token_count_only():
    picks = {int(todre.random_pivot(1, 576, seed, "cpu")[0]) for seed in range(20)}
    assert len(picks) > 10  # different seeds pick different tokens
    assert todre.random_pivot(4, 576, 7, "cpu").tolist() == [int(todre.random_pivot(1, 576, 7, "cpu")[0])] * 4
    with pytest.raises(ValueError, match="pivot='mean'"):
        todre.ToDREConfig(pivot="mean")
