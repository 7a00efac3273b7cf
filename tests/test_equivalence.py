"""The equivalence matrix: every registered method x every registered family x every insertion point it takes.

A pruned model must compute exactly what the unpruned model computes when the dropped tokens are invisible:
- keep=1.0 equals the unwrapped model;
- pruning before the LLM equals the LLM fed only the kept features at their original positions (with the rows a
  method wrote into its kept slots, ``StageStats.values``, in place of theirs);
- pruning at llm:K (or evicting at decode:K) equals the unpruned model with the dropped keys masked from layer K on
  (every stage from its own layer on, and its written rows in place at that layer), for the prefill logits and 8
  greedy decode steps;
- a left-padded batch of different prompts equals each prompt alone;
- the kept counts follow the budget, and last_stats agrees with itself.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FACTORIES, Prompt, matrix_points

import vtprune
from vtprune.budget import kept_count, size_plan, stage_fraction
from vtprune.point import Point

ATOL = 2e-5

CASES = [
    (method, family, where)
    for method in vtprune.list_methods()
    for family in vtprune.list_models()
    for where in matrix_points(method)
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


def _kept_llm_inputs(llm_inputs: dict, keep: torch.Tensor, renumber: bool = False) -> dict:
    """The LLM inputs of a batch of one restricted to the (L,) kept positions, which keep their original positions
    (``renumber``: the LLM's own positions for the shorter sequence)."""
    positions = llm_inputs["position_ids"]
    if renumber:
        positions = None
    elif positions is None:
        positions = torch.arange(keep.numel())[None]
    kept = {
        "inputs_embeds": llm_inputs["inputs_embeds"][:, keep],
        "position_ids": None if positions is None else positions[..., keep],
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


def _written_rows(factory, model, inputs, handle, hidden: torch.Tensor, stage: int) -> torch.Tensor:
    """(B, L, D) hidden states in original positions with the rows that stage ``stage`` of the wrapped model
    (``handle``: its ``model.vtprune``) wrote into its kept slots (``StageStats.values``) in their place."""
    stats, raw = handle.last_stats, handle.engine.last_stats
    hidden = hidden.clone()
    per_sample = zip(stats["samples"], factory.image_positions(model, inputs), strict=True)
    for b, (sample, positions) in enumerate(per_sample):
        written = raw.written_values(b, stage) or [None] * len(positions)
        for image_positions, kept, values in zip(positions, sample["stages"][stage]["kept"], written, strict=True):
            if values is not None:
                hidden[b, image_positions[kept]] = values
    return hidden


def _layer_inputs(layer) -> tuple[list, object]:
    """Record the hidden states ``layer`` receives, call by call, before any other pre-hook (vtprune's) edits them;
    returns the list and the hook handle."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    return seen, layer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def _staged_reference(model, factory, inputs, handle) -> list:
    """Hooks that make an unpruned eager model compute what the wrapped one (``handle``: its ``model.vtprune``) did:
    from each recorded stage's layer on, the keys the stage left dropped are hidden (at prefill for prefill stages,
    at decode steps for every stage), and the rows a stage wrote into its kept slots replace their hidden states at
    that layer's prefill input."""
    stats = handle.last_stats
    layers = model.model.language_model.layers
    hide = {"prefill": [None] * len(layers), "decode": [None] * len(layers)}
    writes = {}
    for s, stage in enumerate(stats["samples"][0]["stages"]):
        dropped = _dropped(factory, model, inputs, stats, s)
        for layer in range(stage["layer"], len(layers)):
            if stage["point"] != "decode":
                hide["prefill"][layer] = dropped
            hide["decode"][layer] = dropped
        if handle.engine.last_stats.stages[s].values is not None:
            writes[stage["layer"]] = s

    def make_hook(layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            prefill = hidden.shape[1] > 1
            if prefill and layer_idx in writes:
                hidden = _written_rows(factory, model, inputs, handle, hidden, writes[layer_idx])
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            dropped = hide["prefill" if prefill else "decode"][layer_idx]
            if dropped is not None:
                mask = kwargs["attention_mask"]
                keys = torch.zeros(dropped.shape[0], mask.shape[-1], dtype=torch.bool)
                keys[:, : dropped.shape[1]] = dropped
                kwargs["attention_mask"] = mask.masked_fill(keys[:, None, None, :], torch.finfo(mask.dtype).min)
            return args, kwargs

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    if handle.config.positions == "renumber":
        handles.append(_renumbered_positions(model, factory, inputs, stats))
    return handles


def _renumbered_positions(model, factory, inputs, stats):
    """A hook that gives the reference LLM the positions of positions="renumber": the tokens the drops before the
    LLM kept are numbered as if the dropped ones were absent (prefill), and decode positions move back by the number
    of dropped tokens. ``generate`` passes position ids from the mask's cumsum; the engine renumbers them the same
    way."""
    stages = stats["samples"][0]["stages"]
    entry = max(s for s, stage in enumerate(stages) if stage["layer"] == 0 and stage["point"] != "decode")
    dropped = _dropped(factory, model, inputs, stats, entry)
    present = inputs["attention_mask"].bool() & ~dropped

    def hook(module, args, kwargs):
        positions = kwargs["position_ids"]
        if positions.shape[1] == dropped.shape[1]:
            kwargs["position_ids"] = (present.long().cumsum(-1) - 1).clamp(min=0)
        else:
            kwargs["position_ids"] = positions - dropped.sum(1, keepdim=True)
        return args, kwargs

    return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


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
    layers = model.model.language_model.layers
    with torch.no_grad():
        llm_inputs = _llm_inputs(model, inputs)
        vtprune.wrap(model, method, keep=0.25, **_options(where))
        # A method that also prunes inside the LLM is compared on the sequence entering its first stage there.
        plan = size_plan(model.vtprune.pruner, len(layers))
        if not any(s.layer == 0 and s.point.kind != "decode" for s in plan):
            pytest.skip(f"{method} drops nothing before the LLM (its stages: {[str(s.point) for s in plan]})")
        inside = [s.layer for s in plan if s.point.kind == "llm" and s.layer > 0]
        if inside:
            seen, hook = _layer_inputs(layers[inside[0]])
        pruned = model(**inputs).logits
        stats = model.vtprune.last_stats
        entry = sum(s["layer"] == 0 and s["point"] != "decode" for s in stats["samples"][0]["stages"]) - 1
        keep = ~_dropped(factory, model, inputs, stats, entry)[0]
        embeds = _written_rows(factory, model, inputs, model.vtprune, llm_inputs["inputs_embeds"], entry)
        renumber = model.vtprune.config.positions == "renumber"
        vtprune.unwrap(model)
        kept_inputs = _kept_llm_inputs({**llm_inputs, "inputs_embeds": embeds}, keep, renumber)
        hidden = model.model.language_model(**kept_inputs)
        if inside:
            hook.remove()
            pruned, reference = seen
        else:
            reference = model.lm_head(hidden.last_hidden_state)
    torch.testing.assert_close(pruned, reference, atol=ATOL, rtol=0)


def assert_equals_staged_reference(family: str, attn: str, method: str, **options) -> dict:
    """Greedy generation of the wrapped model equals ``_staged_reference`` on an eager model; returns last_stats."""
    factory = FACTORIES[family]
    model = factory.build(attn)
    reference_model = factory.build("eager")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5, videos=1)], seed=1)
    with torch.no_grad():
        vtprune.wrap(model, method, keep=0.25, **options)
        tokens, logits = _greedy(model, inputs)
        handles = _staged_reference(reference_model, factory, inputs, model.vtprune)
        ref_tokens, ref_logits = _greedy(reference_model, inputs)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    return model.vtprune.last_stats


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pruned_generation_equals_masked_reference(case, attn):
    method, family, where = case
    assert_equals_staged_reference(family, attn, method, **_options(where))


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


