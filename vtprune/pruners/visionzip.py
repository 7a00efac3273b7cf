"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by similarity (Yang et al., CVPR 2025).

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models", arXiv 2412.04467; official code
github.com/dvlab-research/VisionZip (Apache-2.0; now JIA-Lab-research/VisionZip), read for this re-implementation
(``visionzip/clip_encoder.py``, ``visionzip/utils.py``, ``visionzip/llava_arch.py``, ``visionzip/main.py`` at 3151f6d);
no code was copied.

One step before the LLM, on the (n, C) tokens of each image, keeping K = d + c of them:
1. dominant: the d tokens the vision encoder's CLS attends to most (head-mean CLS attention row);
2. contextual: the n − d other tokens, in index order, are split into c targets, every ``(n − d) // c``-th of them
   from the first (the code's ``arange(0, n − d, step)[:c]``), and the rest; each of the rest joins the target it is
   most cosine-similar to;
3. each target's value becomes ``target + mean(its merged tokens)`` (``contextual_value="code"``: the code's
   ``target_hidden + aggregated_hidden``, where a target without merged tokens stays as it is) or the mean over the
   target and its merged tokens (``"mean"``, a plain average: the "merged (averaged)" of vtprune's issue; the
   paper's own wording was not available here); written through ``Selection.values``.

The split: the official README passes ``dominant=54, contextual=10`` for 64 tokens; the 128 and 192 settings are
108 + 20 and 162 + 30 (as vtprune's issue quotes the paper; its tables were not re-read here): contextual =
10 / 64 = 0.15625 of the kept tokens in all three. The code takes both counts as arguments and has no rule for
other budgets (its function defaults, 191 + 30, are none of the three), so vtprune generalises by that proportion:
``contextual_fraction`` = 0.15625, c = round(0.15625 · K) for any K (10 / 20 / 30 for 64 / 128 / 192), d = K − c.
``budget`` "input" and "average" are the same for this one step at the LLM entry.

Faithful to the official LLaVA code: the split above, dominant = top-d of the head-pooled CLS row (the code sums over
heads, the same ranking as our mean), targets = every step-th remaining token in index order, hard assignment by
argmax cosine similarity, the ``target + mean`` value, pruning at the CLIP features before the projector
(``point="encoder"``; the written values go through the projector) and, as that code builds the shorter prompt,
survivors renumbered (``positions="renumber"``).

Defaults per family (``official_defaults``; every field can be set explicitly):
- LLaVA code (llava, llava_next; llava_onevision and internvl by analogy — the official code has neither):
  ``point="encoder"``, ``positions="renumber"``.
- Qwen (qwen2_vl, qwen2_5_vl, qwen3_vl): ``point="projector"`` (after the 2 x 2 merger, where a Qwen2.5-VL port
  prunes; see below), ``positions="original"`` (M-RoPE positions are gathered; vtprune refuses renumbering there).

Differs:
- CLS attention: vtprune's ``ImageTokens.cls_attention`` is the CLS row of the vision encoder's *final* layer; the
  official code reads the attention of the feature layer (layer −2 for LLaVA, whose features come from there).
- Similarity: the code compares the feature layer's keys (mean over heads); vtprune's tokens carry no keys, so the
  features at the insertion point are compared (CLIP layer −2 hidden states at ``encoder``, LLM-space rows at
  ``projector``).
- The CLS token: the code keeps it as one of the d dominant tokens (it calls its core with ``dominant − 1`` and
  prepends the CLS feature), so "54" is 53 patches + CLS there. vtprune's LLaVA image tokens exclude the CLS (the
  "default" feature strategy), so d counts patches only: 54 patches here.
- Order: the code emits [CLS, dominant in index order, contextual in target order]; vtprune keeps every survivor
  in its own slot (contextual values in their targets' slots), so with ``positions="renumber"`` the survivors are
  numbered in original index order.
- Towers without a CLS row (``cls_attention is None``: SigLIP in LLaVA-OneVision, Qwen's ViTs, videos): the stored
  official snapshot holds the LLaVA code only; no Qwen code of the authors could be read. A Qwen2.5-VL port (the
  ``visionzip`` module that JulietChoo/VisionSelector's ``qwen-evaluation/token_compression/monkeypatch.py``
  installs) scores each merged token by the attention it receives from all ViT tokens at the last block (mean
  over heads and queries, averaged over its 2 x 2 patches), with keys of that block as the metric, prunes after
  the merger, keeps original M-RoPE positions and uses c = 5% of all tokens. vtprune's adapters expose the CLS row
  only, not a full ViT attention matrix, so that score is not available here. vtprune's own fallback, labelled as
  such: dominant = the d tokens of largest feature L2 norm at the insertion point (the tokens a ViT's attention
  concentrates on are mostly its high-norm ones, Darcet et al., "Vision Transformers Need Registers", arXiv
  2309.16588); the contextual step is unchanged. An image group mixing both (never within one family today) ranks
  each image by its own rule.
- LLaVA-NeXT: one selection over all the tokens of an image (base + unpadded tiles, each tile's tokens with its own
  CLS row); the code runs per 336 px crop, then restores the crops' grid before unpadding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.config import AUTO, PrunerConfig
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection, Stage

POINTS = ("encoder", "projector")
CONTEXTUAL_VALUES = ("code", "mean")
# The official scripts' 54 + 10 of 64 (and 108 + 20 of 128, 162 + 30 of 192): the same proportion at every budget.
OFFICIAL_CONTEXTUAL_FRACTION = 10 / 64
LLAVA_CODE = {"point": "encoder", "positions": "renumber"}
QWEN = {"point": "projector", "positions": "original"}


@dataclass(frozen=True)
class VisionZipConfig(PrunerConfig):
    """Attributes:
    contextual_fraction: share of the K kept tokens that are contextual (merged) tokens, c = round(fraction · K), the
        rest d = K − c dominant. 10 / 64 = 0.15625 is the official 54 + 10 (64), 108 + 20 (128), 162 + 30 (192).
        0 keeps dominant tokens only; 1 keeps contextual tokens only.
    point: "encoder" (vision features before the projector, the LLaVA code's point; written values go through the
        projector) or "projector" (after it, in LLM space); "auto": the official code's point for the model's family.
    contextual_value: what a target token becomes: "code" (``target + mean(merged)``, the official code) or
        "mean" (a plain average over the target and its merged tokens).
    """

    method = "visionzip"
    contextual_fraction: float = OFFICIAL_CONTEXTUAL_FRACTION
    point: str = AUTO
    contextual_value: str = "code"
    positions: str = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        fraction = self.contextual_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"contextual_fraction must be a number in [0, 1], got {type(fraction).__name__}.")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"contextual_fraction={fraction} is outside [0, 1]: it is the share of the kept tokens that are "
                "contextual (merged) tokens; the official split 54 + 10 of 64 is 0.15625."
            )
        if self.point not in (*POINTS, AUTO):
            raise ValueError(
                f"point={self.point!r} is not one of {[*POINTS, AUTO]}: VisionZip prunes before the LLM, at the "
                "vision features ('encoder') or after the projector ('projector')."
            )
        if self.contextual_value not in CONTEXTUAL_VALUES:
            raise ValueError(f"contextual_value={self.contextual_value!r} is not one of {list(CONTEXTUAL_VALUES)}.")


def split_budget(keep: int, contextual_fraction: float) -> tuple[int, int]:
    """K kept tokens -> (dominant d, contextual c) with c = round(fraction · K), d = K − c (54 + 10 for K = 64 at
    the default fraction, 108 + 20 for 128, 162 + 30 for 192)."""
    contextual = round(contextual_fraction * keep)
    return keep - contextual, contextual


def dominant_scores(x: Tensor, images: list[ImageTokens]) -> Tensor:
    """(B, n, C) features of B images -> (B, n) fp32 scores whose top-d are the dominant tokens: the CLS attention
    row where the adapter gave one, else the features' L2 norm (vtprune's fallback; see the module docstring)."""
    norms = x.float().norm(dim=-1)
    if all(image.cls_attention is None for image in images):
        return norms
    rows = [norms[b] if image.cls_attention is None else image.cls_attention.float() for b, image in enumerate(images)]
    return torch.stack(rows)


def target_slots(remaining: int, contextual: int, device: torch.device) -> Tensor:
    """(c,) positions of the targets among the ``remaining`` non-dominant tokens in index order: every
    ``remaining // c``-th from the first, the first c of them (the code's step rule)."""
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step, device=device)[:contextual]


