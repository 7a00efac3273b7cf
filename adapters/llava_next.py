"""LLaVA-NeXT (``model_type == "llava_next"``): CLIP ViT with AnyRes tiling -> MLP projector -> Vicuna / Mistral.

An image is its base tile (24 x 24 tokens for 336 px, CLS dropped) plus the tiles of the best-fitting
``image_grid_pinpoints`` resolution, stitched, cropped to the image's aspect ratio and closed by an
``image_newline`` token per row (shared/ADAPTERS.md §2.2). The layout, the newline handling and the capture points
are those of :mod:`vtprune.adapters.anyres`; NeXT never down-sizes the grid and has no video input.
"""

from __future__ import annotations

from vtprune.adapters.anyres import AnyResAdapter
from vtprune.registry import register_adapter


@register_adapter("llava_next")
class LlavaNextAdapter(AnyResAdapter):
    modeling = "transformers.models.llava_next.modeling_llava_next"