def _without_empty_media(inputs: dict) -> dict:
    """A text-only prompt's inputs as a processor gives them: no (empty) pixel or grid tensors."""
    media = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "video_grid_thw")
    return {k: v for k, v in inputs.items() if not (k in media and v.shape[0] == 0)}


@pytest.mark.parametrize("case", [c for c in CASES if c[2] in ("projector", "llm:2", None)], ids=_case_id)
def test_batch_mixing_image_and_text_only_prompts_equals_each_prompt_alone(case):
    method, family, where = case
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    prompts = [Prompt(images=1, prefix=2), Prompt(images=0, prefix=5), Prompt(images=2, prefix=1)]
    batch = factory.inputs(model, prompts, seed=11)
    with torch.no_grad():
        vtprune.wrap(model, method, keep=0.25, **_options(where))
        tokens, logits = _greedy(model, batch, steps=3)
        stats = model.vtprune.last_stats["samples"]
        assert stats[1]["visual_tokens"] == 0 and set(stats[1]["tokens_per_layer"]) == {0}
        for b in range(len(prompts)):
            alone = _without_empty_media(factory.sample_inputs(batch, prompts, b))
            alone_tokens, alone_logits = _greedy(model, alone, steps=3)
            # A prompt alone stops at its end-of-sequence token; in the batch its row goes on with padding.
            steps = alone_tokens.shape[1]
            torch.testing.assert_close(alone_logits[0], logits[b, :steps], atol=1e-4, rtol=0)
            assert torch.equal(alone_tokens[0], tokens[b, :steps])


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
    # Stages in the order the adapter applies them: prefill stages by layer, then decode-time policies.
    plan = sorted(size_plan(model.vtprune.pruner, num_layers), key=lambda s: (s.point.kind == "decode", s.layer))
    if where:
        point = Point.parse(where)
        expected = stage_fraction(keep, budget, point.layer, num_layers)
        assert [(s.point, s.fraction) for s in plan] == [(point, expected)]
    assert all(s.point.pattern in model.vtprune.pruner.points for s in plan)
    for sample, positions in zip(stats["samples"], factory.image_positions(model, inputs), strict=True):
        sizes = [p.numel() for p in positions]
        expected_per_layer = [sum(sizes)] * num_layers
        present, adapted = sizes, False
        assert len(sample["stages"]) == len(plan)
        for stage, record in zip(plan, sample["stages"], strict=True):
            assert (record["point"], record["layer"]) == (stage.point.kind, stage.layer)
            expected = [min(p, kept_count(stage.fraction, n)) for p, n in zip(present, sizes, strict=True)]
            counts = [len(k) for k in record["kept"]]
            if stage.adaptive:
                # The budget is an upper bound the method may undercut (ToDRE's relevance check keeps all or none).
                assert all(c <= e for c, e in zip(counts, expected, strict=True))
                adapted |= counts != expected
            else:
                assert counts == expected
            for kept, n in zip(record["kept"], sizes, strict=True):
                assert len(set(kept)) == len(kept) and all(i < n for i in kept)
            expected_per_layer[stage.layer:] = [sum(counts)] * (num_layers - stage.layer)
            present = counts
            assert record["seconds"] >= 0
        per_layer = sample["tokens_per_layer"]
        assert per_layer == expected_per_layer
        assert sample["K_in"] == per_layer[0]
        assert sample["K_avg"] == pytest.approx(sum(per_layer) / num_layers)
        if budget == "average" and not adapted:
            assert sample["K_avg"] == pytest.approx(keep * sum(sizes), abs=len(sizes))
