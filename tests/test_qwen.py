"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL specifics that the registry-driven matrix does not reach.

- A manual decode loop (no generate, no position ids, no attention mask) after LLM-entry pruning or a layer-0 KV
  policy gets its M-RoPE positions from ``rope_deltas``, which the adapter shifts by the dropped rows.
- Images and videos interleaved in one prompt: every entry gets its own tokens, kind, grid and features, whether
  the vision tower runs inside the forward or (transformers >= 5.18) in generate before it.
- Encoder-point features are the merge-group means of the tower's states in raster order (Qwen2.5-VL's window
  order undone), checked against the merger's own output; values written there are refused.
- Qwen3-VL pruned inside the LLM below the DeepStack depth (llm:1 of 2 levels) equals the masked reference.
- Beam search: transformers >= 5.18 encodes each prompt once and repeats it per beam afterwards.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from conftest import FACTORIES, Prompt
from transformers import Qwen2VLForConditionalGeneration

import vtprune
from vtprune.engine import Engine
from vtprune.point import PATTERNS, Point
from vtprune.registry import get_adapter_class
from vtprune.state import Selection, Stage

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# transformers 5.24 renamed the forward argument past_key_values -> cache (the old name warns).
CACHE = "cache" if "cache" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters else (
    "past_key_values"
)


class Recorder:
    """A pruner stand-in that keeps every token (or ``keep``) at one stage and records the contexts it saw (an
    adaptive stage with no cap: the engine calls it although it may keep everything)."""

    points = PATTERNS

    def __init__(self, point: str, layer: int = 0, keep=None, values: bool = False) -> None:
        self.stage = Stage(Point(point, layer), 1.0, adaptive=True)
        self.config = types.SimpleNamespace(keep=0.5, budget="input", method="recorder")
        self.keep, self.values = keep, values
        self.contexts = []

    def plan(self, num_layers: int) -> list[Stage]:
        return [self.stage]

    def select(self, ctx) -> Selection:
        self.contexts.append(ctx)
        keep = [torch.arange(image.num_tokens) if self.keep is None else self.keep(image) for image in ctx.images]
        values = [image.features[k] for image, k in zip(ctx.images, keep, strict=True)] if self.values else None
        return Selection(keep=keep, values=values)


def _install(model, recorder: Recorder):
    adapter = Engine(model)
    adapter.install(recorder)
    return adapter


