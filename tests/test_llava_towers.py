"""LLaVA's image-token count for each vision tower and feature strategy, as transformers produces the features.

A CLIP tower puts a CLS token first, a SigLIP tower (LLaVA-Interleave) has none; ``"full"`` keeps every token the
tower returns and ``"default"`` drops the first one, whatever it is. The adapter must count the same tokens the
model scatters, or the prompt's image runs are split wrongly.
"""

from __future__ import annotations

import pytest
import torch

import vtprune

from .conftest import _tiny_text

PATCHES = 16  # 16 px images of 4 px patches


def tiny_llava(tower: str, strategy: str):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    vision_cls = CLIPVisionConfig if tower == "clip" else SiglipVisionConfig
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=16, patch_size=4)
    config = LlavaConfig(vision_config=vision, text_config=_tiny_text(LlamaConfig), image_token_id=3,
                         vision_feature_layer=-1, vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize(("tower", "strategy", "tokens"), [("clip", "full", PATCHES + 1), ("clip", "default", PATCHES),
                                                         ("siglip", "full", PATCHES),
                                                         ("siglip", "default", PATCHES - 1)])
def test_tokens_per_image_follow_the_tower_and_strategy(tower: str, strategy: str, tokens: int) -> None:
    model = tiny_llava(tower, strategy)
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 9, 10] + [3] * tokens + [11, 12], [1, 13, 14] + [3] * tokens + [15, 16]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    with torch.no_grad():
        model(**inputs)  # transformers itself rejects a prompt whose image-token count differs from its features
    vtprune.wrap(model, "uniform", keep=0.5)
    assert model.vtprune.engine.family.tokens_per_image() == tokens
    with torch.no_grad():
        model(**inputs)
    stats = model.vtprune.last_stats
    assert [sample["K_in"] for sample in stats["samples"]] == [round(0.5 * tokens)] * 2
