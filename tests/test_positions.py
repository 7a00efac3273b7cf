"""positions="renumber": survivors of a drop before the LLM get the positions the model gives the shorter prompt,
so a pruned run equals the unwrapped model fed only the kept tokens at their default positions (prefill and greedy
decode), batched or alone; M-RoPE families and in-LLM-only plans refuse it with a clear error."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

import vtprune
from vtprune.registry import get_adapter_class

from .conftest import FACTORIES, Prompt
from .test_equivalence import _dropped, _greedy, _llm_inputs

ONE_AXIS = sorted(f for f in FACTORIES if not get_adapter_class(f).multi_axis_positions)
MULTI_AXIS = sorted(f for f in FACTORIES if get_adapter_class(f).multi_axis_positions)
STEPS = 5


def _reference_greedy(model, embeds: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of the unwrapped LLM fed ``embeds`` (1, M, D) as its whole prompt, default positions."""
    lm = model.model.language_model
    cache = DynamicCache(config=model.config.get_text_config())
    # transformers 5.24 renamed past_key_values to cache.
    key = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    out = lm(inputs_embeds=embeds, use_cache=True, **{key: cache})
    tokens, logits = [], []
    for _ in range(steps):
        step_logits = model.lm_head(out.last_hidden_state[:, -1])
        token = step_logits.argmax(-1)
        tokens.append(token)
        logits.append(step_logits)
        out = lm(inputs_embeds=model.get_input_embeddings()(token[:, None]), use_cache=True, **{key: cache})
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("method", ["uniform", "random"])
@pytest.mark.parametrize("family", ONE_AXIS)
def test_renumbered_generation_equals_feeding_only_the_kept_tokens(family, method):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=2, prefix=3)], seed=4)
    with torch.no_grad():
        embeds = _llm_inputs(model, inputs)["inputs_embeds"]
        vtprune.wrap(model, method, keep=0.25, positions="renumber")
        tokens, logits = _greedy(model, inputs, steps=STEPS)
        keep = ~_dropped(factory, model, inputs, model.vtprune.last_stats)[0]
        vtprune.unwrap(model)
        ref_tokens, ref_logits = _reference_greedy(model, embeds[:, keep], STEPS)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", ONE_AXIS)
def test_renumbered_differs_from_original_positions(family):
    """The option acts: the same kept tokens at renumbered positions give other logits than at original ones."""
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=2, prefix=3)], seed=4)
    got = {}
    with torch.no_grad():
        for positions in ("original", "renumber"):
            vtprune.wrap(model, "uniform", keep=0.25, positions=positions)
            got[positions] = model(**inputs).logits[:, -1]
            vtprune.unwrap(model)
    assert not torch.allclose(got["original"], got["renumber"], atol=1e-4)


@pytest.mark.parametrize("family", ONE_AXIS)
def test_renumbered_batch_equals_each_prompt_alone(family):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    prompts = [Prompt(images=1, prefix=1), Prompt(images=2, prefix=6, suffix=2), Prompt(images=1, prefix=9)]
    batch = factory.inputs(model, prompts, seed=7)
    with torch.no_grad():
        # An LLM stage after the renumbered entry drop keeps the positions its rows had.
        vtprune.wrap(model, "apet", keep=0.25, budget="average", positions="renumber")
        tokens, logits = _greedy(model, batch, steps=4)
        for b in range(len(prompts)):
            alone_tokens, alone_logits = _greedy(model, factory.sample_inputs(batch, prompts, b), steps=4)
            torch.testing.assert_close(alone_logits[0], logits[b], atol=1e-4, rtol=0)
            assert torch.equal(alone_tokens[0], tokens[b])


@pytest.mark.parametrize("family", MULTI_AXIS)
def test_renumber_is_refused_on_multi_axis_positions(family):
    model = FACTORIES[family].build("sdpa")
    with pytest.raises(ValueError, match="M-RoPE.*positions='original'"):
        vtprune.wrap(model, "uniform", keep=0.25, positions="renumber")
    assert not vtprune.is_wrapped(model)


def test_renumber_is_refused_for_a_plan_without_a_drop_before_the_llm():
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="renumbers the survivors of a drop before the LLM.*llm:2"):
        vtprune.wrap(model, "uniform", keep=0.25, where="llm:2", positions="renumber")
    with pytest.raises(ValueError, match=r"positions='sideways' is not one of \['original', 'renumber', 'auto'\]"):
        vtprune.wrap(model, "uniform", keep=0.25, positions="sideways")
