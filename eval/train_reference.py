"""Train a reference checkpoint of one family on the yardstick (run on the lent GPU; see eval/results/TRAINING.md).

    python -m vtprune.eval.train_reference --family llava --minutes 15 --out checkpoints/v2/llava
    python -m vtprune.eval.train_reference --family llava --minutes 7 --out part1 --plan-minutes 15
    python -m vtprune.eval.train_reference --family llava --minutes 8 --out part2 --resume part1

Recipe of yardstick version 2 (issue "Yardstick v2"; version 1 was trained by the same file at commit 7f81b25):
1. **dense vision pre-training**: linear heads on the visual features the LLM consumes predict, for every patch,
   the colour, shape and glyph under it (targets the generator knows), with object and glyph patches weighted
   ``object_weight`` times the background (which otherwise dominates the loss and hides weak shape features); a
   **global head** on the vision tower's CLS token (CLIP, InternViT) at the feature layer and at the last layer
   predicts which colour x shape pairs, tag colours and characters are in the image and how many objects, so the
   layers above the feature layer are trained and the CLS attention that ToDRE / VisionZip / MustDrop read lands
   on the objects. The phase ends when the running shape accuracy on object patches reaches ``shape_gate`` and the
   glyph accuracy on glyph patches ``glyph_gate``, or after ``dense_fraction`` of the planned time;
2. **VQA**: the whole model on single-word answers (loss on the answer and the end-of-sequence token), the vision
   side at ``vision_lr_scale`` of the learning rate, categories mixed inside every batch, answers balanced per
   category; the global head keeps training at ``global_weight_vqa``. A ``caption_share`` of the items are
   "describe the image" captions (``synth_v2.caption_item``: every object's colour, shape and quadrant and every
   tag's character, in reading order), the captioning stage of a real VLM recipe: many supervised words per image,
   each one needing the LLM to find an object among the visual tokens. Added after runs 1 and 2 (no captions)
   stayed at chance; run 3's ablation (TRAINING.md) showed that captions leave the plateau and that v1's
   question-first order learns no faster, so the families' layout stays. Learning rate: linear warm-up,
   constant, then a cosine decay over the last ``decay_fraction`` of the planned VQA time (a warm-up suited to
   depth: the 12-layer LLMs diverge without it).
Optionally (``drop_keep`` < 1) the VQA phase starts with an object-biased token-drop curriculum (``CurriculumDrop``):
the LLM first sees each image's object tokens plus a few random background tokens, then more background until whole
images; added after runs 1 and 2 for the same reason as the captions. It ends on whole images, but it does show the
models shortened visual sequences, so they may be more robust to pruning than real VLMs: README reports
``random@0.33`` against unpruned for that reason. **Known broken on CUDA** (run 3, TRAINING.md): both variants that
used it went to NaN early on the H200, while a single pruned step is finite there and on CPU (probe); off by
default and not to be used until the cause is found.

Optionally (``token_dropout`` > 0, run 6) half or so of the VQA images show the LLM a random subset of their tokens
(``dropout_attention_mask``: a 4-D mask, original positions, no row fully masked), and with ``dropout_enriched`` a
share of those keep all their object tokens, the subset drawn from the background (``object_tokens``). Run 6 used
plain random subsets: robust to pruning, but its model counts from the share of object tokens it sees.

Seeded, with a progress bar, bf16 autocast through accelerate. The budget is wall-clock time so one command fits a
lease; ``--plan-minutes`` is the whole run's plan and ``--resume DIR`` continues a saved part: weights, heads,
phase, step and the schedule's position come back (``train_state.json``); the optimizer restarts with a short
re-warm-up, since only small files come back from the device machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from vtprune.eval import accuracy, reference

STATE_FILE = "train_state.json"
HEADS_FILE = "heads.pt"
# Set by jobs.recipe_ablation, not by this CLI.
ABLATION_FIELDS = ("text_layers", "categories", "question_first", "log_every")


POSITION_INITS = ("sincos", "default")
SINCOS_SCALE = 0.5  # sin-cos amplitude: RMS 0.35, about the RMS of a fresh CLIP patch embedding (0.02 x sqrt(588))


@dataclass(frozen=True)
class RecipeConfig:
    """One reference run. ``minutes`` is this call's time; ``plan_minutes`` the whole run's (default: minutes).
    (Not ``vtprune.TrainConfig``, which configures the LoRA recovery fine-tune of ``vtprune.train``.)"""

    family: str
    version: int = 2
    minutes: float = 15.0
    plan_minutes: float | None = None
    dense_fraction: float = 0.3  # longest share of the plan spent in dense pre-training
    shape_gate: float = 0.95  # running shape accuracy on object patches that ends the dense phase
    glyph_gate: float = 0.90  # running glyph accuracy on glyph patches, likewise
    object_weight: float = 20.0  # dense-loss weight of object / glyph patches vs the background (run 4: 20 > 8)
    # Initial absolute position embeddings of the CLIP / InternViT towers (Qwen's tower has 2-D RoPE): "sincos"
    # (2-D sine-cosine, as MAE's ViT) or "default" (transformers' init: N(0, 0.02) for CLIP, zeros for InternViT,
    # i.e. almost no position signal in a tower trained from scratch).
    position_init: str = "sincos"
    # Locality prior of the CLIP / InternViT towers' attention (run 4: their glyphs never learn, where Qwen's tower,
    # windowed and with 2-D RoPE, learns them): with ``local_attention_gain`` > 0 every layer's query and key
    # projections start as ``init_local_attention`` sets them (each head reads one band of the sine-cosine code, so
    # q . k starts as a decaying function of patch distance); 0 keeps transformers' random init. Needs "sincos".
    local_attention_gain: float = 0.0
    # Where InternVL's dense heads read: "tower" (each of the 32 x 32 patch features) or "merged" (the 16 x 16 pixel-
    # shuffled 2 x 2 groups its projector consumes, 4 sub-patch labels each, as Qwen's merged tokens are trained).
    dense_point: str = "tower"
    global_weight_vqa: float = 0.1
    lr: float = 8e-4
    vision_lr_scale: float = 0.3
    weight_decay: float = 0.01
    warmup_steps: int = 300
    rewarmup_steps: int = 50  # after a resume (fresh optimizer)
    decay_fraction: float = 0.3
    batch: int = 64  # items per VQA batch (in-context items hold 3 images, videos 8 frames)
    batch_dense: int = 64
    caption_share: float = 0.3  # share of VQA-phase items that are "describe" captions (synth_v2.caption_item)
    # Object-biased token-drop curriculum of the VQA phase (``CurriculumDrop``): each image shows the LLM its object
    # and glyph tokens plus random background tokens, ``drop_keep`` of its tokens at the start of VQA, rising
    # linearly to every token over ``drop_fraction`` of the planned VQA time. 1.0 = off.
    drop_keep: float = 1.0
    drop_fraction: float = 0.5
    # Random token dropout of the VQA phase (run 5: a model trained on whole images only answered worse from the
    # object oracle's 11% of the tokens than from a uniform lattice, i.e. it had learned to read the objects through
    # background tokens and broke on any other subset): a share ``token_dropout`` of the VQA images show the LLM a
    # random subset of their visual tokens, a fraction drawn log-uniformly in [``dropout_min_keep``, 1], by hiding
    # the other tokens' keys in every LLM layer (``dropout_attention_mask``: original positions, nothing removed, so
    # a step costs what a whole-image step costs). Unbiased: the subsets favour no selection rule. 0 = off.
    token_dropout: float = 0.0
    dropout_min_keep: float = 0.05
    # Of the dropped-out images, the share whose object and glyph tokens (coverage >= 0.2) all stay visible, the
    # random subset drawn from the background only: object-enriched subsets, as a good selection makes them. Run 6's
    # ablation: a model trained with uniform random subsets counts from the share of object tokens among those it
    # sees (the oracle's enriched subsets made it over-count by 1.4 on average), a cue that such subsets break.
    dropout_enriched: float = 0.0
    seed: int = 0
    # Ablations only (``jobs.recipe_ablation``): a checkpoint trained with these is not a yardstick checkpoint.
    text_layers: int | None = None  # LLM depth instead of the spec's
    categories: tuple[str, ...] | None = None  # VQA categories instead of all of the family's
    question_first: bool = False  # v1's prompt order (question, then image) instead of the families' layout
    log_every: int = 200

    def __post_init__(self) -> None:
        if self.minutes < 0 or (self.plan_minutes is not None and self.plan_minutes <= 0):
            raise ValueError("minutes must be >= 0 and plan_minutes > 0.")
        if self.text_layers is not None and self.text_layers < 1:
            raise ValueError(f"text_layers must be at least 1, got {self.text_layers}.")
        if self.log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {self.log_every}.")
        if self.dense_point not in ("tower", "merged"):
            raise ValueError(f"dense_point must be 'tower' or 'merged', got {self.dense_point!r}.")
        if self.dense_point == "merged" and self.family != "internvl":
            raise ValueError("dense_point='merged' is InternVL's option (Qwen's dense heads always read merged "
                             "tokens, LLaVA's tower has no merge).")
        if self.position_init not in POSITION_INITS:
            raise ValueError(f"position_init must be one of {POSITION_INITS}, got {self.position_init!r}.")
        if self.local_attention_gain < 0 or (self.local_attention_gain and self.position_init != "sincos"):
            raise ValueError("local_attention_gain must be >= 0 and needs position_init='sincos' (the heads read "
                             f"its code), got {self.local_attention_gain} with {self.position_init!r}.")
        if not 0 < self.drop_keep <= 1:
            raise ValueError(f"drop_keep must be in (0, 1], got {self.drop_keep}.")
        if not 0 < self.dropout_min_keep <= 1:
            raise ValueError(f"dropout_min_keep must be in (0, 1], got {self.dropout_min_keep}.")
        for name in ("dense_fraction", "decay_fraction", "shape_gate", "glyph_gate", "caption_share",
                     "drop_fraction", "token_dropout", "dropout_enriched"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")

    @property
    def plan_seconds(self) -> float:
        return 60 * (self.plan_minutes if self.plan_minutes is not None else self.minutes)

    def curriculum_keep(self, progress: float) -> float:
        """Keep fraction of the token-drop curriculum at ``progress`` in [0, 1] of the planned VQA time."""
        if self.drop_keep >= 1 or self.drop_fraction == 0 or progress >= self.drop_fraction:
            return 1.0
        return self.drop_keep + (1 - self.drop_keep) * progress / self.drop_fraction


class CurriculumDrop(accuracy.ObjectOracle):
    """Training only: keeps every object and glyph token (coverage >= 0.2, most covered first) and fills the
    budget with background tokens in random order, at original positions. Early in VQA the target's 3-6 tokens are
    then a share of about 5% of what the LLM sees instead of 1% of 576, so the gradient that teaches the LLM to
    find the asked object among the visual tokens is several times stronger; the curriculum ends on whole images
    (``RecipeConfig.curriculum_keep``). Not a method and never used at evaluation."""

    def _pick(self, on_object: torch.Tensor, asked: torch.Tensor, image) -> torch.Tensor:
        order, background = self._ranked(on_object, asked)
        background = background[torch.randperm(background.numel(), device=background.device)]
        return torch.cat((order, background))[: image.budget]


def dropout_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, visual_ids: torch.Tensor,
                           share: float, min_keep: float, generator: torch.Generator | None = None,
                           protected: torch.Tensor | None = None, enriched: float = 0.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-D attention mask of a token-dropout step (``RecipeConfig.token_dropout``) and the hidden tokens.

    Each image (a maximal run of visual tokens in a row) is, with probability ``share``, shown as a random subset:
    a fraction f ~ log-uniform[min_keep, 1] of its tokens, each kept independently with probability f. A hidden
    token's key is masked in every query row but its own, so no row is ever fully masked (no NaN from the attention
    softmax) and every kept token keeps its original position. With ``protected`` (B, L) bool, a share ``enriched``
    of the dropped-out images keep every protected token (their objects) and draw the subset from the rest.

    Returns:
        (mask, hidden): mask (B, 1, L, L) bool, True = may attend (causal, padding-aware), as transformers takes a
        prepared 4-D mask as is; hidden (B, L) bool.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    visual = torch.isin(input_ids, visual_ids.to(device))
    starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
    run = torch.cumsum(starts.reshape(-1).long(), 0).reshape(batch, length) - 1  # image index over the batch
    images = int(starts.sum())
    draw = torch.rand(images, generator=generator).to(device)
    fraction = torch.exp(torch.rand(images, generator=generator).to(device) * math.log(min_keep))
    fraction = torch.where(draw < share, fraction, torch.ones_like(fraction))
    token_draw = torch.rand(batch, length, generator=generator).to(device)
    hidden = visual & (token_draw >= fraction[run.clamp(min=0)])
    if protected is not None and enriched > 0:
        enrich = torch.rand(images, generator=generator).to(device) < enriched
        hidden = hidden & ~(protected & enrich[run.clamp(min=0)])
    key_ok = attention_mask.bool() & ~hidden
    positions = torch.arange(length, device=device)
    causal = positions[None, :] <= positions[:, None]
    mask = (causal[None] & key_ok[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)[None]
    return mask[:, None], hidden


def object_tokens(spec, items, input_ids: torch.Tensor, visual_ids: torch.Tensor, min_coverage: float = 0.2
                  ) -> torch.Tensor:
    """(B, L) bool: the visual tokens an object or a glyph covers >= ``min_coverage`` of (the oracle's rule), from
    the generator's scenes; each item's images (or its video: two frames per temporal token, the more covered
    counts) in sequence order."""
    device = input_ids.device
    out = torch.zeros(input_ids.shape, dtype=torch.bool, device=device)
    for row, item in enumerate(items):
        if item.kind == "video":
            cover, _ = accuracy.token_coverage(spec, item.images, spec.video_size // 28, device)
            cover = cover.view(-1, 2, cover.shape[-1]).amax(1).flatten()
        else:
            cover = accuracy.token_coverage(spec, item.images, accuracy.token_side(spec), device)[0].flatten()
        positions = torch.isin(input_ids[row], visual_ids.to(device)).nonzero().squeeze(1)
        if positions.numel() != cover.numel():
            raise RuntimeError(f"item {row}: {positions.numel()} visual tokens, {cover.numel()} covered cells.")
        out[row, positions] = cover >= min_coverage
    return out


class DenseHeads(nn.Module):
    """Per-patch colour / shape / glyph classifiers on the visual features (``sub`` sub-patches per token)."""

    def __init__(self, task, width: int, sub: int = 1) -> None:
        super().__init__()
        self.sub = sub
        self.colour = nn.Linear(width, sub * (len(task.COLOURS) + 1))
        self.shape = nn.Linear(width, sub * (len(task.SHAPES) + 2))
        self.char = nn.Linear(width, sub * (len(task.CHARS) + 1))

    def loss(self, features: torch.Tensor, labels: dict[str, torch.Tensor], object_weight: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted cross-entropy over the three label maps, and accuracies on the patches that matter: shape and
        colour on object patches, the character on glyph patches."""
        foreground = labels["shape"].reshape(-1) > 0
        weight = 1.0 + (object_weight - 1.0) * foreground.float()
        total, metrics = 0.0, {}
        for name in ("colour", "shape", "char"):
            logits = getattr(self, name)(features.float())
            logits = logits.reshape(-1, logits.shape[-1] // self.sub)
            target = labels[name].reshape(-1)
            per_patch = nn.functional.cross_entropy(logits, target, reduction="none")
            total = total + (per_patch * weight).sum() / weight.sum()
            on = target > 0 if name == "char" else foreground
            hit = (logits.argmax(-1) == target) & on
            # A device tensor (NaN where no patch counts): the loop reads every metric in one host sync per step.
            metrics[f"{name}_fg"] = hit.float().sum() / on.float().sum()
        return total, metrics


class GlobalHead(nn.Module):
    """Multi-label "what is in the image" (colour x shape pairs, tag colours, characters) and the object count, from
    a CLS vector."""

    def __init__(self, task, width: int) -> None:
        super().__init__()
        self.pairs = len(task.COLOURS) * len(task.SHAPES)
        self.outputs = self.pairs + len(task.COLOURS) + len(task.CHARS)
        self.present = nn.Linear(width, self.outputs)
        self.count = nn.Linear(width, 8)

    def targets(self, task, scenes: list, device) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.zeros(len(scenes), self.outputs)
        count = torch.zeros(len(scenes), dtype=torch.long)
        for i, scene in enumerate(scenes):
            for obj in scene.objects:
                present[i, obj.colour * len(task.SHAPES) + obj.shape] = 1
            for tag in getattr(scene, "tags", ()):
                present[i, self.pairs + tag.colour] = 1
                present[i, self.pairs + len(task.COLOURS) + tag.char] = 1
            count[i] = min(len(scene.objects), 7)
        return present.to(device), count.to(device)

    def loss(self, cls: torch.Tensor, present: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        cls = cls.float()
        return (nn.functional.binary_cross_entropy_with_logits(self.present(cls), present)
                + nn.functional.cross_entropy(self.count(cls), count))


def _vision_outputs(family: str, model: nn.Module, batch: dict, merged: bool = False
                    ) -> tuple[torch.Tensor, list[torch.Tensor], int, int]:
    """(tokens, width) patch features of every image as the LLM consumes them (before the projector; with
    ``merged``, InternVL's pixel-shuffled groups), the CLS vectors to train (feature layer and last layer; none for
    Qwen's tower, which has no CLS), the grid side of the label map and sub-patches per token."""
    inner = model.model
    if family == "qwen2_5_vl":
        tokens = inner.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        return tokens, [], 24, 4
    feature, cls_vectors = _tower_outputs(family, model, inner.vision_tower(batch["pixel_values"],
                                                                            output_hidden_states=True))
    grid = 24 if family == "llava" else 32
    if merged:
        patches = feature[:, 1:].reshape(feature.shape[0], grid, grid, -1)
        shuffled = inner.pixel_shuffle(patches, scale_factor=model.config.downsample_ratio)
        return shuffled.reshape(feature.shape[0], -1, shuffled.shape[-1]), cls_vectors, grid, 4
    return feature[:, 1:], cls_vectors, grid, 1


def merge_order(model: nn.Module, grid: int) -> torch.Tensor:
    """(tokens, 4) patch index (row-major on the grid x grid lattice) of each slot of InternVL's pixel-shuffled
    tokens, read off transformers' own ``pixel_shuffle`` applied to the patch indices (so its transposes count)."""
    index = torch.arange(grid * grid, dtype=torch.float32).view(1, grid, grid, 1)
    shuffled = model.model.pixel_shuffle(index, scale_factor=model.config.downsample_ratio)
    return shuffled.reshape(-1, shuffled.shape[-1]).long()


def _tower_outputs(family: str, model: nn.Module, out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The feature layer's hidden states (CLS first) of a CLIP / InternViT tower output, picked as transformers'
    LLaVA / InternVL do (layer -1 is the tower's normed last_hidden_state), and the CLS vectors to train."""
    layer = model.config.vision_feature_layer
    feature = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    if family == "llava":
        # LLaVA-1.5 consumes layer -2; the last layer only runs, so a head on its pooled CLS trains it.
        return feature, [feature[:, 0], out.pooler_output]
    return feature, [feature[:, 0]]


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """(side * side, width) 2-D sine-cosine position code of a side x side patch grid in row-major order: the first
    half of the channels encodes the row, the second the column, each as sines then cosines of ``width / 4``
    frequencies from 1 to 1 / 10000 (MAE's ViT)."""
    if width % 4:
        raise ValueError(f"a 2-D sine-cosine code needs a width divisible by 4, got {width}.")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angle = axis[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def init_sincos_positions(family: str, model: nn.Module) -> None:
    """Overwrite the absolute position embeddings of a fresh CLIP (LLaVA) or InternViT (InternVL) tower with
    ``SINCOS_SCALE`` x ``sincos_2d`` (the CLS position zero); they stay trainable. Qwen's tower (2-D RoPE) has none."""
    if family == "qwen2_5_vl":
        return
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings  # transformers 5.x: CLIPVisionModel holds them
    table = embeddings.position_embeddings if family == "internvl" else embeddings.position_embedding.weight
    rows = table.shape[-2] - 1
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"{family}'s tower has {rows} patch positions, not a square grid.")
    code = torch.cat((torch.zeros(1, table.shape[-1]), SINCOS_SCALE * sincos_2d(side, table.shape[-1])))
    with torch.no_grad():
        table.copy_(code.view(table.shape).to(table.dtype))


def init_local_attention(family: str, model: nn.Module, gain: float) -> None:
    """Start every attention layer of a fresh CLIP / InternViT tower local. ``sincos_2d`` lays out its code as
    [sin rows, cos rows, sin columns, cos columns] over ``width / 4`` frequencies, high to low; head ``h`` of
    ``heads`` gets the ``h``-th band of ``width / (4 heads)`` frequencies, and its query and key projections both pick
    those channels (times ``gain``, zero bias). Then q_i . k_j ~ gain^2 sum_f [cos(w_f dr) + cos(w_f dc)] over the
    position part of the tokens: head 0 (highest frequencies) attends to nearby patches, the last head broadly. The
    content part of the tokens adds noise; every weight stays trainable. Qwen's tower (windowed, 2-D RoPE) is left
    alone."""
    if family == "qwen2_5_vl":
        return
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)
    config = model.config.vision_config
    width, heads = config.hidden_size, config.num_attention_heads
    head_dim = width // heads
    if width % 4 or head_dim % 4:
        raise ValueError(f"a local attention init needs width and head size divisible by 4, got {width} / {head_dim}.")
    quarter, per_head = width // 4, head_dim // 4
    rows = torch.arange(width)
    head, slot = rows // head_dim, rows % head_dim
    channel = (slot % 4) * quarter + head * per_head + slot // 4  # (part, frequency) of the code this row reads
    weight = torch.zeros(width, width)
    weight[rows, channel] = gain
    layers = vision.encoder.layers if hasattr(vision.encoder, "layers") else vision.encoder.layer
    with torch.no_grad():
        for layer in layers:
            attention = getattr(layer, "self_attn", None) or layer.attention
            for proj in (attention.q_proj, attention.k_proj):
                proj.weight.copy_(weight.to(proj.weight.dtype))
                if proj.bias is not None:
                    proj.bias.zero_()


def dense_labels(family: str, task, scenes: list, grid: int, device, order: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """Label maps per patch (N, grid * grid), or per merged token (N, tokens, 4): Qwen's 2 x 2 merge, or the slots
    of InternVL's pixel shuffle given by ``order`` (``merge_order``)."""
    labels = task.label_maps(scenes, grid, device)
    if order is not None:
        return {k: v.reshape(v.shape[0], -1)[:, order.to(v.device)] for k, v in labels.items()}
    if family == "qwen2_5_vl":
        # Merged token (i, j) covers patches (2i..2i+1, 2j..2j+1), its 4 sub-patches in row-major order.
        half = grid // 2
        labels = {k: v.view(-1, half, 2, half, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4) for k, v in labels.items()}
    return labels


def vision_parameters(family: str, model: nn.Module) -> list[nn.Parameter]:
    inner = model.model
    modules = [inner.visual] if family == "qwen2_5_vl" else [inner.vision_tower, inner.multi_modal_projector]
    return [p for m in modules for p in m.parameters()]


def learning_rate_scale(config: RecipeConfig, phase: str, progress: float, step_in_call: int, resumed: bool) -> float:
    """Multiplier of ``config.lr``: warm-up (a shorter re-warm-up after a resume), then constant, then cosine over
    the last ``decay_fraction`` of the phase (``progress`` in [0, 1] of the phase's planned time)."""
    warmup = config.rewarmup_steps if resumed else config.warmup_steps
    scale = min(1.0, (step_in_call + 1) / max(warmup, 1))
    start = 1.0 - config.decay_fraction
    if progress > start and config.decay_fraction > 0:
        scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - start) / config.decay_fraction)))
    return max(scale, 0.02)


def save(model: nn.Module, heads: nn.Module, spec: reference.FamilySpec, out: Path, notes: dict, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = reference.build_tokenizer(spec)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 4
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    reference.build_processor(spec, tokenizer).save_pretrained(out)
    (out / "training.json").write_text(json.dumps(notes, indent=2) + "\n")
    (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    torch.save({k: v.half() for k, v in heads.state_dict().items()}, out / HEADS_FILE)


def train(config: RecipeConfig, out: Path, resume: Path | None = None) -> dict:
    """Train (or continue) one family; saves the checkpoint, its notes and its resumable state under ``out``."""
    import transformers
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    spec = reference.get_family(config.family, config.version)
    task = spec.task
    torch.manual_seed(config.seed)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    model_cls = getattr(transformers, spec.model_class)
    state = {"phase": "dense", "step": 0, "dense_seconds": 0.0, "vqa_seconds": 0.0, "parts": 0, "history": []}
    if resume is not None:
        if reference.spec_for(transformers.AutoConfig.from_pretrained(resume)) != spec:
            raise ValueError(f"{resume} is not a version-{config.version} {config.family} checkpoint.")
        model = model_cls.from_pretrained(resume, dtype=torch.float32)
        state = json.loads((resume / STATE_FILE).read_text())
    else:
        model_config = reference.build_config(spec)
        if config.text_layers is not None:
            model_config.text_config.num_hidden_layers = config.text_layers
        model = model_cls._from_config(model_config, dtype=torch.float32)
        if config.position_init == "sincos":
            init_sincos_positions(config.family, model)
        if config.local_attention_gain:
            init_local_attention(config.family, model, config.local_attention_gain)
    if config.question_first:
        spec = dataclasses.replace(spec, question_first=True)
    model.to(device).train()
    qwen = config.family == "qwen2_5_vl"
    width = model.config.vision_config.out_hidden_size if qwen else model.config.vision_config.hidden_size
    merged = config.dense_point == "merged"
    heads = nn.ModuleDict({"dense": DenseHeads(task, width * (4 if merged else 1), sub=4 if qwen or merged else 1)})
    if not qwen:
        heads["global"] = GlobalHead(task, width)
    if resume is not None and (resume / HEADS_FILE).exists():
        heads.load_state_dict({k: v.float() for k, v in torch.load(resume / HEADS_FILE).items()})
    heads.to(device)

    vision = {id(p) for p in vision_parameters(config.family, model)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in vision], "lr_scale": config.vision_lr_scale},
        {"params": [p for p in model.parameters() if id(p) not in vision], "lr_scale": 1.0},
        {"params": list(heads.parameters()), "lr_scale": 1.0},
    ]
    # Fused on CUDA: one kernel for every parameter instead of a few per parameter (the step is bound by op count).
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98),
                                  fused=torch.cuda.is_available())
    model, heads, optimizer = accelerator.prepare(model, heads, optimizer)
    dense_heads = accelerator.unwrap_model(heads)

    plan = config.plan_seconds
    dense_plan = plan * config.dense_fraction
    seed = config.seed + 1000 * state["parts"]  # a resumed part draws fresh training items
    image_stream = task.train_stream(task.IMAGE_CATEGORIES, seed=seed + 1)
    if config.categories is not None and not set(config.categories) <= set(spec.categories):
        raise ValueError(f"categories {sorted(set(config.categories) - set(spec.categories))} are not "
                         f"{config.family}'s; choose from {list(spec.categories)}.")
    vqa_stream = _with_captions(task, task.train_stream(config.categories or spec.categories, seed=seed),
                                config.caption_share, seed)
    started = time.time()
    call_steps, log, running = 0, [], {}
    bar = tqdm(total=int(config.minutes * 60), unit="s", desc=f"{config.family} {state['phase']}")
    while True:
        now = time.time() - started
        if now >= config.minutes * 60:
            break
        if state["phase"] == "dense":
            gates_met = (running.get("shape_fg", 0) >= config.shape_gate and running.get("char_fg", 0)
                         >= config.glyph_gate and call_steps >= 100)
            if gates_met or state["dense_seconds"] >= dense_plan:
                state["phase"] = "vqa"
                state["dense_end"] = {"step": state["step"], "seconds": round(state["dense_seconds"], 1),
                                      "gates_met": gates_met, **{k: round(v, 4) for k, v in running.items()}}
                call_steps, running = 0, {}
                bar.set_description(f"{config.family} vqa")
        dense = state["phase"] == "dense"
        if dense:
            progress = state["dense_seconds"] / max(dense_plan, 1e-6)
        else:
            progress = state["vqa_seconds"] / max(plan - state["dense_end"]["seconds"], 1e-6)
        scale = learning_rate_scale(config, state["phase"], progress, call_steps, resume is not None)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * scale * (1.0 if dense else group["lr_scale"])

        tick = time.time()
        with accelerator.autocast():
            if dense:
                items = [next(image_stream) for _ in range(config.batch_dense)]
                loss, metrics = _dense_step(config, spec, model, dense_heads, items, device, with_global=True)
            else:
                items = [next(vqa_stream) for _ in range(config.batch)]
                keep = config.curriculum_keep(progress)
                loss, metrics = _vqa_step(config, spec, model, dense_heads, items, device, keep)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["dense_seconds" if dense else "vqa_seconds"] += time.time() - tick

        values = torch.stack([v.detach().float() for v in metrics.values()]).tolist() if metrics else []
        for name, value in zip(metrics, values, strict=True):
            if not math.isnan(value):
                running[name] = 0.95 * running.get(name, value) + 0.05 * value
        state["step"] += 1
        call_steps += 1
        if call_steps % 20 == 0:
            bar.update(int(time.time() - started) - bar.n)
            shown = {k: f"{v:.2f}" for k, v in list(running.items())[:6]}
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", **shown)
        if state["step"] % config.log_every == 0:
            log.append({"step": state["step"], "seconds": round(time.time() - started, 1), "phase": state["phase"],
                        "lr_scale": round(scale, 4), **({} if dense else {"keep": round(keep, 3)}),
                        "loss": round(float(loss.detach()), 4),
                        **{k: round(v, 4) for k, v in running.items()}})
    bar.close()
    state["parts"] += 1
    state["history"].append({"minutes": round((time.time() - started) / 60, 2), "steps": call_steps,
                             "ended_in": state["phase"]})
    notes = {
        "family": config.family,
        "version": config.version,
        "config": asdict(config),
        "resumed_from": _relative(resume) if resume else None,
        "steps": state["step"],
        "minutes_this_part": round((time.time() - started) / 60, 2),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dense_end": state.get("dense_end"),
        "running_metrics": {k: round(v, 4) for k, v in running.items()},
        "log": log,
    }
    save(accelerator.unwrap_model(model).eval(), dense_heads, spec, out, notes, state)
    return notes