def compress(x: Tensor, scores: Tensor, dominant: int, contextual: int, value: str = "code") -> tuple[Tensor, Tensor]:
    """One VisionZip step on a group of images of the same size.

    Args:
        x: (B, n, C) features.
        scores: (B, n) dominant scores (CLS attention).
        dominant: d, tokens kept by score.
        contextual: c, targets that absorb the rest; d + c < n.
        value: "code" (target + mean of merged) or "mean" (mean over target and merged); see ``VisionZipConfig``.

    Returns:
        keep (B, d + c) indices into the n tokens, dominant (by descending score) then targets (in index order);
        values (B, d + c, C) in x's dtype, in that order.
    """
    batch, n, channels = x.shape
    xf = x.float()
    # Stable: equal scores keep the earlier token, whatever the device's top-k does with ties.
    top = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :dominant]
    if contextual == 0:
        return top, xf.gather(1, top[..., None].expand(-1, -1, channels)).to(x.dtype)
    is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=x.device).scatter_(1, top, True)
    remaining = n - dominant
    rest = torch.argsort(is_dominant.to(torch.int8), dim=1, stable=True)[:, :remaining]  # index order
    slots = target_slots(remaining, contextual, x.device)
    is_target = torch.zeros(remaining, dtype=torch.bool, device=x.device).scatter_(0, slots, True)
    # The others in index order by a stable sort, not a boolean mask (which waits for the GPU to count it).
    others = torch.argsort(is_target.to(torch.int8), stable=True)[: remaining - slots.numel()]
    targets, merged = rest[:, slots], rest[:, others]
    target_x = xf.gather(1, targets[..., None].expand(-1, -1, channels))
    merged_x = xf.gather(1, merged[..., None].expand(-1, -1, channels))
    similarity = F.normalize(merged_x, dim=-1) @ F.normalize(target_x, dim=-1).transpose(1, 2)
    nearest = similarity.argmax(dim=-1)  # (B, n - d - c)
    sums = torch.zeros_like(target_x).scatter_add_(1, nearest[..., None].expand(-1, -1, channels), merged_x)
    ones = torch.ones_like(nearest, dtype=xf.dtype)
    counts = torch.zeros(batch, contextual, device=x.device).scatter_add_(1, nearest, ones)
    if value == "code":
        contextual_x = target_x + sums / counts.clamp(min=1)[..., None]
    else:
        contextual_x = (target_x + sums) / (1 + counts)[..., None]
    dominant_x = xf.gather(1, top[..., None].expand(-1, -1, channels))
    return torch.cat((top, targets), dim=1), torch.cat((dominant_x, contextual_x), dim=1).to(x.dtype)


