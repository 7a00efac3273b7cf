"""DART keeps, per image, its largest-norm visual pivots and, pivot by pivot, the tokens least cosine-similar to
each image and text pivot, as a plain per-image loop over the hidden states entering decoder layer K computes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtprune

from .conftest import FACTORIES, Prompt

LAYER = 2  # the official K: the hidden states entering decoder layer 2


def _layer_input(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) hidden states entering decoder layer LAYER of the unwrapped model, and (B, L) L1 norms of layer
    LAYER-1's post-RoPE keys, all heads concatenated (read from the model's own cache)."""
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = model.model.language_model.layers[LAYER].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
    finally:
        handle.remove()
    keys = out.past_key_values.layers[LAYER - 1].keys.float()  # (B, Hkv, L, Dh)
    return captured["hidden"].float(), keys.transpose(1, 2).flatten(2).abs().sum(-1)


def _reference(hidden, norms, image, text, budget, image_pivots=4, text_pivots=4):
    """The rule, token by token: (L, D) hidden states and (L,) pivot norms of one sample, (n,) image positions, (T,)
    text positions after the image -> the kept indices into the image's tokens."""
    pivots = norms[image].topk(min(image_pivots, budget)).indices.tolist()
    text_top = norms[text].topk(min(text_pivots, len(text))).indices.tolist()
    pivot_vectors = [hidden[image[i]] for i in pivots] + [hidden[text[i]] for i in text_top]
    kept = list(pivots)
    remaining = budget - len(pivots)
    count = len(pivot_vectors)
    shares = [remaining // count + (p < remaining % count) for p in range(count)]
    for vector, share in zip(pivot_vectors, shares, strict=True):
        candidates = [i for i in range(len(image)) if i not in kept]
        cosine = [F.cosine_similarity(vector, hidden[image[i]], dim=0).item() for i in candidates]
        ranked = sorted(range(len(candidates)), key=lambda c: cosine[c])
        kept += [candidates[c] for c in ranked[:share]]
    return sorted(kept)


@pytest.mark.parametrize(("family", "keep", "text_pivots", "source"),
                         [("llava", 0.25, 4, "keys"), ("llava", 0.05, 4, "keys"), ("llava", 0.4, 0, "keys"),
                          ("internvl", 0.3, 4, "keys"), ("llava", 0.25, 4, "hidden")])
def test_dart_keeps_the_tokens_least_duplicated_with_the_pivots(family, keep, text_pivots, source):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5, suffix=2)], seed=3)
    hidden, key_norms = _layer_input(model, inputs)
    norms = key_norms if source == "keys" else hidden.abs().sum(-1)
    vtprune.wrap(model, "dart", keep=keep, pivot_text_tokens=text_pivots, pivot_source=source)
    with torch.no_grad():
        model(**inputs)
    stats = model.vtprune.last_stats
    is_text = inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)
    all_positions = factory.image_positions(model, inputs)
    for b, (sample, positions) in enumerate(zip(stats["samples"], all_positions, strict=True)):
        for image, kept in zip(positions, sample["stages"][0]["kept"], strict=True):
            text = [p for p in range(int(image.max()) + 1, hidden.shape[1]) if is_text[b, p]]
            expected = _reference(hidden[b], norms[b], image, torch.tensor(text, dtype=torch.long), len(kept),
                                  text_pivots=text_pivots)
            assert sorted(kept) == expected


def test_dart_keeps_the_budget_with_fewer_text_tokens_than_pivots():
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    # Two text tokens after the image: the shares of the missing text pivots go to the others.
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2, suffix=0)], seed=1)
    hidden, key_norms = _layer_input(model, inputs)
    vtprune.wrap(model, "dart", keep=0.3)
    with torch.no_grad():
        model(**inputs)
    kept = model.vtprune.last_stats["samples"][0]["stages"][0]["kept"][0]
    image = factory.image_positions(model, inputs)[0][0]
    text = torch.arange(int(image.max()) + 1, hidden.shape[1])
    assert len(text) == 2 and len(kept) == round(0.3 * len(image))
    assert sorted(kept) == _reference(hidden[0], key_norms[0], image, text, len(kept))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"where": "llm:0"}, ValueError, "llm:K' with K >= 1"),
        ({"where": "projector"}, ValueError, "llm:K' with K >= 1"),
        ({"pivot_image_tokens": 0}, ValueError, "pivot_image_tokens=0 must be >= 1"),
        ({"pivot_text_tokens": -1}, ValueError, "pivot_text_tokens=-1 must be >= 0"),
        ({"pivot_text_tokens": 2.0}, TypeError, "pivot_text_tokens must be an int"),
        ({"pivot_image_tokens": True}, TypeError, "pivot_image_tokens must be an int"),
        ({"pivot_norm": "cosine"}, ValueError, "pivot_norm='cosine' is not one of"),
        ({"pivot_source": "values"}, ValueError, "pivot_source='values' is not one of"),
    ],
)
def test_dart_refuses_bad_arguments(options, error, match):
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(error, match=match):
        vtprune.wrap(model, "dart", keep=0.5, **options)