def _with_captions(task, stream, share: float, seed: int):
    """``stream`` with a ``share`` of its items replaced by caption items (seeded)."""
    if share == 0:
        yield from stream
        return
    if not hasattr(task, "caption_stream"):
        raise ValueError(f"caption_share={share}: the yardstick {task.__name__} has no caption items; use 0.")
    import random

    rng, captions = random.Random(f"captions/{seed}"), task.caption_stream(seed=seed + 7)
    for item in stream:
        yield next(captions) if rng.random() < share else item


def _relative(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it: notes that get committed carry no
    machine's absolute paths."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def _dense_step(config: RecipeConfig, spec, model, heads, items, device, with_global: bool):
    batch = reference.encode(spec, items, device)
    scenes = [it.images[0] for it in items]
    merged = config.dense_point == "merged"
    features, cls_vectors, grid, _ = _vision_outputs(config.family, model, batch, merged)
    order = merge_order(model, grid) if merged else None
    labels = dense_labels(config.family, spec.task, scenes, grid, device, order)
    loss, metrics = heads["dense"].loss(features, labels, config.object_weight)
    if with_global and cls_vectors:
        loss = loss + _global_loss(spec, heads, cls_vectors, scenes, device)
    return loss, metrics


def _global_loss(spec, heads, cls_vectors, scenes, device) -> torch.Tensor:
    present, count = heads["global"].targets(spec.task, scenes, device)
    return sum(heads["global"].loss(cls, present, count) for cls in cls_vectors)


def _vqa_step(config: RecipeConfig, spec, model, heads, items, device, keep: float = 1.0):
    """Loss and per-category answer accuracy of one VQA batch; below ``keep`` 1 the LLM sees the curriculum's
    tokens only (``CurriculumDrop``, hooked in for this step). The loss reads the last logits only (every answer
    is at the right end of its row), which is what a shortened, pruned sequence allows (``vtprune.training``)."""
    from vtprune.engine import Engine
    from vtprune.training import tail_forward

    batch = reference.encode(spec, items, device, with_answers=True)
    inner = getattr(model, "module", model)
    towers: list = []
    hooks = []
    if config.global_weight_vqa > 0 and "global" in heads:
        # The model's own tower call gives the CLS vectors: no second vision forward for the global head. A shallow
        # copy, since transformers then overwrites the output's pooler_output with the projected features.
        hooks.append(inner.model.vision_tower.register_forward_hook(
            lambda module, args, out: towers.append(copy.copy(out))))
    if config.token_dropout > 0:
        # The LLM's own call gets the 4-D mask; the outer model still sees the 2-D one (Qwen's M-RoPE index reads it).
        visual_ids = accuracy.visual_token_ids(inner)
        protected = (object_tokens(spec, items, batch["input_ids"], visual_ids)
                     if config.dropout_enriched > 0 else None)
        mask, _ = dropout_attention_mask(batch["input_ids"], batch["attention_mask"], visual_ids,
                                         config.token_dropout, config.dropout_min_keep, protected=protected,
                                         enriched=config.dropout_enriched)

        def _swap_mask(module, args, kwargs):
            kwargs["attention_mask"] = mask
            return args, kwargs

        hooks.append(inner.model.language_model.register_forward_pre_hook(_swap_mask, with_kwargs=True))
    engine = None
    if keep < 1:
        drop = CurriculumDrop(accuracy.OracleConfig(keep=keep), spec)
        drop.prepare(items)
        engine = Engine(inner)
        engine.install(drop)
    try:
        loss, logits, labels = tail_forward(model, batch, accuracy.visual_token_ids(inner))
    finally:
        for hook in hooks:
            hook.remove()
        if engine is not None:
            engine.remove()
    hits = answer_accuracy(logits, labels, reference.vocab(spec)["</s>"])
    names = list(dict.fromkeys(it.category for it in items))
    index = torch.tensor([names.index(it.category) for it in items]).to(device, non_blocking=True)
    per_category = (torch.zeros(len(names), device=device).index_add_(0, index, hits)
                    / torch.bincount(index, minlength=len(names)).float())
    metrics = {f"acc_{name}": per_category[i] for i, name in enumerate(names)}
    if towers:
        _, cls_vectors = _tower_outputs(config.family, inner, towers[0])
        scenes = [scene for it in items if it.kind != "video" for scene in it.images]  # the order of pixel_values
        loss = loss + config.global_weight_vqa * _global_loss(spec, heads, cls_vectors, scenes, device)
    return loss, metrics


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor, eos: int) -> torch.Tensor:
    """Per item, the share of its answer words (labels other than -100 and the end-of-sequence) predicted right by
    greedy next-token prediction: the answer's accuracy for one-word answers, word accuracy for captions."""
    target = labels[:, 1:]
    words = (target != -100) & (target != eos)
    hit = (logits[:, :-1].argmax(-1) == target) & words
    return hit.sum(1).float() / words.sum(1).clamp(min=1).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(reference.FAMILIES_V2))
    parser.add_argument("--minutes", type=float, default=15.0, help="time of this call")
    parser.add_argument("--plan-minutes", type=float, help="time of the whole run, all parts (default: --minutes)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--resume", type=Path, help="a part saved by an earlier call, to continue")
    parser.add_argument("--seed", type=int, default=0)
    for field in fields(RecipeConfig):
        if field.name not in ("family", "version", "minutes", "plan_minutes", "seed", *ABLATION_FIELDS):
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    if args.resume is not None and not (args.resume / STATE_FILE).exists():
        parser.error(f"--resume {args.resume} holds no {STATE_FILE}: give a folder saved by this script.")
    options = {f.name: getattr(args, f.name) for f in fields(RecipeConfig)
               if f.name != "version" and f.name not in ABLATION_FIELDS}
    notes = train(RecipeConfig(**options), args.out, args.resume)
    print(json.dumps({k: v for k, v in notes.items() if k != "log"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