def _hide(model, dropped: torch.Tensor, first_layer: int = 0, decode_only: bool = False) -> list:
    """The masked reference: hooks hiding the (B, L) dropped prompt keys from decoder layers >= first_layer (at
    decode steps only, for KV policies). Needs eager attention, whose masks are always 4-D."""

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        if decode_only and (args[0] if args else kwargs["hidden_states"]).shape[1] > 1:
            return None
        hide = torch.zeros(dropped.shape[0], mask.shape[-1], dtype=torch.bool)
        hide[:, : dropped.shape[1]] = dropped
        kwargs["attention_mask"] = mask.masked_fill(hide[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    layers = model.model.language_model.layers[first_layer:]
    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]


def _manual_greedy(model, inputs, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill + greedy steps by hand: no generate, no position ids, no attention mask (batch of one)."""
    prompt = {k: v for k, v in inputs.items() if k != "attention_mask"}
    out = model(**prompt, use_cache=True)
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        out = model(input_ids=tokens[-1], use_cache=True, **{CACHE: out.past_key_values})
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def _dropped(factory, model, inputs, repeat: int = 1) -> torch.Tensor:
    """(B * repeat, L) True at the dropped visual tokens; generate repeats each prompt ``repeat`` times (beams)."""
    dropped = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    positions = factory.image_positions(model, inputs)
    samples = model.vtprune.last_stats["samples"]
    for b, sample in enumerate(samples[::repeat]):
        copies = samples[b * repeat:(b + 1) * repeat]
        assert all(copy["stages"][-1]["kept"] == sample["stages"][-1]["kept"] for copy in copies)
        for image, kept in zip(positions[b], sample["stages"][-1]["kept"], strict=True):
            hide = torch.ones(image.numel(), dtype=torch.bool)
            hide[torch.tensor(kept, dtype=torch.long)] = False
            dropped[b, image[hide]] = True
    return dropped.repeat_interleave(repeat, 0)


@pytest.mark.parametrize("where", ["llm:0", "projector", "decode:0"])
@pytest.mark.parametrize("family", QWEN)
def test_manual_decode_loop_uses_shifted_rope_deltas(family, where):
    factory = FACTORIES[family]
    model, reference = factory.build("sdpa"), factory.build("eager")
    inputs = factory.inputs(model, [Prompt(images=2, prefix=4, videos=1)], seed=11)
    with torch.no_grad():
        vtprune.wrap(model, "random", keep=0.25, where=where)
        tokens, logits = _manual_greedy(model, inputs, steps=16)
        handles = _hide(reference, _dropped(factory, model, inputs), decode_only=where.startswith("decode"))
        ref_tokens, ref_logits = _manual_greedy(reference, inputs, steps=16)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("run", ["forward", "generate"])
@pytest.mark.parametrize("family", QWEN)
def test_interleaved_images_and_videos(family, run):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    samples = [(1, ["video", "image", "video", "image"], 0), (3, ["image"], 2)]
    inputs = factory.sequence_inputs(model, samples, seed=5)
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    # Registered before the adapter's hooks, so it sees the LLM input before any pruning.
    model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    recorder = Recorder("projector")
    _install(model, recorder)
    with torch.no_grad():
        if run == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    ctx = recorder.contexts[0]
    t, h, w = factory.video_grid
    video = (t * h // 2, w // 2)
    # Images take the factory's grids in order (8x8, 4x16, 16x4 patches), videos theirs, wherever they sit.
    assert [(im.sample, im.index_in_sample) for im in ctx.images] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert [im.grid for im in ctx.images] == [video, (4, 4), video, (2, 8), (8, 2)]
    flat = [positions for sample in factory.image_positions(model, inputs) for positions in sample]
    for image, positions, kind in zip(ctx.images, flat, ["video", "image", "video", "image", "image"], strict=True):
        token = factory.image_id if kind == "image" else factory.video_id
        assert bool((inputs["input_ids"][image.sample, positions] == token).all())
        # The features handed to the pruner are exactly the rows the model scattered at the entry's positions.
        torch.testing.assert_close(image.features, seen["embeds"][image.sample, positions], atol=0, rtol=0)


@pytest.mark.parametrize("family", QWEN)
def test_encoder_features_are_raster_merge_group_means(family):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=2, videos=1)], seed=4)
    adapter = get_adapter_class(family)(model)
    records = []
    handles = [adapter.capture_hook("encoder", records.append), adapter.capture_hook("projector", records.append)]
    outputs = []
    handles.append(model.model.visual.register_forward_hook(lambda module, args, out: outputs.append(out)))
    with torch.no_grad():
        model(**inputs)
        for handle in handles:
            handle.remove()
        for (grid, encoder), (_, projector), out in zip(records[0::2], records[1::2], outputs, strict=True):
            # The merger's own output on the tower's states, in the tower's order (window order on Qwen2.5-VL).
            groups = out.last_hidden_state.view(-1, 4, out.last_hidden_state.shape[-1])
            merged = model.model.visual.merger(out.last_hidden_state)
            order = torch.cdist(projector, merged).argmin(1)
            assert torch.equal(order.sort().values, torch.arange(order.numel()))
            if family != "qwen2_5_vl":
                assert torch.equal(order, torch.arange(order.numel()))
            torch.testing.assert_close(encoder, groups.mean(1)[order], atol=0, rtol=0)
            assert encoder.shape[0] == int(grid.prod(-1).sum()) // 4


@pytest.mark.parametrize("family", QWEN)
def test_values_at_the_encoder_point_are_refused(family):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1)])
    _install(model, Recorder("encoder", keep=lambda image: torch.arange(image.num_tokens // 2), values=True))
    with pytest.raises(ValueError, match="cannot be mapped to LLM tokens"), torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen3_below_deepstack_depth_equals_masked_reference(attn):
    factory = FACTORIES["qwen3_vl"]
    model, reference = factory.build(attn), factory.build("eager")
    assert len(model.config.vision_config.deepstack_visual_indexes) == 2
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5, videos=1)], seed=8)
    generate = dict(
        max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    with torch.no_grad():
        vtprune.wrap(model, "random", keep=0.25, where="llm:1")
        out = model.generate(**inputs, **generate)
        handles = _hide(reference, _dropped(factory, model, inputs), first_layer=1)
        ref = reference.generate(**inputs, **generate)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), atol=1e-4, rtol=0)
    assert torch.equal(out.sequences, ref.sequences)
    vtprune.unwrap(model)
    assert "_deepstack_process" not in vars(model.model.language_model)


@pytest.mark.parametrize("where", ["projector", "llm:2"])
@pytest.mark.parametrize("family", QWEN)
def test_beam_search_equals_masked_reference(family, where):
    factory = FACTORIES[family]
    model, reference = factory.build("sdpa"), factory.build("eager")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5, videos=1)], seed=9)
    generate = dict(
        max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, output_scores=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    with torch.no_grad():
        vtprune.wrap(model, "uniform", keep=0.25, where=where)
        out = model.generate(**inputs, **generate)
        assert len(model.vtprune.last_stats["samples"]) == 4
        dropped = _dropped(factory, model, inputs, repeat=2)
        handles = _hide(reference, dropped, first_layer=0 if where == "projector" else 2)
        ref = reference.generate(**inputs, **generate)
        for handle in handles:
            handle.remove()
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)

