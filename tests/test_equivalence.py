"""The equivalence matrix: every registered method x every registered family x every insertion point it takes.

A pruned model must compute exactly what the unpruned model computes when the dropped tokens are invisible:
- keep=1.0 equals the unwrapped model;
- pruning before the LLM equals the LLM fed only the kept features at their original positions;
- pruning at llm:K (or evicting at decode:K) equals the unpruned model with the dropped keys masked from layer K on,
  for the prefill logits and 8 greedy decode steps;
- a left-padded batch of different prompts equals each prompt alone;
- the kept counts follow the budget, and last_stats agrees with itself.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FACTORIES, Prompt

import vtprune
from vtprune.budget import kept_count, stage_fraction
from vtprune.config import parse_where
from vtprune.registry import get_pruner_class

ATOL = 2e-5


def _points(method: str) -> list[str]:
    config_cls = get_pruner_class(method).config_cls
    if "where" in {f.name for f in dataclasses.fields(config_cls)}:
        return ["encoder", "projector", "llm:0", "llm:2", "decode:2"]
    return [None]


CASES = [
    (method, family, where)
    for method in vtprune.list_methods()
    for family in vtprune.list_models()
    for where in _points(method)
]


def _options(where: str | None, **extra) -> dict:
    return {**({"where": where} if where else {}), **extra}


def _case_id(case) -> str:
    return "-".join(str(part) for part in case)


def _llm_inputs(model, inputs) -> dict:
    """What an unwrapped model hands its LLM: inputs_embeds with every visual feature scattered in, position ids
    (None where the LLM builds them itself) and per-token extras (Qwen3-VL's deepstack features)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    keys = ("inputs_embeds", "position_ids", "visual_pos_masks", "deepstack_visual_embeds")
    return {key: seen.get(key) for key in keys}


def _kept_llm_inputs(llm_inputs: dict, keep: torch.Tensor) -> dict:
    """The LLM inputs of a batch of one restricted to the (L,) kept positions, which keep their original positions."""
    positions = llm_inputs["position_ids"]
    kept = {
        "inputs_embeds": llm_inputs["inputs_embeds"][:, keep],
        "position_ids": torch.arange(keep.numel())[keep][None] if positions is None else positions[..., keep],
    }
    visual = llm_inputs["visual_pos_masks"]
    if visual is not None:
        # One deepstack row per visual token, in sequence order.
        rows = visual[0].cumsum(0)[keep & visual[0]] - 1
        kept["visual_pos_masks"] = visual[:, keep]
        kept["deepstack_visual_embeds"] = [level[rows] for level in llm_inputs["deepstack_visual_embeds"]]
    return kept


def _dropped(factory, model, inputs, stats, stage_index: int = -1) -> torch.Tensor:
    """(B, L) True where a visual token was dropped by the given stage (cumulative)."""
    positions = factory.image_positions(model, inputs)
    dropped = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b, sample in enumerate(stats["samples"]):
        kept = sample["stages"][stage_index]["kept"]
        for image_positions, image_kept in zip(positions[b], kept, strict=True):
            mask = torch.ones(image_positions.numel(), dtype=torch.bool)
            mask[torch.tensor(image_kept, dtype=torch.long)] = False
            dropped[b, image_positions[mask]] = True
    return dropped


def _masked_reference(model, from_layer: int, dropped: torch.Tensor, decode_only: bool):
    """Hooks that hide the dropped keys from decoder layers >= from_layer (eager 4-D masks only)."""
    handles = []
    orig_len = dropped.shape[1]

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        q_len = (args[0] if args else kwargs["hidden_states"]).shape[1]
        if decode_only and q_len > 1:
            return None
        kv_len = mask.shape[-1]
        hide = torch.zeros(dropped.shape[0], kv_len, dtype=torch.bool)
        hide[:, :orig_len] = dropped
        kwargs["attention_mask"] = mask.masked_fill(hide[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    for layer in model.model.language_model.layers[from_layer:]:
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _greedy(model, inputs, steps: int = 8):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_keep_one_equals_unwrapped(case, attn):
    method, family, where = case
    factory = FACTORIES[family]
    model = factory.build(attn)
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2, prefix=1)])
    with torch.no_grad():
        expected = model(**inputs).logits
        vtprune.wrap(model, method, keep=1.0, **_options(where))
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] in ("encoder", "projector", "llm:0", None)], ids=_case_id)
def test_pruning_before_llm_equals_feeding_kept_features(case):
    method, family, where = case
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=2, videos=1)], seed=3)
    with torch.no_grad():
        llm_inputs = _llm_inputs(model, inputs)
        vtprune.wrap(model, method, keep=0.25, **_options(where))
        pruned = model(**inputs).logits
        keep = ~_dropped(factory, model, inputs, model.vtprune.last_stats)[0]
        hidden = model.model.language_model(**_kept_llm_inputs(llm_inputs, keep)).last_hidden_state
        reference = model.lm_head(hidden)
    torch.testing.assert_close(pruned, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pruned_generation_equals_masked_reference(case, attn):
    method, family, where = case
    factory = FACTORIES[family]
    model = factory.build(attn)
    reference_model = factory.build("eager")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5, videos=1)], seed=1)
    with torch.no_grad():
        vtprune.wrap(model, method, keep=0.25, **_options(where))
        tokens, logits = _greedy(model, inputs)
        stats = model.vtprune.last_stats
        point, layer = parse_where(where) if where else ("llm", 0)
        dropped = _dropped(factory, model, inputs, stats)
        handles = _masked_reference(reference_model, layer, dropped, decode_only=point == "decode")
        ref_tokens, ref_logits = _greedy(reference_model, inputs)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_batch_equals_each_prompt_alone(case):
    method, family, where = case
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    prompts = [Prompt(images=1, prefix=1), Prompt(images=2, prefix=6, suffix=2, videos=1), Prompt(images=1, prefix=9)]
    batch = factory.inputs(model, prompts, seed=7)
    with torch.no_grad():
        vtprune.wrap(model, method, keep=0.25, **_options(where))
        tokens, logits = _greedy(model, batch, steps=4)
        for b in range(len(prompts)):
            # The same prompt as row b of the batch, without its padding.
            alone = factory.sample_inputs(batch, prompts, b)
            alone_tokens, alone_logits = _greedy(model, alone, steps=4)
            torch.testing.assert_close(alone_logits[0], logits[b], atol=1e-4, rtol=0)
            assert torch.equal(alone_tokens[0], tokens[b])


