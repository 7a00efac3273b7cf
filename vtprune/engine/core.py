"""The pruning engine: the hooks that drop visual tokens inside any transformers 5.x VLM, composed with a family.

Design (shared/ADAPTERS.md §3): score anywhere, drop in only two kinds of places, because transformers checks that
the number of image features equals the number of placeholder tokens before it scatters them:

- at the LLM entry (a forward pre-hook on ``model.model.language_model``) for the ``encoder``, ``projector`` and
  ``llm:0`` points: ``inputs_embeds``, ``position_ids`` and the 2-D mask are gathered;
- at the input of decoder layer K (a pre-hook on ``layers[K]``) for ``llm:K``: the hidden states, ``(cos, sin)``,
  ``position_ids`` and a mask built for the shorter cache of layers >= K;
- after prefill, for ``decode:K`` KV policies: the cache of layers >= K is compacted in place.

Survivors keep their original position ids, so RoPE (and Qwen's M-RoPE) sees what the unpruned model saw, and
``generate`` keeps producing decode positions in original coordinates. The 2-D mask grows in original coordinates
too; each decode step translates it into the coordinates of every pruned group of layers. Different kept counts per
sample are padded on the left with masked filler rows, exactly like left padding.

A family (``vtprune.engine.Family``, one file per family under ``adapters/``) only states facts: which token ids are
visual, how the visual tokens of a prompt split into images with their grids, and where features of the encoder
and projector points can be read. The engine holds everything else (the per-call state in ``rows``, the probe in
``probe``) and never imports a family: it finds one through the registry by ``config.model_type``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.budget import size_plan, stage_budget
from vtprune.engine.family import Family, FamilyView
from vtprune.engine.probe import make_keys, make_probe
from vtprune.engine.rows import CallState, RowGroup
from vtprune.kernels import compact_sequence, gather_tokens
from vtprune.point import ENTRY_KINDS
from vtprune.state import (
    OPTIONAL_IMAGE_FIELDS,
    CallStats,
    ImageTokens,
    PruneContext,
    Selection,
    Stage,
    StageStats,
)

logger = logging.getLogger("vtprune")


def _kwarg_cache(kwargs: dict[str, Any]) -> Any:
    # transformers 5.24 renamed past_key_values -> cache.
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _drops_nothing(stage: Stage, ctx: PruneContext) -> bool:
    """Whether a stage leaves every image whole (its method is then not called)."""
    return not stage.adaptive and all(image.budget >= image.num_tokens for image in ctx.images)


def _may_drop(stage: Stage) -> bool:
    """Whether a stage can drop anything (a sized stage that keeps everything never calls the method)."""
    return stage.fraction < 1.0 or stage.adaptive


class _GenerateWrapper:
    """Shadows ``model.generate`` on the instance with a call that marks the adapter as generating and releases
    the call's state when generate returns or raises; ``remove`` restores what was there."""

    def __init__(self, model: nn.Module, adapter: Engine) -> None:
        self.owner = model
        self.previous = model.__dict__.get("generate")
        inner = model.generate

        @functools.wraps(inner)
        def generate(*args: Any, **kwargs: Any) -> Any:
            adapter._generating = True
            try:
                return inner(*args, **kwargs)
            finally:
                adapter._end_generate()

        self.wrapper = generate
        model.generate = generate

    def remove(self) -> None:
        if self.owner.__dict__.get("generate") is self.wrapper:
            del self.owner.generate
            if self.previous is not None:
                self.owner.generate = self.previous


def _sync_timing(device: torch.device) -> None:
    if device.type == "cuda" and os.environ.get("VTPRUNE_SYNC_TIMING") == "1":
        torch.cuda.synchronize(device)


