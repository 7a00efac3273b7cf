"""Tiny random-weight model factories, one per family; the registry-driven test matrix runs on each of them.

Adding a family = one adapter file + one factory here: a ``Factory`` with ``model_type``, ``build(attn)`` and
``inputs(model, prompts, seed)``, plus ``image_positions`` / ``sample_inputs`` where the defaults (one fixed-size
run of image tokens per image, one ``pixel_values`` row per image) do not fit the family.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from vtprune.eval.tiny import tiny_llava


@dataclasses.dataclass
class Prompt:
    """One sample: how many images (and videos, for families that take them), how much text around them."""

    images: int = 1
    prefix: int = 3
    suffix: int = 4
    videos: int = 0


def left_pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of token-id rows, padded on the left with id 0."""
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        mask[b, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def unpadded_row(batch: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Row b of a left-padded batch, without its padding."""
    keep = batch["attention_mask"][b].bool()
    return {"input_ids": batch["input_ids"][b:b + 1, keep], "attention_mask": batch["attention_mask"][b:b + 1, keep]}


def _runs(mask: torch.Tensor) -> list[torch.Tensor]:
    """Positions of each contiguous run of True in a 1-D mask."""
    positions = mask.nonzero().squeeze(1)
    breaks = ((positions[1:] - positions[:-1]) != 1).nonzero().squeeze(1) + 1
    return list(positions.tensor_split(breaks)) if positions.numel() else []


def _prompt_order(prompt: Prompt) -> list[str]:
    """"image" / "video" in prompt order for families that interleave them: the videos follow the first image."""
    return ["image"] * min(prompt.images, 1) + ["video"] * prompt.videos + ["image"] * (prompt.images - 1)


class Factory:
    """What the test matrix needs from a family. The defaults fit families whose every image is one run of
    ``tokens_per_image(model)`` tokens and one ``pixel_values`` row (LLaVA-1.5)."""

    model_type = ""

    def image_positions(self, model, inputs) -> list[list[torch.Tensor]]:
        """Per sample, per image (in prompt order): original positions of its prunable tokens, in the order the
        adapter lists them, i.e. the order of the kept indices in ``last_stats``."""
        n = self.tokens_per_image(model)
        visual = inputs["input_ids"] == model.config.image_token_id
        return [list(visual[b].nonzero().squeeze(1).split(n)) for b in range(visual.shape[0])]

    def sample_inputs(self, batch, prompts: list[Prompt], b: int) -> dict[str, torch.Tensor]:
        """The inputs of prompt b alone, sliced out of a left-padded batch built by ``inputs``."""
        before = sum(p.images for p in prompts[:b])
        return {**unpadded_row(batch, b), "pixel_values": batch["pixel_values"][before:before + prompts[b].images]}


class LlavaFactory(Factory):
    model_type = "llava"

    def build(self, attn: str = "eager"):
        return tiny_llava("test", seed=0, attn_implementation=attn)

    def tokens_per_image(self, model) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def inputs(self, model, prompts: list[Prompt], seed: int = 0) -> dict[str, torch.Tensor]:
        """Left-padded batch with random text ids and random pixels, one pixel tensor per image in prompt order."""
        gen = torch.Generator().manual_seed(seed)
        image_id = model.config.image_token_id
        n = self.tokens_per_image(model)
        vocab = model.config.text_config.vocab_size
        rows, pixels = [], []
        for prompt in prompts:
            ids = [1] + torch.randint(8, vocab, (prompt.prefix,), generator=gen).tolist()
            for _ in range(prompt.images):
                ids += [image_id] * n + torch.randint(8, vocab, (2,), generator=gen).tolist()
                size = model.config.vision_config.image_size
                pixels.append(torch.randn(3, size, size, generator=gen))
            ids += torch.randint(8, vocab, (prompt.suffix,), generator=gen).tolist()
            rows.append(ids)
        out = left_pad(rows)
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out


def _tiny_text(config_cls, **extra):
    """A 4-layer x 64 text backbone config (Llama or Qwen2) with ids 0 pad, 1 bos, 2 eos."""
    return config_cls(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )


def _build(model_cls, config, attn: str):
    torch.manual_seed(0)
    return model_cls._from_config(config, attn_implementation=attn).eval()


class InternVLFactory(Factory):
    """InternVL with 32 px tiles of 4 px patches: 8 x 8 ViT patches, pixel-shuffled to 4 x 4 = 16 tokens per tile.

    Like the processor, each image is ``<img>`` + ``<IMG_CONTEXT>`` x 16 x tiles + ``</img>``, its tiles being the
    dynamic crops plus a thumbnail when there is more than one crop; the tile count cycles through 1, 3, 5, 4 so
    that token counts differ between images and samples. A video (``Prompt.videos``, after the first image) is
    ``Frame{i}: <img>`` + 16 tokens + ``</img>`` per frame, 2 frames, its pixels merged into ``pixel_values`` in
    prompt order as the processor does.
    """

    model_type = "internvl"
    context_id, start_id, end_id = 4, 5, 6
    tile_counts = (1, 3, 5, 4)
    frames = 2

    def build(self, attn: str = "eager"):
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

        vision = InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=4,
        )
        config = InternVLConfig(
            vision_config=vision, text_config=_tiny_text(Qwen2Config), image_token_id=self.context_id,
            image_seq_length=16,
        )
        return _build(InternVLForConditionalGeneration, config, attn)

    def inputs(self, model, prompts: list[Prompt], seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        vocab = model.config.text_config.vocab_size
        size = model.config.vision_config.image_size[0]
        rows, tiles = [], []
        for prompt in prompts:
            ids = [1] + torch.randint(8, vocab, (prompt.prefix,), generator=gen).tolist()
            for kind in _prompt_order(prompt):
                for frame in range(self.frames if kind == "video" else 1):
                    count = 1 if kind == "video" else self.tile_counts[(seed + len(tiles)) % len(self.tile_counts)]
                    if kind == "video":
                        ids += [8 + frame]  # the "Frame{i}:" label
                    ids += [self.start_id] + [self.context_id] * 16 * count + [self.end_id]
                    tiles.append(torch.randn(count, 3, size, size, generator=gen))
                ids += torch.randint(8, vocab, (2,), generator=gen).tolist()
            ids += torch.randint(8, vocab, (prompt.suffix,), generator=gen).tolist()
            rows.append(ids)
        return {**left_pad(rows), **({"pixel_values": torch.cat(tiles)} if tiles else {})}

    def image_positions(self, model, inputs) -> list[list[torch.Tensor]]:
        visual = inputs["input_ids"] == self.context_id
        return [_runs(visual[b]) for b in range(visual.shape[0])]

    def sample_inputs(self, batch, prompts: list[Prompt], b: int) -> dict[str, torch.Tensor]:
        context = batch["input_ids"] == self.context_id
        before, count = int(context[:b].sum()) // 16, int(context[b].sum()) // 16
        return {**unpadded_row(batch, b), "pixel_values": batch["pixel_values"][before:before + count]}


class _AnyResFactory(Factory):
    """Shared by LLaVA-NeXT and OneVision: 16 px tiles of 4 px patches (4 x 4 tokens per tile), grid pinpoints of up
    to 2 x 2 tiles; image sizes cycle through ``image_sizes`` so that tile grids, crops and newline rows differ
    between images and samples. Token counts come from the real processors' own formulas."""

    size, patch = 16, 4
    image_id = 4
    image_sizes = ((10, 30), (25, 25), (30, 12), (20, 20), (12, 40))

    @property
    def side(self) -> int:
        return self.size // self.patch

    def tiled_image(self, height: int, width: int) -> tuple[int, int, int]:
        """(tiles incl. base, grid rows, grid cols) of a tiled image, as the family's processor counts them."""
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution([height, width], self.pinpoints)
        unpadded, newlines = self.unpadded_features(height, width, best_h // self.size, best_w // self.size)
        return 1 + (best_h // self.size) * (best_w // self.size), newlines, unpadded // newlines

    @staticmethod
    def run_positions(run: torch.Tensor, base: int, rows: int, cols: int) -> torch.Tensor:
        """The prunable positions of an image's run: its base tokens, then every grid row without its newline."""
        grid = base + (torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)).flatten()
        return run[torch.cat((torch.arange(base), grid))]

    def pixels(self, gen, tile_counts: list[int]) -> torch.Tensor:
        """(images, max tiles, 3, S, S), zero beyond an image's tiles, as the image processor pads them."""
        pixels = torch.zeros(len(tile_counts), max(tile_counts), 3, self.size, self.size)
        for i, count in enumerate(tile_counts):
            pixels[i, :count] = torch.randn(count, 3, self.size, self.size, generator=gen)
        return pixels


class LlavaNextFactory(_AnyResFactory):
    model_type = "llava_next"
    pinpoints = [[16, 32], [32, 16], [32, 32]]

    def build(self, attn: str = "eager"):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=self.size,
            patch_size=self.patch, projection_dim=32,
        )
        config = LlavaNextConfig(
            vision_config=vision, text_config=_tiny_text(LlamaConfig), image_token_id=self.image_id,
            image_grid_pinpoints=self.pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
        return _build(LlavaNextForConditionalGeneration, config, attn)

    def unpadded_features(self, height: int, width: int, scale_h: int, scale_w: int) -> tuple[int, int]:
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

        # The processor's own arithmetic, called without building a processor (that needs a tokenizer).
        processor = types.SimpleNamespace()
        return LlavaNextProcessor._get_unpadded_features(
            processor, height, width, self.side, self.side, scale_h, scale_w
        )

    def inputs(self, model, prompts: list[Prompt], seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        vocab = model.config.text_config.vocab_size
        rows, sizes, tile_counts = [], [], []
        for prompt in prompts:
            ids = [1] + torch.randint(8, vocab, (prompt.prefix,), generator=gen).tolist()
            for _ in range(prompt.images):
                height, width = self.image_sizes[(seed + len(sizes)) % len(self.image_sizes)]
                tiles, grid_rows, grid_cols = self.tiled_image(height, width)
                ids += [self.image_id] * (self.side**2 + grid_rows * (grid_cols + 1))
                ids += torch.randint(8, vocab, (2,), generator=gen).tolist()
                sizes.append([height, width])
                tile_counts.append(tiles)
            ids += torch.randint(8, vocab, (prompt.suffix,), generator=gen).tolist()
            rows.append(ids)
        out = left_pad(rows)
        if sizes:
            out["pixel_values"], out["image_sizes"] = self.pixels(gen, tile_counts), torch.tensor(sizes)
        return out

    def image_positions(self, model, inputs) -> list[list[torch.Tensor]]:
        sizes = iter(inputs["image_sizes"].tolist())
        return [
            [self.run_positions(run, self.side**2, *self.tiled_image(*next(sizes))[1:]) for run in _runs(row)]
            for row in inputs["input_ids"] == self.image_id
        ]

    def sample_inputs(self, batch, prompts: list[Prompt], b: int) -> dict[str, torch.Tensor]:
        before, count = sum(p.images for p in prompts[:b]), prompts[b].images
        return {
            **unpadded_row(batch, b),
            "pixel_values": batch["pixel_values"][before:before + count],
            "image_sizes": batch["image_sizes"][before:before + count],
        }


class LlavaOnevisionFactory(_AnyResFactory):
    """OneVision with a SigLIP tower (no CLS) and ``anyres_max_2``, so that large grids are down-sized.

    A prompt with one image is tiled; a prompt with several images is OneVision's multi-image mode (no tiling: base
    tile + newline each). A video (``Prompt.videos``, after the first image) has 2 frames of 2 x 2 pooled tokens
    and a closing newline.
    """

    model_type = "llava_onevision"
    video_id = 5
    frames = 2
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    aspect_ratio = "anyres_max_2"

    def build(self, attn: str = "eager"):
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
            Qwen2Config,
            SiglipVisionConfig,
        )

        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=self.size,
            patch_size=self.patch,
        )
        config = LlavaOnevisionConfig(
            vision_config=vision, text_config=_tiny_text(Qwen2Config), image_token_id=self.image_id,
            video_token_id=self.video_id, image_grid_pinpoints=self.pinpoints, vision_aspect_ratio=self.aspect_ratio,
        )
        return _build(LlavaOnevisionForConditionalGeneration, config, attn)

    def unpadded_features(self, height: int, width: int, scale_h: int, scale_w: int) -> tuple[int, int]:
        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

        processor = types.SimpleNamespace(vision_aspect_ratio=self.aspect_ratio)
        return LlavaOnevisionProcessor._get_unpadded_features(
            processor, height, width, self.side, self.side, scale_h, scale_w
        )

    @property
    def video_tokens(self) -> int:
        return self.frames * math.ceil(self.side / 2) ** 2 + 1

    def inputs(self, model, prompts: list[Prompt], seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        vocab = model.config.text_config.vocab_size
        rows, sizes, tile_counts, videos = [], [], [], []
        for prompt in prompts:
            ids = [1] + torch.randint(8, vocab, (prompt.prefix,), generator=gen).tolist()
            for kind in _prompt_order(prompt):
                if kind == "video":
                    ids += [self.video_id] * self.video_tokens
                    videos.append(torch.randn(self.frames, 3, self.size, self.size, generator=gen))
                else:
                    height, width = self.image_sizes[(seed + len(sizes)) % len(self.image_sizes)]
                    if prompt.images == 1:
                        tiles, grid_rows, grid_cols = self.tiled_image(height, width)
                        ids += [self.image_id] * (self.side**2 + grid_rows * (grid_cols + 1))
                    else:
                        tiles = 1
                        ids += [self.image_id] * (self.side**2 + 1)
                    sizes.append([height, width])
                    tile_counts.append(tiles)
                ids += torch.randint(8, vocab, (2,), generator=gen).tolist()
            ids += torch.randint(8, vocab, (prompt.suffix,), generator=gen).tolist()
            rows.append(ids)
        out = {**left_pad(rows), "batch_num_images": torch.tensor([p.images for p in prompts])}
        if sizes:
            out["pixel_values"], out["image_sizes"] = self.pixels(gen, tile_counts), torch.tensor(sizes)
        if videos:
            out["pixel_values_videos"] = torch.stack(videos)
        return out

    def image_positions(self, model, inputs) -> list[list[torch.Tensor]]:
        sizes = iter(inputs["image_sizes"].tolist() if "image_sizes" in inputs else [])
        out = []
        for b, count in enumerate(inputs["batch_num_images"].tolist()):
            entries = []
            for run in _runs(inputs["input_ids"][b] == self.image_id):
                size = next(sizes)
                if count == 1:
                    entries.append(self.run_positions(run, self.side**2, *self.tiled_image(*size)[1:]))
                else:
                    entries.append(run[:-1])
            for run in _runs(inputs["input_ids"][b] == self.video_id):
                entries.append(run[:-1])
            out.append(sorted(entries, key=lambda positions: int(positions[0])))
        return out

    def sample_inputs(self, batch, prompts: list[Prompt], b: int) -> dict[str, torch.Tensor]:
        before, count = sum(p.images for p in prompts[:b]), prompts[b].images
        videos_before, videos = sum(p.videos for p in prompts[:b]), prompts[b].videos
        out = {**unpadded_row(batch, b), "batch_num_images": batch["batch_num_images"][b:b + 1]}
        if count:
            out["pixel_values"] = batch["pixel_values"][before:before + count]
            out["image_sizes"] = batch["image_sizes"][before:before + count]
        if videos:
            out["pixel_values_videos"] = batch["pixel_values_videos"][videos_before:videos_before + videos]
        return out


class _QwenFactory(Factory):
    """Shared by Qwen2-VL, Qwen2.5-VL and Qwen3-VL: 4 px patches, 2 x 2 merge, a 2-block ViT and the 4-layer text
    model. Pixels are flattened patches ``(sum t*h*w, 3 * 2 * 4 * 4)`` with ``image_grid_thw``, as the processor
    gives them, and ``mm_token_type_ids`` marks image (1) and video (2) tokens.

    Images cycle through patch grids of different shapes but the same 16 merged tokens (``tokens_per_image``), so
    that layouts and M-RoPE positions differ between images while per-image budgets stay comparable. A video
    (``Prompt.videos``, after the first image; ``sequence_inputs`` takes any order) has 2 temporal patches of 4 x 6
    patches: 12 merged tokens.
    """

    image_id, video_id, start_id, end_id = 5, 6, 3, 4
    image_grids = ((8, 8), (4, 16), (16, 4))
    video_grid = (2, 4, 6)
    merge = 2
    # Qwen3-VL's processor writes each video frame as its own run, after a timestamp in text.
    frame_runs = False

    def text_config(self, **extra) -> dict:
        return dict(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], **extra},
        )

    def ids(self) -> dict:
        return dict(
            image_token_id=self.image_id, video_token_id=self.video_id, vision_start_token_id=self.start_id,
            vision_end_token_id=self.end_id,
        )

    def tokens_per_image(self, model) -> int:
        return self.image_grids[0][0] * self.image_grids[0][1] // self.merge**2

    def inputs(self, model, prompts: list[Prompt], seed: int = 0) -> dict[str, torch.Tensor]:
        samples = [(p.prefix, _prompt_order(p), p.suffix) for p in prompts]
        return self.sequence_inputs(model, samples, seed)

    def sequence_inputs(self, model, samples: list[tuple[int, list[str], int]], seed: int = 0) -> dict:
        """Like ``inputs``, for samples given as (prefix, ["image" | "video", ...] in prompt order, suffix)."""
        gen = torch.Generator().manual_seed(seed)
        vision = model.config.vision_config
        vocab = model.config.text_config.vocab_size
        patch_dim = 3 * vision.temporal_patch_size * vision.patch_size**2
        unit = self.merge**2
        rows, pixels, grids, video_pixels, video_grids = [], [], [], [], []

        def text(n: int) -> list[int]:
            return torch.randint(8, vocab, (n,), generator=gen).tolist()

        for prefix, kinds, suffix in samples:
            ids = [1] + text(prefix)
            for kind in kinds:
                if kind == "image":
                    h, w = self.image_grids[len(grids) % len(self.image_grids)]
                    ids += [self.start_id] + [self.image_id] * (h * w // unit) + [self.end_id]
                    pixels.append(torch.randn(h * w, patch_dim, generator=gen))
                    grids.append([1, h, w])
                else:
                    t, h, w = self.video_grid
                    runs = [h * w // unit] * t if self.frame_runs else [t * h * w // unit]
                    for count in runs:
                        ids += text(1) if self.frame_runs else []
                        ids += [self.start_id] + [self.video_id] * count + [self.end_id]
                    video_pixels.append(torch.randn(t * h * w, patch_dim, generator=gen))
                    video_grids.append([t, h, w])
                ids += text(2)
            ids += text(suffix)
            rows.append(ids)
        out = left_pad(rows)
        token_types = torch.zeros_like(out["input_ids"])
        token_types[out["input_ids"] == self.image_id] = 1
        token_types[out["input_ids"] == self.video_id] = 2
        out["mm_token_type_ids"] = token_types
        if grids:
            out["pixel_values"], out["image_grid_thw"] = torch.cat(pixels), torch.tensor(grids)
        if video_grids:
            out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(video_pixels), torch.tensor(video_grids)
        return out

    def image_positions(self, model, inputs) -> list[list[torch.Tensor]]:
        """Images and videos of each sample in prompt order; a video's tokens are all its frames'."""
        unit = self.merge**2
        counts = {
            kind: iter((inputs[f"{kind}_grid_thw"].prod(-1) // unit).tolist() if f"{kind}_grid_thw" in inputs else [])
            for kind in ("image", "video")
        }
        out = []
        for row in inputs["input_ids"]:
            entries = []
            for kind, token in (("image", self.image_id), ("video", self.video_id)):
                positions = (row == token).nonzero().squeeze(1)
                while positions.numel():
                    count = next(counts[kind])
                    entries.append(positions[:count])
                    positions = positions[count:]
            out.append(sorted(entries, key=lambda positions: int(positions[0])))
        return out

    def sample_inputs(self, batch, prompts: list[Prompt], b: int) -> dict[str, torch.Tensor]:
        keep = batch["attention_mask"][b].bool()
        out = {**unpadded_row(batch, b), "mm_token_type_ids": batch["mm_token_type_ids"][b:b + 1, keep]}
        for kind, pixels, count, before in (
            ("image", "pixel_values", prompts[b].images, sum(p.images for p in prompts[:b])),
            ("video", "pixel_values_videos", prompts[b].videos, sum(p.videos for p in prompts[:b])),
        ):
            if count:
                grids = batch[f"{kind}_grid_thw"]
                start = int(grids[:before].prod(-1).sum())
                stop = start + int(grids[before:before + count].prod(-1).sum())
                out[pixels], out[f"{kind}_grid_thw"] = batch[pixels][start:stop], grids[before:before + count]
        return out


class Qwen2VLFactory(_QwenFactory):
    model_type = "qwen2_vl"

    def build(self, attn: str = "eager"):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = Qwen2VLConfig(vision_config=vision, text_config=self.text_config(), **self.ids())
        return _build(Qwen2VLForConditionalGeneration, config, attn)


class Qwen25VLFactory(_QwenFactory):
    """Windows of 2 x 2 merged tokens (16 px) in block 0, full attention in block 1."""

    model_type = "qwen2_5_vl"

    def build(self, attn: str = "eager"):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(
            depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
        )
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=self.text_config(), **self.ids())
        return _build(Qwen2_5_VLForConditionalGeneration, config, attn)


class Qwen3VLFactory(_QwenFactory):
    """DeepStack from both ViT blocks into decoder layers 0 and 1; interleaved M-RoPE; q/k norms."""

    model_type = "qwen3_vl"
    frame_runs = True

    def build(self, attn: str = "eager"):
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        vision = dict(
            depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1],
        )
        text = {**self.text_config(mrope_interleaved=True), "head_dim": 16}
        config = Qwen3VLConfig(vision_config=vision, text_config=text, **self.ids())
        return _build(Qwen3VLForConditionalGeneration, config, attn)


# The concrete insertion points the matrix runs a where= method at, one per entry of Pruner.points (K = 2, the
# middle of the 4-layer test LLMs; llm:0 as well, which drops at the LLM entry like the points before it).
MATRIX_POINTS = {
    "encoder": ("encoder",), "projector": ("projector",), "llm:K": ("llm:0", "llm:2"), "decode:K": ("decode:2",),
}


def matrix_points(method: str) -> list[str | None]:
    """The where= values the matrix runs ``method`` at: the concrete points of its ``Pruner.points`` for a method
    that takes where= (a ``WhereConfig``); [None] (its own options' stages) for the others."""
    from vtprune.config import WhereConfig
    from vtprune.registry import get_pruner_class

    cls = get_pruner_class(method)
    if not issubclass(cls.config_cls, WhereConfig):
        return [None]
    # A config may narrow a pattern (FastV scores with layer K-1's attention: llm:K with K >= 1); it refuses the
    # others with a ValueError, which the bad-arguments tests check.
    return [where for pattern in cls.points for where in MATRIX_POINTS[pattern] if _accepts(cls.config_cls, where)]


def _accepts(config_cls, where: str) -> bool:
    try:
        config_cls(where=where)
    except ValueError:
        return False
    return True


FACTORIES = {
    factory.model_type: factory
    for factory in (
        LlavaFactory(), InternVLFactory(), LlavaNextFactory(), LlavaOnevisionFactory(), Qwen2VLFactory(),
        Qwen25VLFactory(), Qwen3VLFactory(),
    )
}


@pytest.fixture(params=sorted(FACTORIES))
def factory(request):
    return FACTORIES[request.param]
