"""The reference families: configs, tokenizers, processors and batch encoding for vtprune's own trained checkpoints.

Three real transformers architectures, small enough for git and CPU CI, trained on ``vtprune.eval.synth``:
- ``llava``: ``LlavaForConditionalGeneration``, CLIP-style ViT at 336/14 (576 tokens, feature layer -2), MLP
  projector, Llama decoder: LLaVA-1.5's token geometry;
- ``qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration``, 14-px patches, 2x2 merge (144 tokens at 336 px), window
  attention, 3-D M-RoPE, images and 8-frame videos;
- ``internvl``: ``InternVLForConditionalGeneration``, 448 px, pixel shuffle, 256 tokens per tile.

Two yardstick versions (``FamilySpec.version``; a checkpoint records its own in ``config.vtprune_yardstick``):
- version 1 (the shipped checkpoints): ``vtprune.eval.synth``, 4-layer LLMs, the question before the visual tokens:
  ``USER: {question} <image> ASSISTANT:``;
- version 2 (issue "Yardstick v2"): ``vtprune.eval.synth_v2``, 12-layer LLMs (so the 32-layer schedules of every
  method map to distinct layers), a trained vision feature layer with a CLS / global head, and the prompt laid out as
  the real families do: ``<s> USER: <image> {question} ASSISTANT:``.
In-context prompts: ``USER: <image> label {a1} <image> label {a2} <image> label ? ASSISTANT:``.

``encode`` builds model inputs straight from synth items on any device (the fast path the trainer and the evaluator
use); ``tests/test_reference.py`` checks that the saved processor (``AutoProcessor.from_pretrained``) produces the
same inputs for images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from vtprune.eval import synth, synth_v2

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BASE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:"]


@dataclass(frozen=True)
class FamilySpec:
    """What differs between the reference families."""

    name: str
    model_class: str
    image_size: int
    categories: tuple[str, ...]
    specials: tuple[str, ...]  # family placeholder tokens, after BASE_SPECIALS
    video_size: int = 0
    version: int = 1  # yardstick version: 1 = synth, 4-layer LLMs; 2 = synth_v2, 12-layer LLMs
    question_first: bool = False  # v2 ablation only: v1's prompt order (question, then image) instead of the families'

    @property
    def task(self) -> ModuleType:
        """The synth module of this yardstick version (same interface in both)."""
        return synth if self.version == 1 else synth_v2


VERSIONS = (1, 2)
CONFIG_KEY = "vtprune_yardstick"  # config attribute that records a checkpoint's yardstick version

FAMILIES = {
    "llava": FamilySpec("llava", "LlavaForConditionalGeneration", 336,
                        synth.IMAGE_CATEGORIES + synth.MULTI_CATEGORIES, ("<image>",)),
    "qwen2_5_vl": FamilySpec("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", 336, synth.CATEGORIES,
                             ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"), video_size=224),
    "internvl": FamilySpec("internvl", "InternVLForConditionalGeneration", 448,
                           synth.IMAGE_CATEGORIES + synth.MULTI_CATEGORIES,
                           ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")),
}



def _v2(spec: FamilySpec) -> FamilySpec:
    task = synth_v2
    video = task.VIDEO_CATEGORIES if spec.video_size else ()
    return replace(spec, version=2, categories=task.IMAGE_CATEGORIES + task.MULTI_CATEGORIES + video)


FAMILIES_V2 = {name: _v2(spec) for name, spec in FAMILIES.items()}


def get_family(name: str, version: int = 1) -> FamilySpec:
    if version not in VERSIONS:
        raise ValueError(f"Unknown yardstick version {version!r}. Versions: {list(VERSIONS)}.")
    families = FAMILIES if version == 1 else FAMILIES_V2
    if name not in families:
        raise ValueError(f"Unknown reference family '{name}'. Families: {list(families)}.")
    return families[name]


def spec_for(config: Any) -> FamilySpec:
    """The family spec of a loaded reference checkpoint (its model_type and recorded yardstick version)."""
    return get_family(config.model_type, getattr(config, CONFIG_KEY, 1))


def vocab(spec: FamilySpec) -> dict[str, int]:
    words = BASE_SPECIALS + list(spec.specials) + spec.task.vocabulary()
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def build_tokenizer(spec: FamilySpec) -> Any:
    """A word-level tokenizer over the synth vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=vocab(spec), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {
        "llava": {"image_token": "<image>"},
        "qwen2_5_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                     "video_token": "<video>"},
    }[spec.name]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", extra_special_tokens=extra, model_max_length=8192,
    )


