"""Tiny random-weight LLaVA models built from a config (no hub): for tests, timing smoke runs and the CLI default
until the trained reference checkpoints land. Their answers are meaningless; their token geometry is real."""

from __future__ import annotations

from typing import Any

import torch

IMAGE_TOKEN = "<image>"
_WORDS = (
    "what is the colour shape of object in image top left right bottom how many are there red green blue yellow "
    "circle square triangle one two three four five yes no a an and to on at it this that picture describe"
).split()


def tiny_llava_config(geometry: str = "test", attn_implementation: str = "sdpa") -> Any:
    """A LlavaConfig with a tiny CLIP tower and a tiny Llama.

    geometry "test": 48 px / 6 px patches -> 8 x 8 = 64 visual tokens, 4 decoder layers (fast CPU tests).
    geometry "llava15": 336 px / 14 px patches -> 24 x 24 = 576 visual tokens, LLaVA-1.5's token geometry.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    image_size, patch = {"test": (48, 6), "llava15": (336, 14)}[geometry]
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(_WORDS) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava(geometry: str = "test", seed: int = 0, attn_implementation: str = "sdpa") -> Any:
    """A random-weight ``LlavaForConditionalGeneration`` in fp32, eval mode."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_llava_config(geometry, attn_implementation)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def tiny_llava_processor(config: Any) -> Any:
    """A LlavaProcessor (word-level tokenizer built offline, CLIP image processor) matching ``tiny_llava_config``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, IMAGE_TOKEN: 4, "USER:": 5, "ASSISTANT:": 6, "?": 7}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_convert_rgb=True
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