class Engine:
    """Drops visual tokens in one model: installs the hooks a pruner's plan needs and runs every call. ``family``
    (default: the registered family of ``model.config.model_type``) states the model's facts."""

    def __init__(self, model: nn.Module, family: Family | None = None) -> None:
        if family is None:
            from vtprune.registry import get_adapter_class

            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            family = get_adapter_class(model_type)(model)
        self.family = family
        self.model = model
        self.inner = family.inner
        self.language_model = family.language_model
        self.layers = self.language_model.layers
        self.text_config = self.language_model.config
        self.num_layers = len(self.layers)
        self.visual_ids = torch.tensor(family.visual_token_ids(), dtype=torch.long)
        self.pruner: Any = None
        self.needs: frozenset[str] = frozenset()
        self.state: CallState | None = None
        self.last_stats: CallStats | None = None
        # What the vision-side hooks recorded for the coming prefill, per key (an insertion point, or a family's
        # own key), in call order. From transformers 5.18 generate runs the vision tower before model.forward, so
        # records are not dropped at the LLM entry but marked stale, and the next vision run starts afresh; a
        # prefill re-run without a cache (generate with use_cache=False) still finds them.
        self.captured: dict[str, list[Any]] = {}
        self._captures_stale = False
        self._handles: list[Any] = []
        self._warned: set[str] = set()
        # True while a call of the wrapped model (``model.model``) runs: the LLM and layer hooks act only then, so
        # the inner language model called on its own runs as the plain model.
        self._active = False
        # True inside a wrapped ``generate``; its end releases everything the call held.
        self._generating = False
        family.attach(FamilyView(self))

    def __repr__(self) -> str:
        return f"Engine({type(self.family).__name__})"

    # ----------------------------------------------------------------------------------------------- install
    def install(self, pruner: Any) -> None:
        """Attach the hooks a pruner's plan needs. ``pruner`` has ``config``, ``points``, ``plan(num_layers)`` and
        ``select(ctx)``; its config's "auto" fields are resolved for this family first, then its plan is sized by
        ``vtprune.budget.size_plan``."""
        if hasattr(pruner, "resolve"):
            pruner.resolve(getattr(self.model.config, "model_type", ""))
        plan = size_plan(pruner, self.num_layers)
        self.method = getattr(pruner, "name", "") or pruner.config.method or type(pruner).__name__
        allowed = tuple(getattr(pruner, "points", ()))
        for stage in plan:
            if stage.point.pattern not in allowed:
                raise ValueError(
                    f"Method '{self.method}' does not act at '{stage.point}'; its insertion points are "
                    f"{', '.join(allowed) or 'none'}. Pick one of those (e.g. where='{allowed[0] if allowed else ''}' "
                    "for a method that takes where=)."
                )
            if stage.point.pattern not in self.family.points:
                raise ValueError(
                    f"{type(self.family).__name__} has no '{stage.point.pattern}' insertion point; it has "
                    f"{list(self.family.points)}."
                )
        needs = frozenset(getattr(pruner, "needs", ()))
        if not needs <= set(OPTIONAL_IMAGE_FIELDS):
            raise ValueError(
                f"{type(pruner).__name__}.needs names {sorted(needs - set(OPTIONAL_IMAGE_FIELDS))}; adapters provide "
                f"only {list(OPTIONAL_IMAGE_FIELDS)}."
            )
        self.pruner = pruner
        self.needs = needs
        self.plan = plan
        self._prefill_plan = sorted((s for s in plan if s.point.kind != "decode"), key=lambda s: s.layer)
        self._decode_plan = sorted((s for s in plan if s.point.kind == "decode"), key=lambda s: s.layer)
        # Whether a prefill can come out shorter than its prompt (labels= then cannot line up with the logits).
        self._shortens = any(s.fraction < 1.0 or s.adaptive for s in self._prefill_plan)
        if self._decode_plan and self._prefill_plan and self._decode_plan[0].layer < self._prefill_plan[-1].layer:
            raise ValueError("A decode-time KV policy must act at or after the last prefill drop layer.")
        self.renumber = getattr(pruner.config, "positions", "original") == "renumber"
        if self.renumber:
            self._check_renumber()

        add = self._handles.append
        add(self.model.register_forward_pre_hook(self._on_top_forward, with_kwargs=True))
        add(self.inner.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        add(self.inner.register_forward_hook(self._after_model_forward, always_call=True))
        add(self.language_model.register_forward_pre_hook(self._on_llm_entry, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            add(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
        for stage in self._prefill_plan:
            if stage.point.kind == "llm" and stage.layer > 0 and _may_drop(stage):
                attn = self.layers[stage.layer - 1].self_attn
                add(attn.register_forward_pre_hook(self._make_probe_capture(stage.layer - 1), with_kwargs=True))
        entry_points = {s.point.kind for s in plan if s.point.kind in ENTRY_KINDS}
        for point in entry_points:
            add(self.family.capture_hook(point, self.recorder(point)))
        cls_attention = self.family.vision_cls_attention() if entry_points and "cls_attention" in needs else None
        if cls_attention is not None:
            add(cls_attention.register_forward_pre_hook(self._cls_capture(), with_kwargs=True))
        score_attention = (self.family.vision_score_attention()
                           if entry_points and "encoder_attention" in needs else None)
        if score_attention is not None:
            add(score_attention.register_forward_pre_hook(self._matrix_capture(), with_kwargs=True))
        pixel_module = self.family.vision_pixel_module() if entry_points and "patch_pixels" in needs else None
        if pixel_module is not None:
            store = self.recorder("patch_pixels")
            add(pixel_module.register_forward_pre_hook(lambda module, args: store(args[0].detach())))
        for handle in self.family.family_hooks():
            add(handle)
        add(_GenerateWrapper(self.model, self))

    def _check_renumber(self) -> None:
        """positions="renumber" is defined for 1-D positions and for a plan that drops before the LLM."""
        if self.family.multi_axis_positions:
            raise ValueError(
                f"positions='renumber' is not defined for {self.model.config.model_type}: its M-RoPE positions give "
                "every visual token a (t, h, w) place on the image's grid, and the survivors of a drop form no "
                "shorter grid the processor could number. Use positions='original' (the default)."
            )
        # A plan with a stage before the LLM takes it even where that stage keeps everything (keep=1, or ApET's
        # first stage at a large average budget): there is then nothing to renumber.
        if not any(s.layer == 0 and s.point.kind != "decode" for s in self.plan):
            raise ValueError(
                f"positions='renumber' renumbers the survivors of a drop before the LLM; method '{self.method}' "
                f"drops only at {sorted({str(s.point) for s in self.plan})}, where tokens keep their positions. "
                "Use positions='original', or a point before the LLM (encoder, projector, llm:0)."
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._release()

    def _release(self) -> None:
        """Drop everything one call held (per-call state, captured vision records); ``last_stats`` stays."""
        self.state = None
        self.captured.clear()
        self._captures_stale = False

    def _end_generate(self) -> None:
        self._generating = False
        self._release()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def recorder(self, key: str) -> Callable[[Any], None]:
        """A callable that appends what a vision-side hook saw to ``self.captured[key]``."""

        def store(record: Any) -> None:
            if self._captures_stale:
                self.captured.clear()
                self._captures_stale = False
            self.captured.setdefault(key, []).append(record)

        return store

    def _cls_capture(self) -> Callable:
        """A pre-hook for the vision encoder's last attention module: records, per vision call, every tile's CLS
        attention row (``cls_attention_row``) under the "cls_attention" key."""
        store = self.recorder("cls_attention")

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                store(self.family.cls_attention_row(module, hidden))

        return capture

    def _matrix_capture(self) -> Callable:
        """A pre-hook for the vision encoder's score-layer attention module: records, per vision call, every tile's
        full head-mean attention matrix (``attention_matrix``) under the "encoder_attention" key."""
        store = self.recorder("encoder_attention")

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                store(self.family.attention_matrix(module, hidden))

        return capture

    # ------------------------------------------------------------------------------------------------ hooks
    def _on_top_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None and self._shortens:
            raise ValueError(
                "labels= cannot go through a pruned model: the logits are shorter than the labels. Score a "
                "continuation with out.logits[:, -(n_cont + 1):-1] (negative indexing) instead; see README."
            )

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._active = True
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _kwarg_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        seq_len = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
        if past > 0:
            if seq_len > 1 and self.state is not None:
                raise ValueError(
                    "vtprune got a multi-token forward on a non-empty cache (chunked prefill, assisted decoding or a "
                    "continued conversation). Start from an empty cache, or unwrap the model for this call."
                )
            return
        if any(kwargs.get(key) is not None for key in ("pixel_values", "pixel_values_videos")):
            # The vision tower runs inside this call, after this hook: earlier records are stale.
            self._captures_stale = True
        self.state = None
        self.last_stats = None
        if input_ids is None:
            self._warn_once("embeds", "vtprune: called with inputs_embeds and no input_ids; running unpruned.")
            return
        if self.visual_ids.device != input_ids.device:
            # Moved once: a host-to-device copy per call would block the host each time.
            self.visual_ids = self.visual_ids.to(input_ids.device)
        visual_mask = torch.isin(input_ids, self.visual_ids)
        user_mask = kwargs.get("attention_mask")
        unpadded = torch.ones((), dtype=torch.bool, device=input_ids.device)
        if isinstance(user_mask, Tensor) and user_mask.dim() == 2:
            unpadded = user_mask.bool().all()
        # One sync, before the vision tower is queued: whether there are images, and whether the prompt is padded
        # (without padding, later layer masks are built without a mask tensor, which needs no sync).
        has_image, unpadded = torch.stack((visual_mask.any(), unpadded)).tolist()
        if not has_image:
            self._warn_once("noimage", "vtprune: prompt without image tokens; running unpruned.")
            return
        images = self.family.image_layout(input_ids, visual_mask, kwargs)
        # A visual slot that no image lists (the row newlines of LLaVA-NeXT / OneVision) is layout: it is never
        # dropped and counts neither as a visual token nor as text.
        prunable = torch.zeros_like(visual_mask)
        for im in images:
            # In-place on the sample's row: ``mask[int, index] = True`` would copy the int to the device and sync.
            prunable[im.sample].index_fill_(0, im.positions, True)
        self.state = CallState(
            visual_mask=prunable,
            text_mask=~visual_mask,
            orig_len=input_ids.shape[1],
            images=images,
            kept=[torch.arange(im.positions.numel(), device=input_ids.device) for im in images],
            alive=[input_ids.shape[1]] * input_ids.shape[0],
            unpadded=bool(unpadded),
            prefill_stages=list(self._prefill_plan),
            decode_stages=list(self._decode_plan),
        )
        self.state.stats.image_sample = [im.sample for im in images]
        self.state.stats.image_tokens = [im.positions.numel() for im in images]
        self.state.stats.image_grid = [im.grid for im in images]

    def _after_model_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """End of a call of the wrapped model: release what only that call needed, then report a bad selection."""
        self._active = False
        st = self.state
        if st is None:
            if not self._generating:
                self.captured.clear()
            return
        # The probe's inputs hold the layer's hidden states and a reference to the KV cache; the per-image extras
        # and (outside generate, which may re-run a prefill without a cache) the vision records are prefill-only.
        st.probe_inputs.clear()
        st.image_extras = None
        if not self._generating:
            self.captured.clear()
        if st.checks:
            checks, st.checks = st.checks, []
            self._raise_bad_selection(checks)

    def _on_llm_entry(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        st = self.state
        if not self._active:
            return None
        if st is None:
            self._captures_stale = True
            return None
        embeds = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        if mask is not None and (isinstance(mask, dict) or mask.dim() != 2):
            raise ValueError(
                "vtprune needs a 2-D attention mask (or None) at the LLM entry; got a pre-built mask. Static caches "
                "and torch.compile'd generation are not supported: use the default DynamicCache."
            )
        cache = _kwarg_cache(kwargs)
        if cache is not None and not hasattr(cache, "layers"):
            raise ValueError("vtprune needs a transformers DynamicCache; got " + type(cache).__name__ + ".")
        if st.phase == "prefill":
            return self._prefill_entry(st, args, kwargs, embeds, mask, cache)
        return self._decode_entry(st, args, kwargs, embeds, mask, cache)

    def _prefill_entry(self, st: CallState, args, kwargs, embeds, mask, cache):
        batch, length = embeds.shape[:2]
        if length != st.orig_len:
            raise RuntimeError(f"vtprune: LLM input has {length} tokens, the prompt had {st.orig_len}.")
        st.mask2d = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        position_ids = kwargs.get("position_ids")
        given_positions = position_ids is not None
        if position_ids is None:
            # Exactly what the LM would build itself (arange + cache length), made explicit so it can be gathered.
            position_ids = torch.arange(length, device=embeds.device).expand(batch, length)
        kwargs["position_ids"] = position_ids
        identity = torch.arange(length, device=embeds.device).expand(batch, length)
        base = RowGroup(0, identity, torch.ones_like(identity, dtype=torch.bool), identity=True)
        st.groups = [base]
        entry = [s for s in st.prefill_stages if s.layer == 0]
        st.prefill_stages = [s for s in st.prefill_stages if s.layer > 0]
        for stage in entry:
            features = self._entry_features(st, stage, embeds)
            hidden = embeds if stage.point.kind == "llm" else None
            ctx = self._context(st, stage, base, features=features, hidden=hidden)
            selection, seconds = self._select(stage, ctx)
            group = self._apply(st, stage, ctx, selection, seconds, base)
            # Rows of the current (possibly already pruned) input that the new group keeps.
            rows = base.inverse(st.orig_len).gather(1, group.index).clamp(min=0)
            # position_dim=-1 gathers (B, L) positions and Qwen's (3 or 4, B, L) M-RoPE positions alike.
            packed = compact_sequence(rows, group.valid, hidden_states=embeds, position_ids=position_ids)
            embeds, position_ids = packed.hidden_states, packed.position_ids
            embeds = self._write_values(st, ctx, selection, group, embeds, stage.point.kind)
            st.groups = [group]
            base = group
        if not base.identity:
            kwargs["attention_mask"] = base.translate_mask(st.mask2d, st.orig_len)
            if self.renumber:
                position_ids = self._renumbered(st, kwargs["attention_mask"], position_ids, given_positions)
            self.family.prune_llm_kwargs(kwargs, base.index, base.valid)
            if base.index.shape[1] < st.orig_len:
                self.family.layer0_rows_dropped(st.orig_len - base.index.shape[1])
        self._captures_stale = True
        kwargs["inputs_embeds"] = embeds
        kwargs["position_ids"] = position_ids
        st.phase = "prefill-llm"
        self._finish_stats(st)
        return args, kwargs

    @staticmethod
    def _renumbered(st: CallState, mask: Tensor, position_ids: Tensor, given: bool) -> Tensor:
        """The positions the model gives the compacted prompt: as ``generate`` computes them from the 2-D mask where
        the caller passed position ids, else 0..M-1 (padding and filler rows counted, as the LLM's own arange
        counts left padding). Records the shift that decode steps take off their positions."""
        if given:
            renumbered = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        else:
            renumbered = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
        st.position_shift = position_ids[:, -1] - renumbered[:, -1]
        return renumbered

    def _decode_entry(self, st: CallState, args, kwargs, embeds, mask, cache):
        if st.phase == "prefill-llm":
            st.phase = "decode"
            if st.decode_stages:
                self._apply_decode_policies(st, cache)
        batch, q_len = embeds.shape[:2]
        group0 = st.groups[0]
        held = cache.get_seq_length() if cache is not None else 0
        generated = held - group0.index.shape[1]
        total = st.orig_len + generated + q_len
        if mask is None:
            mask = torch.ones(batch, total, dtype=torch.long, device=embeds.device)
        if mask.shape[1] != total:
            raise RuntimeError(
                f"vtprune: decode mask has {mask.shape[1]} columns, expected {total} in original coordinates."
            )
        st.decode_mask2d = mask
        if kwargs.get("position_ids") is None:
            start = st.orig_len + generated
            kwargs["position_ids"] = (torch.arange(q_len, device=embeds.device) + start).expand(batch, q_len)
        if st.position_shift is not None:
            kwargs["position_ids"] = kwargs["position_ids"] - st.position_shift[:, None]
        if not group0.identity:
            kwargs["attention_mask"] = group0.translate_mask(mask, st.orig_len)
        return args, kwargs

    def _make_layer_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            st = self.state
            if st is None or st.phase == "prefill" or not self._active:
                return None
            st.layer = layer_idx
            if st.phase == "prefill-llm" and st.prefill_stages and st.prefill_stages[0].layer == layer_idx:
                return self._prefill_layer(st, layer_idx, args, kwargs)
            group = self._group_of(st, layer_idx)
            if group.start == 0:
                return None
            if group.start == layer_idx and st.phase == "decode":
                hidden = args[0] if args else kwargs["hidden_states"]
                mask2d = group.translate_mask(st.decode_mask2d, st.orig_len)
                group.layer_kwargs = {
                    "attention_mask": self._layer_masks(group, hidden, mask2d, _kwarg_cache(kwargs),
                                                        kwargs.get("position_ids"))
                }
            return self._replace_layer_kwargs(group, layer_idx, args, kwargs)

        return hook

    def _prefill_layer(self, st: CallState, layer_idx: int, args: tuple, kwargs: dict):
        stage = st.prefill_stages.pop(0)
        hidden = args[0] if args else kwargs["hidden_states"]
        current = self._group_of(st, layer_idx)
        if current.start > 0:
            # A second drop inside the LLM: the layer's kwargs still hold the positions of the whole LLM call, the
            # hidden states those of the group an earlier in-LLM drop made.
            kwargs = {**kwargs, **{k: v for k, v in current.layer_kwargs.items() if k != "attention_mask"}}
        ctx = self._context(st, stage, current, features=None, hidden=hidden)
        selection, seconds = self._select(stage, ctx)
        group = self._apply(st, stage, ctx, selection, seconds, current)
        rows = current.inverse(st.orig_len).gather(1, group.index).clamp(min=0)
        packed = compact_sequence(rows, group.valid, hidden_states=hidden, position_ids=kwargs.get("position_ids"))
        hidden = self._write_values(st, ctx, selection, group, packed.hidden_states, "llm")
        cos, sin = kwargs["position_embeddings"]
        cos, sin = (gather_tokens(t.expand(hidden.shape[0], *t.shape[1:]), rows) for t in (cos, sin))
        mask2d = group.translate_mask(st.mask2d, st.orig_len)
        cache = _kwarg_cache(kwargs)
        if cache is not None and st.unpadded and len(set(st.alive)) == 1:
            # Every row of every sample is real: the mask is all ones, and without it transformers builds the same
            # layer masks without reading the tensor (no device sync). Not without a cache: transformers would then
            # read the kept positions' gaps as boundaries of packed sequences.
            mask2d = None
        group.layer_kwargs = {
            "attention_mask": self._layer_masks(group, hidden, mask2d, cache, packed.position_ids),
            "position_embeddings": (cos, sin),
            "position_ids": packed.position_ids,
        }
        st.groups.append(group)
        self._finish_stats(st)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return self._replace_layer_kwargs(group, layer_idx, args, kwargs)

    def _replace_layer_kwargs(self, group: RowGroup, layer_idx: int, args: tuple, kwargs: dict):
        for key, value in group.layer_kwargs.items():
            if key == "attention_mask":
                value = value[self._layer_type(layer_idx)]
            kwargs[key] = value
        return args, kwargs

    def _make_probe_capture(self, layer_idx: int) -> Callable:
        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            st = self.state
            if st is not None and st.phase == "prefill-llm" and self._active:
                hidden = args[0] if args else kwargs["hidden_states"]
                st.probe_inputs[layer_idx] = (hidden, kwargs["position_embeddings"], _kwarg_cache(kwargs))

        return capture

    # -------------------------------------------------------------------------------------------- machinery
    def _group_of(self, st: CallState, layer_idx: int) -> RowGroup:
        found = st.groups[0]
        for group in st.groups:
            if group.start <= layer_idx:
                found = group
        return found

    def _layer_type(self, layer_idx: int) -> str:
        types = getattr(self.text_config, "layer_types", None)
        return types[layer_idx] if types else "full_attention"

    def _layer_masks(self, group: RowGroup, hidden: Tensor, mask2d: Tensor, cache: Any, position_ids: Tensor | None):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        masks = {}
        end = self._group_end(group)
        for layer_idx in range(group.start, end):
            kind = self._layer_type(layer_idx)
            if kind in masks:
                continue
            build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = build(self.text_config, hidden, mask2d, cache, position_ids, layer_idx=layer_idx)
        return masks

    def _group_end(self, group: RowGroup) -> int:
        later = [g.start for g in (self.state.groups if self.state else []) if g.start > group.start]
        return min(later) if later else self.num_layers

    def _entry_features(self, st: CallState, stage: Stage, embeds: Tensor) -> list[Tensor] | None:
        if stage.point.kind == "llm":
            return None
        return self._captured_per_image(st, stage.point.kind)

    def _captured_per_image(self, st: CallState, key: str) -> list[Tensor]:
        """Per image, (n, C) rows of what the vision-side hooks recorded under ``key``: the features of an insertion
        point, or the (n, 1) CLS attention ("cls_attention", laid out as encoder features by ``cls_attention_tokens``).
        """
        what = {"cls_attention": "CLS attention", "encoder_attention": "encoder attention",
                "patch_pixels": "patch pixels"}.get(key, f"{key} features")
        captured = self.captured.get(key)
        if not captured:
            raise RuntimeError(
                f"vtprune: no {what} was captured for this prompt. Pass pixel_values (not precomputed image "
                "features) so the vision tower runs under the hooks."
            )
        layouts = {"cls_attention": self.family.cls_attention_tokens,
                   "encoder_attention": self.family.encoder_attention_tokens,
                   "patch_pixels": self.family.patch_pixel_tokens}
        if key in layouts:
            rows = [layouts[key](r) for r in captured]
            per_image = self.family.features_per_image("encoder", rows, st.images)
        else:
            per_image = self.family.features_per_image(key, captured, st.images)
        if len(per_image) != len(st.images) or any(
            f.shape[0] != im.positions.numel() for f, im in zip(per_image, st.images, strict=False)
        ):
            raise RuntimeError(
                f"vtprune: captured {len(per_image)} images of {what} that do not match the {len(st.images)} images "
                "of image tokens in the prompt."
            )
        return per_image

    def _image_extras(self, st: CallState) -> dict[str, list[Tensor | None]]:
        """The optional ImageTokens fields the pruner needs, per image over its original tokens; once per prefill."""
        if st.image_extras is None:
            st.image_extras = {}
            if "global_view" in self.needs:
                st.image_extras["global_view"] = [self.family.global_view(im) for im in st.images]
            if "cls_attention" in self.needs:
                rows = [None] * len(st.images)
                if self.family.vision_cls_attention() is not None:
                    # A video's row covers all its frames (each token: its own frame's CLS attention), so a method
                    # that takes the argmax over the video takes the paper's best frame's CLS argmax.
                    rows = [r[:, 0] for r in self._captured_per_image(st, "cls_attention")]
                st.image_extras["cls_attention"] = rows
            for key, module in (("encoder_attention", self.family.vision_score_attention),
                                ("patch_pixels", self.family.vision_pixel_module)):
                if key in self.needs:
                    available = module() is not None
                    st.image_extras[key] = (self._captured_per_image(st, key) if available
                                            else [None] * len(st.images))
        return st.image_extras

    def _context(self, st: CallState, stage: Stage, current: RowGroup, features, hidden) -> PruneContext:
        inverse = current.inverse(st.orig_len)
        extras = self._image_extras(st) if stage.point.kind in ENTRY_KINDS else {}
        images = []
        for j, layout in enumerate(st.images):
            kept = st.kept[j]
            positions = inverse[layout.sample, layout.positions[kept]]
            if features is not None:
                feats = features[j][kept]
            elif hidden is not None:
                feats = hidden[layout.sample, positions]
            else:
                feats = None
            images.append(
                ImageTokens(
                    sample=layout.sample,
                    index_in_sample=layout.index_in_sample,
                    grid=layout.grid,
                    original_indices=kept,
                    positions=positions if stage.point.kind in ("llm", "decode") else None,
                    features=feats,
                    budget=stage_budget(stage, layout.positions.numel(), kept.numel()),
                    **{name: None if value[j] is None else value[j][kept] for name, value in extras.items()},
                )
            )
        cur_mask = current.translate_mask(st.mask2d, st.orig_len)
        # Text tokens are never dropped, so the current rows' text flags are a gather (no per-sample nonzero).
        text_mask = (st.text_mask & st.mask2d.bool()).gather(1, current.index) & current.valid
        rows = keys = None
        if stage.point.kind == "llm" and stage.layer > 0 and _may_drop(stage):
            rows = self._probe(st, stage.layer - 1, cur_mask)
            keys = make_keys(self.layers[stage.layer - 1].self_attn, stage.layer - 1,
                             st.probe_inputs[stage.layer - 1])
        return PruneContext(
            point=stage.point,
            num_layers=self.num_layers,
            images=images,
            hidden_states=hidden,
            attention_mask=cur_mask,
            text_mask=text_mask,
            attention_rows=rows,
            attention_keys=keys,
        )

    def _probe(self, st: CallState, layer_idx: int, key_mask: Tensor) -> Callable[[Tensor], Tensor]:
        inputs = st.probe_inputs.get(layer_idx)
        if inputs is None:
            raise RuntimeError(f"vtprune: the inputs of decoder layer {layer_idx} were not recorded for the probe.")
        return make_probe(self.layers[layer_idx].self_attn, layer_idx, inputs, key_mask)

    def _select(self, stage: Stage, ctx: PruneContext) -> tuple[Selection, float]:
        if _drops_nothing(stage, ctx):
            # The stage drops nothing (keep=1, or every image already within its budget): the identity, without
            # the method, so that no method has to reproduce it.
            return Selection(keep=[torch.arange(image.num_tokens, device=ctx.device) for image in ctx.images]), 0.0
        _sync_timing(ctx.device)
        started = time.perf_counter()
        with torch.no_grad():
            selection = self.pruner.select(ctx)
        _sync_timing(ctx.device)
        seconds = time.perf_counter() - started
        self._check_selection(stage, ctx, selection)
        return selection, seconds

    def _check_selection(self, stage: Stage, ctx: PruneContext, selection: Selection) -> None:
        """What can be checked on the host (shapes): one index list per image, of the budget's size. Duplicates and
        the index range are checked on the device in ``_apply`` and reported at the end of the call (no sync)."""
        where = f"Method '{self.method}' at '{stage.point}'"
        if not isinstance(selection, Selection):
            raise TypeError(f"{where}: select must return a vtprune.Selection, got {type(selection).__name__}.")
        if len(selection.keep) != len(ctx.images):
            raise ValueError(
                f"{where} returned {len(selection.keep)} keep lists for {len(ctx.images)} images; return one per "
                "image of ctx.images."
            )
        if selection.values is not None and len(selection.values) != len(ctx.images):
            raise ValueError(
                f"{where} returned {len(selection.values)} value lists for {len(ctx.images)} images; return one "
                "(or None) per image, or values=None."
            )
        for j, (keep, image) in enumerate(zip(selection.keep, ctx.images, strict=True)):
            integer = isinstance(keep, Tensor) and not keep.dtype.is_floating_point and keep.dtype != torch.bool
            if not integer or keep.dim() != 1:
                got = f"{keep.dtype} of shape {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
                raise ValueError(
                    f"{where}: the keep entry of image {j} must be a 1-D integer tensor of indices into its "
                    f"{image.num_tokens} present tokens, got {got}."
                )
            count = keep.shape[0]
            if count > image.budget or (count < image.budget and not stage.adaptive):
                need = f"at most {image.budget}" if stage.adaptive else f"exactly {image.budget}"
                raise ValueError(
                    f"{where} kept {count} tokens of image {j}; the stage's budget is {image.budget} of its "
                    f"{image.num_tokens} present tokens. Return {need} indices (ctx.images[j].budget)."
                )
            values = selection.values[j] if selection.values is not None else None
            if values is not None and (not isinstance(values, Tensor) or values.dim() != 2
                                       or values.shape[0] != count):
                got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
                raise ValueError(
                    f"{where}: the values of image {j} must be a ({count}, C) tensor, one row per kept index, got "
                    f"{got}."
                )

    def _raise_bad_selection(self, checks: list[tuple[Stage, int, Tensor]]) -> None:
        """Read the device-side checks of this call's selections (one sync, after the call's work is queued) and
        raise for the first bad one."""
        flags = torch.stack([flag for _, _, flag in checks]).tolist()
        for (stage, image, _), (out_of_range, duplicate) in zip(checks, flags, strict=True):
            if out_of_range or duplicate:
                what = "indices outside its present tokens" if out_of_range else "the same index twice"
                raise ValueError(
                    f"Method '{self.method}' at '{stage.point}' returned {what} for image {image}. select must return "
                    "distinct indices in 0..ctx.images[j].num_tokens - 1; the output of this call is not valid."
                )

    def _apply(self, st, stage: Stage, ctx: PruneContext, selection: Selection, seconds: float, current: RowGroup):
        """Record the selection and build the group of rows the following layers hold."""
        alive = current.inverse(st.orig_len) >= 0
        kept_now = []
        identity = _drops_nothing(stage, ctx)
        for j, (layout, image) in enumerate(zip(st.images, ctx.images, strict=True)):
            local = selection.keep[j].to(device=image.original_indices.device, dtype=torch.long)
            # Row counts are tensor shapes, known on the host: the new width needs no device sync.
            st.alive[layout.sample] -= st.kept[j].numel() - local.numel()
            order = torch.argsort(local)
            local = local[order]
            if local.numel() and not identity:
                # Checked on the device and read at the end of the call (no sync per stage); the clamp keeps a bad
                # index from faulting the device before then.
                bad_range = (local[0] < 0) | (local[-1] >= image.num_tokens)
                st.checks.append((stage, j, torch.stack((bad_range, (local[1:] == local[:-1]).any()))))
                local = local.clamp(0, max(image.num_tokens - 1, 0))
            if selection.values is not None and selection.values[j] is not None:
                selection.values[j] = selection.values[j][order]
            selection.keep[j] = local
            dropped = layout.positions[st.kept[j]]
            alive[layout.sample].index_fill_(0, dropped, False)
            st.kept[j] = st.kept[j][local]
            alive[layout.sample].index_fill_(0, layout.positions[st.kept[j]], True)
            kept_now.append(st.kept[j])
        st.stats.stages.append(StageStats(stage.point, kept_now, seconds))
        length = alive.shape[1]
        positions = torch.arange(length, device=alive.device).expand_as(alive)
        key = torch.where(alive, positions, torch.full_like(positions, -1))
        width = max(st.alive)
        index = key.sort(dim=1).values[:, -width:]
        valid = index >= 0
        return RowGroup(stage.layer, index.clamp(min=0), valid)

    def _write_values(self, st, ctx: PruneContext, selection: Selection, group: RowGroup, hidden: Tensor, point: str):
        if selection.values is None:
            return hidden
        inverse = group.inverse(st.orig_len)
        hidden = hidden.clone()
        written: list[Tensor | None] = [None] * len(st.images)
        for j, layout in enumerate(st.images):
            values = selection.values[j]
            if values is None:
                continue
            if point == "encoder":
                values = self.family.project(values)
            rows = inverse[layout.sample, layout.positions[st.kept[j]]]
            written[j] = values.to(hidden.dtype)
            hidden[layout.sample].index_copy_(0, rows, written[j])
        # The rows as the LLM got them, so that a reference run can write the same ones (StageStats.values).
        st.stats.stages[-1].values = written
        return hidden

    def _apply_decode_policies(self, st: CallState, cache: Any) -> None:
        if cache is None:
            raise ValueError("A decode-time KV policy needs use_cache=True.")
        for stage in st.decode_stages:
            current = self._group_of(st, stage.layer)
            ctx = self._context(st, stage, current, features=None, hidden=None)
            ctx.cache = cache
            selection, seconds = self._select(stage, ctx)
            group = self._apply(st, stage, ctx, selection, seconds, current)
            rows = current.inverse(st.orig_len).gather(1, group.index).clamp(min=0)
            layers = cache.layers[stage.layer:]
            packed = compact_sequence(rows, group.valid, cache=[(lay.keys, lay.values) for lay in layers])
            for lay, (keys, values) in zip(layers, packed.cache, strict=True):
                lay.keys, lay.values = keys, values
            if stage.layer == 0:
                self.family.layer0_rows_dropped(current.index.shape[1] - group.index.shape[1])
            st.groups = [g for g in st.groups if g.start != stage.layer] + [group]
            st.groups.sort(key=lambda g: g.start)
        st.decode_stages = []
        self._finish_stats(st)

    def _finish_stats(self, st: CallState) -> None:
        # One count per group (a handful), shared by the layers it spans: not a gather and a sum per layer.
        per_group: dict[int, Tensor] = {}
        counts = []
        for layer_idx in range(self.num_layers):
            group = self._group_of(st, layer_idx)
            if id(group) not in per_group:
                per_group[id(group)] = (st.visual_mask.gather(1, group.index) & group.valid).sum(1)
            counts.append(per_group[id(group)])
        st.stats.tokens_per_layer = torch.stack(counts, dim=1)
        self.last_stats = st.stats

    def running_layer_rows(self) -> tuple[Tensor, Tensor] | None:
        """While a prefill runs inside the LLM: the (B, M) rows of the LLM's input that the decoder layer running
        now holds, and their (B, M) valid flags (False for fillers); None where that layer holds the LLM's input
        as it came in, or outside a pruned prefill. For families that inject per-token inputs between layers."""
        st = self.state
        if st is None or st.phase != "prefill-llm":
            return None
        entry = st.groups[0]
        group = self._group_of(st, st.layer)
        if group is entry:
            return None
        return entry.inverse(st.orig_len).gather(1, group.index).clamp(min=0), group.valid
