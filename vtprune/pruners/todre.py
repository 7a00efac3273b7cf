"""ToDRE: token diversity before the LLM, task relevance inside it (arXiv 2505.18757).

Paper: "Effective Visual Token Pruning via Token Diversity and Task Relevance" (arXiv 2505.18757 v2; the v1
abstract described stage 1 as greedy k-center). No official code was found; re-implemented from the v2 text
(shared/METHODS.md §1).

Stage 1, on the projected visual tokens of each image (LLM embedding space), keeps k = round(keep·n) tokens by
greedy max-sum diversification on cosine similarity: start from a pivot, the token the vision encoder's CLS attends
to most, then repeatedly add the token whose summed similarity to the tokens picked so far is smallest (one GEMM
of pairwise similarities per batch of equal-size images, then ``vtprune.kernels.greedy_diverse``: the whole greedy
loop in one Triton launch on GPU).
``selection="kcenter"`` is the v1 rule instead: add the token farthest (cosine distance) from its nearest pick.

Stage 2, inside the LLM: at layer ℓ (``relevance_layer``, 7L/8 by default) the head-mean attention of the text
queries after the image and of the visual queries gives
    α_t→v = Σ_{i∈T} Σ_{j∈V} A_ij / Σ_{i∈T} Σ_j A_ij   and   α_v→t = Σ_{i∈V} Σ_{j∈T} A_ij / Σ_{i∈V} Σ_j A_ij;
where both are below τ = 0.10 every visual token of that sample is removed from layer ℓ + 1 on (layers ≤ ℓ keep
their visual keys). The attention rows come from the adapter's probe, so any attention backend works.

Faithful: the pivot is the argmax of the head-mean CLS attention row of the vision encoder's last layer (read there
even where LLaVA takes its features from layer -2) on CLIP (LLaVA-1.5, LLaVA-NeXT) and InternViT (InternVL), over
the base image's tokens of an AnyRes image and the thumbnail tile's of a multi-tile InternVL image (the adapter
recomputes the one CLS row, so any attention backend works); max-sum (v2) and k-center (v1) selection in fp32 on
normalised tokens, kept tokens in original order with their original positions, both ratios with τ = 0.10,
attention read at ℓ = 7L/8 and removal after it (the stage runs at the input of decoder layer ℓ + 1 and reads layer
ℓ), the per-sample decision, stage 2 not counted in the budget (``budget`` "input" and "average" both keep
k = round(keep·n) before the LLM).

Differs:
- Pivot without a CLS row (SigLIP in LLaVA-OneVision, Qwen's ViTs) or with no global-view token left
  by an earlier stage: a seeded random token, as the paper recommends (its appendix: random 95.8% vs CLS 96.0%,
  "Center" the weakest at 10% keep); ``pivot="center"`` gives the nearest-to-mean token (vtprune's default before
  2026-12-01, the accuracy rows in README were measured with it), ``pivot="random"`` a random token everywhere. The
  random index is a function of (``seed``, the image's token count), so batching never changes it.
- Video: the paper takes each frame's CLS argmax and starts from the best of them. A video's ``cls_attention``
  spans its frames (each token with its own frame's CLS attention), so the pivot rule above is that rule where a
  tower has a CLS; no supported family has one for video today (LLaVA-OneVision: SigLIP; Qwen: none), so videos take
  the random pivot. InternVL frames arrive as separate images: each gets its own CLS pivot and its own selection.
- An InternVL token is a pixel-shuffled 2 x 2 block of ViT patches; its CLS attention is the block's sum (the paper
  does not say).
- One selection per image / tile group / video with k = keep·n of its own tokens (the paper does not specify
  multi-image prompts).
- T (the text queries and keys of the ratios) is the text after the sample's first visual token: text before the
  image cannot see it under causal attention. Layout tokens (LLaVA-NeXT row newlines) count neither as V nor T, and
  they stay when stage 2 fires (vtprune never drops them).
- ℓ = round(7L/8) (Python rounding: 24 for L = 28) is clamped to L - 2 so that a layer is left to remove the
  tokens from; for the 4-layer test models ℓ = 2 and the removal starts at layer 3.
- keep=1.0 is the exact identity, as for every vtprune method (the engine's, ``vtprune.budget.size_plan``): it
  turns stage 2 off too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune import kernels
from vtprune.config import PrunerConfig
from vtprune.point import Point
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection, Stage

SELECTIONS = ("maxsum", "kcenter")
PIVOTS = ("cls", "random", "center")


@dataclass(frozen=True)
class ToDREConfig(PrunerConfig):
    """Attributes:
    selection: "maxsum" (greedy max-sum diversification, paper v2) or "kcenter" (greedy k-center / farthest point
        on cosine distance, paper v1).
    tau: relevance threshold τ; stage 2 removes a sample's visual tokens where both ratios are below it (0.10).
        0 turns stage 2 off.
    relevance_layer: ℓ, the decoder layer whose attention decides; visual tokens go from layer ℓ + 1 on. None =
        round(7L/8) clamped to L - 2 (28 of 32; 2 of the 4-layer test models). Must be in 0..L-2.
    pivot: the first pick. "cls" (paper): the token the vision encoder's CLS attends to most, over the global view;
        where there is no CLS row, a random token as the paper recommends. "random": a random token always.
        "center": the token nearest to the mean (the paper's "Center" ablation, its weakest at 10% keep).
    seed: seed of the random pivot. The pivot depends only on (seed, the image's token count), never on the batch.
    """

    method = "todre"
    selection: str = "maxsum"
    tau: float = 0.10
    relevance_layer: int | None = None
    pivot: str = "cls"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is not one of {list(SELECTIONS)}.")
        if self.pivot not in PIVOTS:
            raise ValueError(f"pivot={self.pivot!r} is not one of {list(PIVOTS)}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}.")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise TypeError(f"tau must be a number, got {type(self.tau).__name__}.")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau} is outside [0, 1]; it is a fraction of attention mass (paper: 0.10).")
        if self.relevance_layer is not None:
            if isinstance(self.relevance_layer, bool) or not isinstance(self.relevance_layer, int):
                raise TypeError(f"relevance_layer must be an int or None, got {type(self.relevance_layer).__name__}.")
            if self.relevance_layer < 0:
                raise ValueError(f"relevance_layer={self.relevance_layer} must be >= 0.")


def nearest_to_mean(x: Tensor) -> Tensor:
    """(B, n, C) unit-norm tokens -> (B,) index of the token most cosine-similar to their mean."""
    return (x @ x.mean(dim=1, keepdim=True).transpose(1, 2)).squeeze(-1).argmax(dim=1)


def cls_pivot(attention: Tensor, candidates: Tensor, fallback: Tensor) -> Tensor:
    """(B, n) CLS attention, (B, n) bool candidates, (B,) fallback -> (B,) index of the candidate the CLS attends to
    most; ``fallback`` in rows without a candidate."""
    best = attention.float().masked_fill(~candidates, float("-inf")).argmax(dim=1)
    return torch.where(candidates.any(dim=1), best, fallback)


def random_pivot(batch: int, n: int, seed: int, device: torch.device) -> Tensor:
    """(batch,) the same seeded random index in 0..n-1 for every image of n tokens: a function of (seed, n) alone,
    so an image gets the same pivot alone and in any batch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n)
    return torch.randint(n, (1,), generator=generator).expand(batch).to(device)


def first_pivot(x: Tensor, images: list[ImageTokens], rule: str = "cls", seed: int = 0) -> Tensor:
    """(B, n, C) unit-norm tokens of B images of n tokens -> (B,) pivot. "cls": the CLS argmax over an image's
    global view where the adapter gave a CLS row (``cls_attention``), else the seeded random token; "random": the
    seeded random token; "center": the token nearest to the mean."""
    if rule == "center":
        return nearest_to_mean(x)
    pivot = random_pivot(x.shape[0], x.shape[1], seed, x.device)
    if rule == "random" or all(image.cls_attention is None for image in images):
        return pivot
    none = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    attention, candidates = [], []
    for image in images:
        if image.cls_attention is None:
            attention.append(none.float())
            candidates.append(none)
        else:
            attention.append(image.cls_attention)
            # No global view given: every token is a candidate.
            candidates.append(~none if image.global_view is None else image.global_view)
    return cls_pivot(torch.stack(attention), torch.stack(candidates), pivot)


def max_sum_diversify(x: Tensor, count: int, pivot: Tensor) -> Tensor:
    """Greedy max-sum diversification: (B, n, C) unit-norm tokens -> (B, count) picks, pivot first.

    Step t adds the unpicked token with the smallest summed cosine similarity to the t picks so far.
    """
    return kernels.diverse_subset(x, pivot, count, "maxsum")


def k_center(x: Tensor, count: int, pivot: Tensor) -> Tensor:
    """Greedy k-center (farthest point) on cosine distance: (B, n, C) unit-norm tokens -> (B, count) picks."""
    return kernels.diverse_subset(x, pivot, count, "kcenter")


def relevance_ratios(
    rows: Tensor, query_is_text: Tensor, query_is_visual: Tensor, key_is_text: Tensor, key_is_visual: Tensor
) -> tuple[Tensor, Tensor]:
    """ToDRE's two ratios per sample from head-mean attention rows.

    Args:
        rows: (B, Q, L) attention probabilities of Q query rows over the L keys.
        query_is_text, query_is_visual: (B, Q) which rows are text queries (T) and visual queries (V); padding rows
            are neither.
        key_is_text, key_is_visual: (B, L) which keys belong to T and V.

    Returns:
        (B,) α_t→v and (B,) α_v→t; NaN where a sample has no query of that kind.
    """
    to_visual = (rows * key_is_visual[:, None].to(rows.dtype)).sum(-1)
    to_text = (rows * key_is_text[:, None].to(rows.dtype)).sum(-1)
    total = rows.sum(-1)
    qt, qv = query_is_text.to(rows.dtype), query_is_visual.to(rows.dtype)
    alpha_tv = (to_visual * qt).sum(1) / (total * qt).sum(1)
    alpha_vt = (to_text * qv).sum(1) / (total * qv).sum(1)
    return alpha_tv, alpha_vt


@register_pruner
class ToDREPruner(Pruner):
    config_cls = ToDREConfig
    paper = "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance (arXiv 2505.18757)"
    status = "approximation"
    points = ("projector", "llm:K")
    flash_compatible = True
    needs_training = "none"
    needs = frozenset({"cls_attention", "global_view"})

    def relevance_layer(self, num_layers: int) -> int:
        if self.config.relevance_layer is not None:
            layer = self.config.relevance_layer
        else:
            layer = min(round(7 * num_layers / 8), num_layers - 2)
        if not 0 <= layer <= num_layers - 2:
            raise ValueError(
                f"ToDRE's relevance_layer={layer} is outside 0..{num_layers - 2} for a model with {num_layers} "
                "decoder layers: the visual tokens are removed from the layer after it, which must exist. Pick an "
                "earlier layer, or tau=0 to run the diversity stage alone."
            )
        return layer

    def plan(self, num_layers: int) -> list[Stage]:
        # Stage 1 is at the LLM entry, so it keeps keep*n under both budgets. Stage 2 is adaptive and, as in the
        # paper, outside the budget: it keeps all of what is present or none of it.
        stages = [Stage("projector")]
        if self.config.tau > 0:
            stages.append(Stage(Point("llm", self.relevance_layer(num_layers) + 1), 1.0, adaptive=True))
        return stages

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.point.kind == "llm":
            return self._relevance(ctx)
        keep = [torch.arange(image.num_tokens, device=ctx.device) for image in ctx.images]
        pick = max_sum_diversify if self.config.selection == "maxsum" else k_center
        for group in ctx.image_groups():
            first = ctx.images[group[0]]
            if first.budget >= first.num_tokens:
                continue
            x = F.normalize(torch.stack([ctx.images[j].features for j in group]).float(), dim=-1)
            pivot = first_pivot(x, [ctx.images[j] for j in group], self.config.pivot, self.config.seed)
            chosen = pick(x, first.budget, pivot)
            for row, j in enumerate(group):
                keep[j] = chosen[row]
        return Selection(keep=keep)

    def _relevance(self, ctx: PruneContext) -> Selection:
        """Keep every visual token of a sample, or none where its text and visual tokens no longer attend across."""
        if ctx.attention_rows is None or ctx.text_mask is None or ctx.attention_mask is None:
            raise RuntimeError("ToDRE's relevance stage needs attention rows and text positions from the adapter.")
        batch, length = ctx.attention_mask.shape
        device = ctx.device
        key_is_visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
        for image in ctx.images:
            key_is_visual[image.sample].index_fill_(0, image.positions, True)
        # T = text after the sample's first visual token (earlier text cannot see the image).
        first_visual = torch.where(key_is_visual.any(1), key_is_visual.int().argmax(1), length)
        key_is_text = ctx.text_mask & (torch.arange(length, device=device)[None] > first_visual[:, None])
        queries = key_is_text | key_is_visual
        # (B, Q) query positions: each sample's T and V rows, padded with position 0 (neither T nor V).
        count = queries.sum(1)
        # One query row per position, T and V first (no sync to size the probe); the rest are padding.
        order = torch.argsort(queries.to(torch.int8), dim=1, descending=True, stable=True)
        valid = torch.arange(length, device=device)[None] < count[:, None]
        query_positions = torch.where(valid, order, torch.zeros_like(order))
        rows = ctx.attention_rows(query_positions)
        query_is_text = key_is_text.gather(1, query_positions) & valid
        query_is_visual = key_is_visual.gather(1, query_positions) & valid
        alpha_tv, alpha_vt = relevance_ratios(rows, query_is_text, query_is_visual, key_is_text, key_is_visual)
        # NaN (no text after the image, or no visual query) compares False: such a sample keeps its tokens, except
        # that a missing α_v→t alone (no visual token left) cannot veto.
        # One sync for the whole batch: the kept counts (all or none) size the next layers' sequence anyway.
        faded = ((alpha_tv < self.config.tau) & ~(alpha_vt >= self.config.tau)).tolist()
        keep = [torch.arange(0 if faded[image.sample] else image.num_tokens, device=device) for image in ctx.images]
        return Selection(keep=keep)
