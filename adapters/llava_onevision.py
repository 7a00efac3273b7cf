"""LLaVA-OneVision (``model_type == "llava_onevision"``): SigLIP (no CLS) -> MLP projector -> Qwen2, images and video.

Images follow :mod:`vtprune.adapters.anyres`: a single image per prompt is tiled (27 x 27 tokens per tile at
384 px) and its stitched grid is bilinearly down-sized when it exceeds ``vision_aspect_ratio`` = ``anyres_max_9``
tiles; with several images in a prompt (``batch_num_images``) each one is only its base tile plus one newline
(shared/ADAPTERS.md §2.3).

A video is one run of ``video_token_id``: every frame's tokens are pooled 2 x 2 bilinearly (27 x 27 -> 14 x 14) after
the projector, the frames follow each other, and one ``image_newline`` closes the video. One ImageLayout per video
lists its frames' tokens (the newline stays, as for images); its grid stacks the frames vertically,
``(frames * 14, 14)``, so ``keep`` applies per video and spatial methods spread over every frame. Frames and counts
come from ``pixel_values_videos`` or, when ``generate`` (transformers >= 5.18) encoded the video before the prefill,
from the encoded features' shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from vtprune.adapters.anyres import AnyResAdapter, AnyResLayout, VisualItem
from vtprune.registry import register_adapter


@register_adapter("llava_onevision")
class LlavaOnevisionAdapter(AnyResAdapter):
    modeling = "transformers.models.llava_onevision.modeling_llava_onevision"

    def visual_token_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id), int(self.model.config.video_token_id)]

    def _extra_items(self, input_ids: Tensor, model_kwargs: dict[str, Any]) -> Iterator[tuple[int, list[VisualItem]]]:
        video_id = int(self.model.config.video_token_id)
        if not bool((input_ids == video_id).any()):
            return
        pooled = math.ceil(self.tile_side() / 2)
        per_frame = pooled * pooled
        pixels = model_kwargs.get("pixel_values_videos")
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("video")
        if pixels is not None:
            videos, frames = pixels.shape[:2]
        elif encoded is not None:
            videos, slots = encoded.pooler_output.shape[:2]
            frames = (slots - 1) // per_frame
        else:
            raise ValueError("The prompt has video tokens but the model got no pixel_values_videos.")
        prunable = torch.arange(frames * per_frame)
        items = [
            VisualItem(
                AnyResLayout(0, 0, prunable, (frames * pooled, pooled), kind="video", source=source, raw=frames,
                             packed=(pooled, pooled)),
                frames * per_frame + 1,
                prunable,
            )
            for source in range(videos)
        ]
        yield video_id, items
