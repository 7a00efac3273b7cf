"""LLaVA-1.5 (``model_type == "llava"``): CLIP ViT -> 2-layer MLP projector -> Llama/Vicuna (or Mistral).

Each image becomes one contiguous run of ``(image_size / patch_size)^2`` placeholder tokens (576 for 336 px / 14),
the CLS token dropped by the "default" feature strategy, in raster order on a square grid. The projector is
token-wise, so dropping before or after it keeps the same tokens (shared/ADAPTERS.md §2.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vtprune.adapters.common import ClipTowerCls, TokenwiseProjector
from vtprune.engine import Family, ImageLayout
from vtprune.registry import register_adapter


@register_adapter("llava")
class LlavaAdapter(TokenwiseProjector, ClipTowerCls, Family):
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

    def split_captured(self, point: str, features: Tensor) -> list[Tensor]:
        return list(features.reshape(-1, self.tokens_per_image(), features.shape[-1]).unbind(0))

    def cls_attention_tokens(self, rows: Tensor) -> Tensor:
        if self.model.config.vision_feature_select_strategy == "full":
            # The CLS is an image token here; zeroing its entry leaves the CLS-to-CLS attention out of the row.
            return torch.cat((torch.zeros_like(rows[:, :1]), rows[:, 1:]), dim=1)[..., None]
        return rows[:, 1:, None]

    def vision_score_attention(self) -> torch.nn.Module | None:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int) or layer == 0:
            return None  # features from several layers (or the embeddings): no single consumed layer
        # hidden_states[k] is the output of layer k - 1 (k = 0: the embeddings), so -2 is layers[-2].
        layers = self._vision_model().encoder.layers
        return layers[layer if layer < 0 else layer - 1].self_attn

    def encoder_attention_tokens(self, matrix: Tensor) -> Tensor:
        # The image tokens are the last t rows of the tower's sequence ("default" drops the first: CLIP's CLS).
        tokens = self.tokens_per_image()
        return matrix[:, -tokens:, -tokens:].transpose(1, 2)

    def vision_pixel_module(self) -> torch.nn.Module | None:
        vision = self.model.config.vision_config
        if self.tokens_per_image() > (vision.image_size // vision.patch_size) ** 2:
            return None  # the CLS is an image token ("full" strategy): it has no patch
        return self._vision_model().embeddings.patch_embedding

    # patch_pixel_tokens: the Family default (every patch is an image token wherever vision_pixel_module is given).

