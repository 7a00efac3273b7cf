"""InternVL, HF-native (``model_type == "internvl"``): InternViT -> pixel shuffle -> MLP projector -> Qwen2 / Llama.

Each 448 px tile gives 32 x 32 ViT patches (CLS dropped); the pixel shuffle folds every 2 x 2 block into one token,
so a tile is one run of (side)^2 = 256 tokens in raster order, ``side = image_size / patch_size * downsample_ratio``
(shared/ADAPTERS.md §2.7). The processor writes ``<img>`` + ``<IMG_CONTEXT>`` x 256 x tiles + ``</img>`` per image
(the dynamic tiles, then the thumbnail when there is more than one tile) and one such run per video frame, so the
runs of ``<IMG_CONTEXT>`` in ``input_ids`` give every image and its tile count; no metadata is needed.

Choices:
- One ImageLayout per image (per frame for a video: the prompt holds nothing that groups frames), so ``keep``
  applies per image across its tiles. Its grid stacks the tiles vertically, ``(tiles * side, side)``: token j of
  tile t sits at row ``t * side + j // side``, column ``j % side``. Spatial methods then spread a lattice over every
  tile (thumbnail included) and never see a 2 x 2 block straddle two tiles when ``side`` is even.
- ``encoder`` captures the projector input: the post-shuffle (tiles, side^2, 4 C_vis) features, one row per LLM
  token, each row holding its 2 x 2 ViT block. That is the ViT output at token granularity without pooling away
  information, and ``project`` maps it exactly. ``projector`` captures the projector output (tiles, side^2, D).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.adapters.common import TokenwiseProjector
from vtprune.engine import Family, ImageLayout
from vtprune.registry import register_adapter


@register_adapter("internvl")
class InternVLAdapter(TokenwiseProjector, Family):
    # The projector is a token-wise LayerNorm + MLP (TokenwiseProjector): capture points and mapping as LLaVA's.

    def visual_token_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id)]

    def tile_side(self) -> int:
        """Tokens along one side of a tile after the pixel shuffle (16 for 448 px / 14 px patches)."""
        vision = self.model.config.vision_config
        return int(vision.image_size[0] // vision.patch_size[0] * self.model.config.downsample_ratio)

    def image_layout(self, input_ids: Tensor, visual_mask: Tensor, model_kwargs: dict[str, Any]) -> list[ImageLayout]:
        side = self.tile_side()
        per_tile = side * side
        layouts = []
        for sample in range(input_ids.shape[0]):
            positions = visual_mask[sample].nonzero().squeeze(1)
            if positions.numel() == 0:
                continue
            # <img> / </img> are text tokens, so consecutive images always form separate runs.
            breaks = ((positions[1:] - positions[:-1]) != 1).nonzero().squeeze(1) + 1
            for index, run in enumerate(positions.tensor_split(breaks.cpu())):
                if run.numel() % per_tile:
                    raise ValueError(
                        f"Sample {sample} has an image of {run.numel()} <IMG_CONTEXT> tokens, not a multiple of the "
                        f"{per_tile} tokens one InternVL tile produces. Build the prompt with the model's processor."
                    )
                layouts.append(ImageLayout(sample, index, run, (run.numel() // side, side)))
        return layouts

    def vision_cls_attention(self) -> nn.Module | None:
        # InternViT prepends a CLS token that get_image_features drops before the pixel shuffle.
        return self.inner.vision_tower.encoder.layer[-1].attention

    def cls_attention_tokens(self, rows: Tensor) -> Tensor:
        patches = rows[:, 1:]
        side = math.isqrt(patches.shape[1])
        # The model's own pixel shuffle on a one-channel map puts each token's block of ViT patches in its channels;
        # the token gets the block's attention mass.
        blocks = self.inner.pixel_shuffle(patches.reshape(-1, side, side, 1), self.model.config.downsample_ratio)
        return blocks.reshape(rows.shape[0], -1, blocks.shape[-1]).sum(-1, keepdim=True)

    def global_view(self, image: ImageLayout) -> Tensor | None:
        per_tile = self.tile_side() ** 2
        view = torch.ones(image.positions.numel(), dtype=torch.bool, device=image.positions.device)
        if image.positions.numel() > per_tile:
            # The processor puts the thumbnail (the whole image, resized) after the dynamic tiles.
            view[:-per_tile] = False
        return view

    def split_captured(self, point: str, features: Tensor) -> list[Tensor]:
        counts = [im.positions.numel() for im in self.view.images]
        flat = features.reshape(-1, features.shape[-1])
        if flat.shape[0] != sum(counts):
            raise RuntimeError(
                f"vtprune: the projector saw {flat.shape[0]} InternVL tokens, the prompt has {sum(counts)} image "
                "tokens. Pass one pixel_values entry per tile of the prompt's images, in prompt order."
            )
        return list(flat.split(counts))
