"""What the equivalence matrix does not pin down for the tiled families, LLaVA-NeXT / LLaVA-OneVision (AnyRes) and
InternVL: newline tokens are layout and never dropped, ``keep`` applies per image across its tiles, multi-image
prompts, the features a pruner sees are those of the tokens it drops, beam search, and ``unwrap``."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import FACTORIES, Prompt
from test_equivalence import _dropped, _llm_inputs, _masked_reference

import vtprune
from vtprune.budget import kept_count
from vtprune.point import Point

ANYRES = ["llava_next", "llava_onevision"]
FAMILIES = ["internvl", *ANYRES]


def _visual(model, input_ids: torch.Tensor) -> torch.Tensor:
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", model.config.image_token_id)]
    return torch.isin(input_ids, torch.tensor(ids))


def _prunable(factory, model, inputs) -> torch.Tensor:
    """(B, L) True at the positions the factory says images list (newlines excluded)."""
    mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b, positions in enumerate(factory.image_positions(model, inputs)):
        for p in positions:
            mask[b, p] = True
    return mask


def _spy(model) -> list:
    """Contexts the wrapped model's pruner is asked to select from."""
    seen = []
    pruner = model.vtprune.pruner
    select = pruner.select
    pruner.select = lambda ctx: (seen.append(ctx), select(ctx))[1]
    return seen


@pytest.mark.parametrize("family", ANYRES)
def test_factory_layout_matches_the_models_newlines(family):
    # The model itself marks its newline slots: they hold image_newline verbatim. The factories' layouts, which the
    # other tests use as their oracle, must leave out exactly those.
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    prompts = [Prompt(images=1), Prompt(images=2, videos=1), Prompt(images=1, prefix=5), Prompt(images=3)]
    inputs = factory.inputs(model, prompts, seed=4)
    with torch.no_grad():
        embeds = _llm_inputs(model, inputs)["inputs_embeds"]
    newline = (embeds == model.model.image_newline).all(-1)
    visual = _visual(model, inputs["input_ids"])
    prunable = _prunable(factory, model, inputs)
    assert newline.any()
    assert torch.equal(visual & newline, visual & ~prunable)
    assert not (prunable & ~visual).any()


@pytest.mark.parametrize("where", ["encoder", "projector", "llm:0", "llm:2"])
@pytest.mark.parametrize("prompt", [Prompt(images=1), Prompt(images=2, videos=1)], ids=["tiled", "multi"])
@pytest.mark.parametrize("family", ANYRES)
def test_newline_tokens_are_never_dropped(family, prompt, where):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [prompt], seed=5)
    layer = Point.parse(where).layer
    seen = {}
    with torch.no_grad():
        vtprune.wrap(model, "uniform", keep=0.1, where=where)
        # Registered after wrap, so it sees the layer's kwargs once vtprune has pruned them.
        handle = model.model.language_model.layers[layer].register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(positions=kwargs["position_ids"][0]), with_kwargs=True
        )
        model(**inputs)
        handle.remove()
    # A single unpadded prompt in a plain forward: position ids are the original indices, and survivors keep theirs.
    kept = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
    kept[seen["positions"]] = True
    prunable = _prunable(factory, model, inputs)[0]
    layout = _visual(model, inputs["input_ids"])[0] & ~prunable
    assert layout.any() and kept[layout].all()
    assert kept[~_visual(model, inputs["input_ids"])[0]].all()
    sample = model.vtprune.last_stats["samples"][0]
    assert sample["visual_tokens"] == int(prunable.sum())
    assert sample["tokens_per_layer"][layer] == int((kept & prunable).sum())
    assert int((kept & prunable).sum()) == sum(len(k) for k in sample["stages"][-1]["kept"])
    assert int((kept & prunable).sum()) < int(prunable.sum())