@register_pruner
class VisionZipPruner(Pruner):
    config_cls = VisionZipConfig
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR'25, arXiv 2412.04467)"
    status = "approximation"
    points = POINTS
    flash_compatible = True
    needs_training = "none"
    needs = frozenset({"cls_attention"})
    official_defaults = {
        **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), QWEN),
        "*": LLAVA_CODE,
    }

    def plan(self, num_layers: int) -> list[Stage]:
        if self.config.point == AUTO:
            raise ValueError(
                "visionzip's point is 'auto' (the official code's point for the model's family): wrap the model to "
                "resolve it, call pruner.resolve(model_type), or pass point='encoder' or 'projector'."
            )
        return [Stage(self.config.point)]

    def select(self, ctx: PruneContext) -> Selection:
        keep = [torch.arange(image.num_tokens, device=ctx.device) for image in ctx.images]
        values: list[Tensor | None] = [None] * len(ctx.images)
        for group in ctx.image_groups():
            first = ctx.images[group[0]]
            if first.budget >= first.num_tokens:
                continue  # images this stage leaves whole go on unchanged
            images = [ctx.images[j] for j in group]
            x = torch.stack([image.features for image in images])
            dominant, contextual = split_budget(first.budget, self.config.contextual_fraction)
            order, merged = compress(
                x, dominant_scores(x, images), dominant, contextual, self.config.contextual_value
            )
            for row, j in enumerate(group):
                keep[j] = order[row]
                if contextual:
                    values[j] = merged[row]
        return Selection(keep=keep, values=values if any(v is not None for v in values) else None)
