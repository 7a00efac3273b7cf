"""LLaVA-1.5 (``model_type == "llava"``): CLIP ViT -> 2-layer MLP projector -> Llama/Vicuna (or Mistral).

Each image becomes one contiguous run of ``(image_size / patch_size)^2`` placeholder tokens (576 for 336 px / 14),
the CLS token dropped by the "default" feature strategy, in raster order on a square grid. The projector is
token-wise, so dropping before or after it keeps the same tokens (shared/ADAPTERS.md §2.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.adapters.base import Adapter, ImageLayout
from vtprune.registry import register_adapter


@register_adapter("llava")
class LlavaAdapter(Adapter):
    def visual_token_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id)]

    def tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        count = (vision.image_size // vision.patch_size) ** 2
        # transformers keeps every token the tower returns under "full" (a CLIP tower's CLS included) and drops
        # the first one under "default" (a SigLIP tower has no CLS, so that is a patch).
        if self._tower_has_cls():
            count += 1
        if self.model.config.vision_feature_select_strategy == "default":
            count -= 1
        return count

    def _tower_has_cls(self) -> bool:
        tower = self.inner.vision_tower
        tower = getattr(tower, "vision_model", tower)
        return getattr(tower.embeddings, "class_embedding", None) is not None

    def image_layout(self, input_ids: Tensor, visual_mask: Tensor, model_kwargs: dict[str, Any]) -> list[ImageLayout]:
        per_image = self.tokens_per_image()
        side = math.isqrt(per_image)
        grid = (side, side) if side * side == per_image else None
        layouts = []
        # Two syncs for the whole batch (the counts, then every position at once), not one nonzero per sample.
        counts = visual_mask.sum(1).tolist()
        for sample, positions in enumerate(visual_mask.nonzero()[:, 1].split(counts)):
            if positions.numel() == 0:
                continue  # a text-only prompt of the batch (split would give it one empty "image")
            if positions.numel() % per_image:
                raise ValueError(
                    f"Sample {sample} has {positions.numel()} image tokens, not a multiple of the {per_image} tokens "
                    "one LLaVA image produces. Build the prompt with the model's processor."
                )
            for index, chunk in enumerate(positions.split(per_image)):
                layouts.append(ImageLayout(sample, index, chunk, grid))
        return layouts

    def capture_hook(self, point: str, store: Callable[[Tensor], None]) -> Any:
        projector = self.inner.multi_modal_projector
        if point == "encoder":
            return projector.register_forward_pre_hook(lambda module, args: store(args[0]))
        return projector.register_forward_hook(lambda module, args, output: store(output))

    def split_captured(self, point: str, features: Tensor) -> list[Tensor]:
        return list(features.reshape(-1, self.tokens_per_image(), features.shape[-1]).unbind(0))

    def project(self, encoder_features: Tensor) -> Tensor:
        with torch.no_grad():
            return self.inner.multi_modal_projector(encoder_features[None])[0]

    def vision_cls_attention(self) -> nn.Module | None:
        # CLIP prepends a CLS token; SigLIP towers (LLaVA-Interleave, OneVision) have none. The CLS row is read at
        # the last layer, which transformers runs even where the features come from layer -2.
        if not self._tower_has_cls():
            return None
        tower = self.inner.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn

    def cls_attention_tokens(self, rows: Tensor) -> Tensor:
        if self.model.config.vision_feature_select_strategy == "full":
            # The CLS is an image token here; zeroing its entry leaves the CLS-to-CLS attention out of the row.
            return torch.cat((torch.zeros_like(rows[:, :1]), rows[:, 1:]), dim=1)[..., None]
        return rows[:, 1:, None]