@pytest.mark.parametrize("method", ["uniform", "random"])
def test_internvl_keep_applies_per_image_across_its_tiles(method):
    factory = FACTORIES["internvl"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=3)], seed=1)
    tiles = [p.numel() // 16 for p in factory.image_positions(model, inputs)[0]]
    assert tiles == [3, 5, 4]
    with torch.no_grad():
        vtprune.wrap(model, method, keep=0.25, where="projector")
        contexts = _spy(model)
        model(**inputs)
    assert [image.grid for image in contexts[0].images] == [(4 * t, 4) for t in tiles]
    kept = model.vtprune.last_stats["samples"][0]["stages"][0]["kept"]
    assert [len(k) for k in kept] == [kept_count(0.25, 16 * t) for t in tiles]
    if method == "uniform":
        # The lattice spreads over the stacked tiles: every tile, the thumbnail included, keeps some tokens.
        assert [sorted({i // 16 for i in k}) for k in kept] == [list(range(t)) for t in tiles]


@pytest.mark.parametrize("family", ANYRES)
def test_anyres_keep_applies_per_image_across_base_and_tiles(family):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1)], seed=1)
    (positions,) = factory.image_positions(model, inputs)[0]
    base = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert positions.numel() > base
    with torch.no_grad():
        vtprune.wrap(model, "uniform", keep=0.25, where="llm:0")
        contexts = _spy(model)
        model(**inputs)
    # A tiled image has no single raster: base and cropped grid differ in width.
    assert contexts[0].images[0].grid is None
    (kept,) = model.vtprune.last_stats["samples"][0]["stages"][0]["kept"]
    assert len(kept) == kept_count(0.25, positions.numel())
    assert min(kept) < base <= max(kept)


@pytest.mark.parametrize("where", ["projector", "llm:2", "decode:2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_multi_image_prompts_equal_masked_reference(family, where):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    reference_model = factory.build("eager")
    prompts = [Prompt(images=3, prefix=2, videos=1), Prompt(images=1, prefix=4), Prompt(images=2, suffix=1)]
    inputs = factory.inputs(model, prompts, seed=6)
    point = Point.parse(where)
    layer = point.layer
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        vtprune.wrap(model, "random", keep=0.3, where=where)
        out = model.generate(**inputs, **kwargs)
        stats = model.vtprune.last_stats
        entries = [len(p) for p in factory.image_positions(model, inputs)]
        assert [len(s["stages"][-1]["kept"]) for s in stats["samples"]] == entries
        dropped = _dropped(factory, model, inputs, stats)
        handles = _masked_reference(reference_model, layer, dropped, point.kind == "decode")
        ref = reference_model.generate(**inputs, **kwargs)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), atol=1e-4, rtol=0)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_projector_features_are_those_of_the_tokens(family):
    # The re-packed projector output (unpad, down-sizing, video pooling) must be what the LLM receives at each
    # listed position.
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2, videos=1, prefix=1)], seed=2)
    with torch.no_grad():
        embeds = _llm_inputs(model, inputs)["inputs_embeds"]
        vtprune.wrap(model, "random", keep=0.5, where="projector")
        contexts = _spy(model)
        model(**inputs)
    images = contexts[0].images
    positions = [p for sample in factory.image_positions(model, inputs) for p in sample]
    assert len(images) == len(positions)
    for image, p in zip(images, positions, strict=True):
        torch.testing.assert_close(image.features, embeds[image.sample, p], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "family, prompt",
    [
        ("internvl", Prompt(images=2, videos=1)),
        ("llava_next", Prompt(images=2)),
        ("llava_onevision", Prompt(images=2)),
    ],
)
def test_encoder_features_project_onto_the_tokens(family, prompt):
    # Where the model does not interpolate after its projector (not OneVision's down-sized grids and pooled
    # video), projecting the encoder-point features gives the LLM's input exactly.
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [prompt], seed=3)
    with torch.no_grad():
        embeds = _llm_inputs(model, inputs)["inputs_embeds"]
        vtprune.wrap(model, "random", keep=0.5, where="encoder")
        contexts = _spy(model)
        model(**inputs)
        adapter = model.vtprune.engine
        projected = [adapter.family.project(image.features) for image in contexts[0].images]
    for features, p in zip(projected, factory.image_positions(model, inputs)[0], strict=True):
        torch.testing.assert_close(features, embeds[0, p], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_at_llm_layer(family):
    # generate expands every prompt for its beams (from transformers 5.18 it repeats the already encoded images);
    # each expanded row must get its own prompt's layout.
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    reference_model = factory.build("eager")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=1, prefix=6)], seed=8)
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        vtprune.wrap(model, "random", keep=0.3, where="llm:2")
        tokens = model.generate(**inputs, **kwargs)
        stats = model.vtprune.last_stats
        assert len(stats["samples"]) == 4
        assert stats["samples"][0]["stages"] == stats["samples"][1]["stages"]
        expanded = {key: value.repeat_interleave(2, dim=0) for key, value in inputs.items()}
        handles = _masked_reference(reference_model, 2, _dropped(factory, model, expanded, stats), False)
        ref_tokens = reference_model.generate(**inputs, **kwargs)
        for handle in handles:
            handle.remove()
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", ANYRES)
def test_unwrap_removes_the_image_call_recorder(family):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    signature = inspect.signature(model.model.get_image_features)
    inputs = factory.inputs(model, [Prompt(images=1)], seed=0)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
        vtprune.wrap(model, "random", keep=1.0, where="llm:0")
        # generate() filters what it passes to get_image_features by its signature: the recorder keeps it.
        assert "get_image_features" in vars(model.model)
        assert inspect.signature(model.model.get_image_features) == signature
        assert torch.equal(model.generate(**inputs, **kwargs), expected)
        vtprune.unwrap(model)
        assert "get_image_features" not in vars(model.model)
        assert torch.equal(model.generate(**inputs, **kwargs), expected)