def build_config(spec: FamilySpec) -> Any:
    """The model config of a reference family. Version 1: about 4.6M parameters (4 x 256 LLM). Version 2: about
    7M (12 x 192 LLM, GQA 4/2, head dim 48), under 16 MB in fp16, so that the 32-layer schedules of the methods
    (2; 2/6/10/14; 8/16/24; L/3, 2L/3; 7L/8; 6) scale to distinct layers."""
    import transformers

    ids = vocab(spec)
    deep = spec.version == 2
    text = dict(vocab_size=len(ids), hidden_size=192 if deep else 256, intermediate_size=512,
                num_hidden_layers=12 if deep else 4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=True)
    # Qwen's M-RoPE sections split head_dim / 2 rotary pairs over (t, h, w): 8/12/12 of 32 at head dim 64, the
    # same proportions (1/4, 3/8, 3/8 as Qwen2.5-VL's 16/24/24) at head dim 48.
    mrope = [6, 9, 9] if deep else [8, 12, 12]
    if spec.name == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                               num_attention_heads=3, image_size=336, patch_size=14)
        config = transformers.LlavaConfig(
            vision_config=vision, text_config=transformers.LlamaConfig(**text), image_token_id=ids["<image>"],
            vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=True,
        )
    elif spec.name == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(**text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": mrope}),
            vision_config=dict(depth=4 if deep else 3, hidden_size=192, intermediate_size=512, num_heads=3,
                               out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=168,
                               fullatt_block_indexes=[1, 3] if deep else [2], in_channels=3),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True,
        )
    else:
        config = transformers.InternVLConfig(
            vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                               image_size=[448, 448], patch_size=[14, 14], use_mean_pooling=False),
            text_config=dict(model_type="qwen2", **text), image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=256, downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=True,
        )
    if deep:
        setattr(config, CONFIG_KEY, spec.version)
    return config


def build_processor(spec: FamilySpec, tokenizer: Any) -> Any:
    """The family's real processor class, configured to match ``encode`` (single tile, native resolution)."""
    import transformers

    if spec.name == "llava":
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_convert_rgb=True)
        return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                           vision_feature_select_strategy="default", image_token="<image>",
                                           num_additional_image_tokens=1)
    if spec.name == "qwen2_5_vl":
        image_processor = transformers.Qwen2VLImageProcessor(
            min_pixels=56 * 56, max_pixels=336 * 336, patch_size=14, merge_size=2, temporal_patch_size=2)
        video_processor = transformers.Qwen2VLVideoProcessor(
            min_pixels=56 * 56, max_pixels=224 * 224 * 8, patch_size=14, merge_size=2, temporal_patch_size=2,
            do_sample_frames=False)
        return transformers.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                video_processor=video_processor)
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": 448, "width": 448}, crop_to_patches=False, max_patches=1, image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD)
    video_processor = transformers.InternVLVideoProcessor(
        size={"height": 448, "width": 448}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          video_processor=video_processor, image_seq_length=256)


# ------------------------------------------------------------------------------------------------------- encoding
def prompt_words(spec: FamilySpec, item: synth.Item) -> list[str]:
    """The prompt as vocabulary words, with one ``<V>`` marker per image or video."""
    start = ["<s>", "USER:"] if spec.version == 2 else ["USER:"]
    if item.kind == "multi":
        words = list(start)
        for answer in item.demo_answers:
            words += ["<V>", "label", answer]
        words += ["<V>", "label", "?", "ASSISTANT:"]
        return words
    if spec.version == 2 and spec.question_first:  # a recipe ablation, not the yardstick's layout
        return start + item.question.split() + ["<V>", "ASSISTANT:"]
    if spec.version == 2:  # BOS, image, question: as LLaVA's / Qwen's / InternVL's chat templates
        return start + ["<V>"] + item.question.split() + ["ASSISTANT:"]
    return start + item.question.split() + ["<V>", "ASSISTANT:"]


def prompt_text(spec: FamilySpec, item: synth.Item) -> str:
    """The same prompt as text for the family's processor (one image placeholder per image)."""
    placeholder = {"llava": "<image>", "qwen2_5_vl": "<|vision_start|> <|image_pad|> <|vision_end|>",
                   "internvl": "<IMG_CONTEXT>"}[spec.name]
    return " ".join(placeholder if w == "<V>" else w for w in prompt_words(spec, item))


def _normalise(images: Tensor, mean: tuple, std: tuple) -> Tensor:
    mean_t = torch.tensor(mean, device=images.device)[None, :, None, None]
    std_t = torch.tensor(std, device=images.device)[None, :, None, None]
    return (images - mean_t) / std_t