@pytest.mark.parametrize("budget", ["input", "average"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kept_count_follows_budget(case, budget):
    method, family, where = case
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    prompts = [Prompt(images=1), Prompt(images=2, videos=1)]
    inputs = factory.inputs(model, prompts, seed=2)
    num_layers = model.config.text_config.num_hidden_layers
    keep = 0.75
    with torch.no_grad():
        vtprune.wrap(model, method, keep=keep, budget=budget, **_options(where))
        # Two new tokens, so that decode-time policies (which act after prefill) have run too.
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    stats = model.vtprune.last_stats
    point, layer = parse_where(where) if where else ("llm", 0)
    fraction = stage_fraction(keep, budget, layer, num_layers)
    for sample, positions in zip(stats["samples"], factory.image_positions(model, inputs), strict=True):
        sizes = [p.numel() for p in positions]
        expected = [kept_count(fraction, n) for n in sizes]
        kept = sample["stages"][-1]["kept"]
        assert [len(k) for k in kept] == expected
        assert all(len(set(k)) == len(k) and max(k) < n for k, n in zip(kept, sizes, strict=True))
        per_layer = sample["tokens_per_layer"]
        assert len(per_layer) == num_layers
        assert per_layer[:layer] == [sum(sizes)] * layer
        assert per_layer[layer:] == [sum(expected)] * (num_layers - layer)
        assert sample["K_in"] == per_layer[0]
        assert sample["K_avg"] == pytest.approx(sum(per_layer) / num_layers)
        if budget == "average":
            assert sample["K_avg"] == pytest.approx(keep * sum(sizes), abs=len(sizes))
        assert sample["stages"][-1]["seconds"] >= 0
