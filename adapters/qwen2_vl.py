"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): dynamic-resolution ViT whose ``merger`` fuses each
2 x 2 patch group into one LLM token, M-RoPE positions, Qwen2 text model (shared/ADAPTERS.md §2.4, §2.5).

Token layout. An image of ``(t, h, w)`` patches (``image_grid_thw``; t = 1 for images) becomes one run of
``t * h * w / merge**2`` placeholders between ``<|vision_start|>`` and ``<|vision_end|>``, in raster order over
``(t, h / merge, w / merge)``. A video is one entry as well; its grid is ``(t * h / merge, w / merge)``, frames
stacked top to bottom, so a spatial method spreads its lattice over time and space alike. Image features fill the
image placeholders in prompt order and video features the video placeholders, so an image and a video interleaved
in one prompt are told apart by their token ids, not by their order.

Grids. ``generate`` in transformers >= 5.18 encodes the images before ``model.forward`` and no longer passes the
grids to it, so a pre-hook on ``model.model.visual`` records ``grid_thw`` of every vision call (images first, then
videos, in both the model's forward and generate). It encodes each prompt once, before repeating it for beams or
``num_return_sequences``; the copies take their prompt's grids and features again (``encoded_index``).

Capture points. ``projector``: the ``pooler_output`` of ``model.model.visual`` (after the merger, raster order;
Qwen2.5-VL's merger runs in window order, the visual module puts it back). ``encoder``: the tower's last hidden
states before the merger, averaged over each merge group so that they index the same merged tokens (raster order;
Qwen2.5-VL's window order undone). The merger mixes the 4 patches of a group, so encoder-point values cannot be
projected token-wise: a method that writes values at the encoder point is refused at the first prompt.

Positions. Survivors keep their 3-D M-RoPE positions. After LLM-entry pruning, layer 0's cache is shorter than the
prompt, and ``compute_3d_position_ids`` derives decode positions from that cache length plus
``model.model.rope_deltas``; the deltas are shifted by the number of dropped rows so that a manual decode loop
without ``position_ids`` (and without an attention mask: given one, transformers 5.17-5.24 itself builds positions
of the wrong length there) stays right. ``generate`` passes explicit positions and does not read the deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vtprune.engine import Family, ImageLayout, encoded_index
from vtprune.registry import register_adapter

_KINDS = ("image", "video")


def _grid_argument(args: tuple, kwargs: dict) -> Tensor:
    return kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]


@register_adapter("qwen2_vl")
class Qwen2VLAdapter(Family):
    multi_axis_positions = True  # M-RoPE: (3, B, L) position ids (Qwen3-VL: the same rows)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.visual = self.inner.visual
        self.merge = int(model.config.vision_config.spatial_merge_size)

    def visual_token_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id), int(self.model.config.video_token_id)]

    # ------------------------------------------------------------------------------------------------ layout
    def family_hooks(self) -> list[Any]:
        store = self.view.recorder("grid")
        return [self.visual.register_forward_pre_hook(lambda m, args, kwargs: store(_grid_argument(args, kwargs)),
                                                      with_kwargs=True)]

    def _grids(self, input_ids: Tensor, visual_mask: Tensor, model_kwargs: dict[str, Any]):
        """Per kind, the (t, h, w) patch grid of every image / video of the batch, in scatter order, and how many
        consecutive rows share them (``encoded_index``: generate may encode each prompt once, then repeat it)."""
        present = [kind for kind, token in zip(_KINDS, self.visual_token_ids(), strict=True)
                   if bool((input_ids == token).any())]
        # Where generate encoded the pixels first, the tower ran once per modality present, images first.
        records = self.view.records("grid")
        recorded = {}
        if present and len(records) >= len(present):
            recorded = dict(zip(present, records[-len(present):], strict=True))
        grids = {}
        for kind in _KINDS:
            grid = model_kwargs.get(f"{kind}_grid_thw")
            if grid is None:
                grid = recorded.get(kind)
            if grid is None and kind in present:
                raise ValueError(
                    f"vtprune: the prompt has {kind} tokens but no {kind}_grid_thw reached the model. Pass the "
                    f"processor's {kind}_grid_thw (and pixel values) to the model or to generate."
                )
            grids[kind] = grid.tolist() if grid is not None else []
        repeat = 1
        if any(model_kwargs.get(f"{kind}_grid_thw") is None for kind in present):
            described = sum(t * h * w for kind in _KINDS for t, h, w in grids[kind]) // self.merge**2
            tokens = int(visual_mask.sum())
            if described and tokens % described == 0 and input_ids.shape[0] % (tokens // described) == 0:
                repeat = tokens // described
        return grids, repeat

    def image_layout(self, input_ids: Tensor, visual_mask: Tensor, model_kwargs: dict[str, Any]) -> list[ImageLayout]:
        grids, repeat = self._grids(input_ids, visual_mask, model_kwargs)
        unit = self.merge**2
        used = dict.fromkeys(_KINDS, 0)
        layouts = []
        for sample in range(input_ids.shape[0]):
            # The copies of a repeated prompt take its grids again.
            if sample % repeat == 0:
                first = dict(used)
            else:
                used = dict(first)
            entries = []
            for kind, token in zip(_KINDS, self.visual_token_ids(), strict=True):
                positions = (input_ids[sample] == token).nonzero().squeeze(1)
                start = 0
                while start < positions.numel():
                    if used[kind] == len(grids[kind]):
                        raise ValueError(
                            f"Sample {sample} has more {kind} tokens than {kind}_grid_thw describes. Build the "
                            "prompt and the grids with the model's processor."
                        )
                    t, h, w = grids[kind][used[kind]]
                    used[kind] += 1
                    count = t * h * w // unit
                    chunk = positions[start:start + count]
                    if chunk.numel() != count:
                        raise ValueError(
                            f"Sample {sample} has {positions.numel()} {kind} tokens, which do not add up to the "
                            f"{kind}s of {kind}_grid_thw. Build the prompt and the grids with the model's processor."
                        )
                    entries.append((int(chunk[0]), kind, chunk, (t * h // self.merge, w // self.merge)))
                    start += count
            entries.sort(key=lambda entry: entry[0])
            for index, (_, kind, chunk, grid) in enumerate(entries):
                layouts.append(ImageLayout(sample, index, chunk, grid, kind))
        for kind in _KINDS:
            if used[kind] != len(grids[kind]):
                raise ValueError(
                    f"{kind}_grid_thw lists {len(grids[kind])} {kind}s but the prompts hold tokens for {used[kind]}."
                )
        return layouts

    # ------------------------------------------------------------------------------------------------ capture
    def capture_hook(self, point: str, store: Callable[[Any], None]) -> Any:
        def capture(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            grid = _grid_argument(args, kwargs)
            if point == "projector":
                store((grid, output.pooler_output))
            else:
                store((grid, self.merged_encoder_features(output.last_hidden_state, grid)))

        return self.visual.register_forward_hook(capture, with_kwargs=True)

    def merged_encoder_features(self, hidden: Tensor, grid_thw: Tensor) -> Tensor:
        """(sum t*h*w, C) pre-merger states -> (sum t*h*w / merge**2, C) means per merge group, in raster order."""
        # The processor orders patches merge group by merge group, so each group is merge**2 consecutive rows.
        return hidden.view(-1, self.merge**2, hidden.shape[-1]).mean(1)

    def features_per_image(self, point: str, records: list[Any], images: list[ImageLayout]) -> list[Tensor]:
        kinds = [kind for kind in _KINDS if any(image.kind == kind for image in images)]
        if len(records) < len(kinds):
            raise RuntimeError(
                f"vtprune: the vision tower ran {len(records)} times for this prompt, which holds "
                f"{' and '.join(kinds)}. Pass pixel values for every image and video to the model or to generate."
            )
        chunks = {}
        for kind, (grid, features) in zip(kinds, records[-len(kinds):], strict=True):
            chunks[kind] = features.split((grid.prod(-1) // self.merge**2).tolist())
        index = encoded_index(images, {kind: len(chunks[kind]) for kind in kinds})
        if any(i >= len(chunks[image.kind]) for image, i in zip(images, index, strict=True)):
            raise RuntimeError("vtprune: fewer image or video features were captured than the prompt holds.")
        return [chunks[image.kind][i] for image, i in zip(images, index, strict=True)]

    def project(self, encoder_features: Tensor) -> Tensor:
        raise ValueError(
            f"{self.model.config.model_type} merges each {self.merge}x{self.merge} patch group in visual.merger, so "
            "values written at the 'encoder' point cannot be mapped to LLM tokens. Write merged values at "
            "where='projector' or 'llm:K' instead."
        )

    # ------------------------------------------------------------------------------------------------ positions
    def layer0_rows_dropped(self, count: int) -> None:
        if self.inner.rope_deltas is not None:
            self.inner.rope_deltas = self.inner.rope_deltas + count


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, but the tower attends within windows and keeps its states in window order."""

    def merged_encoder_features(self, hidden: Tensor, grid_thw: Tensor) -> Tensor:
        from transformers.vision_utils import get_vision_window_index

        config = self.visual.config
        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.merge, window_size=config.window_size, patch_size=config.patch_size
        )
        merged = super().merged_encoder_features(hidden, grid_thw)
        return merged[torch.argsort(window_index.to(merged.device))]