def _qwen_patches(frames: Tensor, temporal: int = 2, patch: int = 14, merge: int = 2) -> Tensor:
    """(T, 3, H, W) -> (T/temporal * H/patch * W/patch, 3*temporal*patch*patch) in Qwen's merge-block order."""
    t, c, h, w = frames.shape
    gh, gw = h // patch, w // patch
    x = frames.reshape(t // temporal, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape((t // temporal) * gh * gw, c * temporal * patch * patch)


def encode(spec: FamilySpec, items: list[synth.Item], device: torch.device | str = "cpu",
           with_answers: bool = False) -> dict[str, Tensor]:
    """Model inputs for a batch of items, left-padded; with_answers appends the answer's words + eos and returns
    labels on them (-100 elsewhere)."""
    ids = vocab(spec)
    rows, pixels, videos, image_grids, video_grids, supervised = [], [], [], [], [], []
    for item in items:
        tokens: list[int] = []
        media = iter(item.images if item.kind != "video" else [item.images])
        for word in prompt_words(spec, item):
            if word != "<V>":
                tokens.append(ids[word])
                continue
            scene = next(media)
            if spec.name == "llava":
                tokens += [ids["<image>"]] * (spec.image_size // 14) ** 2
                pixels.append(scene)
            elif spec.name == "internvl":
                tokens += [ids["<img>"]] + [ids["<IMG_CONTEXT>"]] * 256 + [ids["</img>"]]
                pixels.append(scene)
            elif item.kind == "video":
                grid = (len(scene) // 2, spec.video_size // 14, spec.video_size // 14)
                tokens += [ids["<|vision_start|>"]] + [ids["<|video_pad|>"]] * (grid[0] * grid[1] * grid[2] // 4)
                tokens += [ids["<|vision_end|>"]]
                videos.append(scene)
                video_grids.append(grid)
            else:
                grid = (1, spec.image_size // 14, spec.image_size // 14)
                tokens += [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * (grid[1] * grid[2] // 4)
                tokens += [ids["<|vision_end|>"]]
                pixels.append(scene)
                image_grids.append(grid)
        if with_answers:
            tokens += [ids[w] for w in item.answer.split()] + [ids["</s>"]]
            supervised.append(len(item.answer.split()) + 1)
        rows.append(tokens)

    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, tokens in enumerate(rows):
        input_ids[b, width - len(tokens):] = torch.tensor(tokens)
        attention_mask[b, width - len(tokens):] = 1
    batch: dict[str, Tensor] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if with_answers:
        labels = torch.full_like(input_ids, -100)
        for b, count in enumerate(supervised):
            labels[b, -count:] = input_ids[b, -count:]
        batch["labels"] = labels.to(device)

    render = spec.task.render
    if spec.name == "llava" and pixels:
        batch["pixel_values"] = _normalise(render(pixels, spec.image_size, device), CLIP_MEAN, CLIP_STD)
    elif spec.name == "internvl" and pixels:
        batch["pixel_values"] = _normalise(render(pixels, spec.image_size, device), IMAGENET_MEAN, IMAGENET_STD)
    elif spec.name == "qwen2_5_vl":
        if pixels:
            images = _normalise(render(pixels, spec.image_size, device), CLIP_MEAN, CLIP_STD)
            batch["pixel_values"] = torch.cat([_qwen_patches(img[None].expand(2, -1, -1, -1)) for img in images])
            batch["image_grid_thw"] = torch.tensor(image_grids, device=device)
        if videos:
            frames = [_normalise(render(v, spec.video_size, device), CLIP_MEAN, CLIP_STD) for v in videos]
            batch["pixel_values_videos"] = torch.cat([_qwen_patches(f) for f in frames])
            batch["video_grid_thw"] = torch.tensor(video_grids, device=device)
        token_type = torch.zeros_like(input_ids)
        token_type[input_ids == ids["<|image_pad|>"]] = 1
        token_type[input_ids == ids["<|video_pad|>"]] = 2
        batch["mm_token_type_ids"] = token_type.to(device)
    return batch


def answer_ids(spec: FamilySpec) -> Tensor:
    """Token ids of every possible answer word (greedy decoding restricted to nothing: used for diagnostics)."""
    ids = vocab(spec)
    return torch.tensor(sorted({ids[w] for w in spec.task.vocabulary() if w in ids}))


def decode_answers(spec: FamilySpec, token_ids: Tensor) -> list[str]:
    inverse = {i: w for w, i in vocab(spec).items()}
    return [inverse.get(int(t), "<unk>") for t in token_ids]
