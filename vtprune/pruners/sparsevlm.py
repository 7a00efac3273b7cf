"""SparseVLM: text raters score the visual tokens at a few LLM layers, pruned tokens are recycled (ICML 2025).

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", arXiv 2410.04417;
official code github.com/Gumpest/SparseVLMs (``llava/model/language_model/modelling_sparse_llama.py``:
``LlamaDynamicvitModel.forward``; ``llava/model/language_model/score.py``: ``attn_postprocess_topk`` and the
per-budget ``sparse_token_list_*``; ``llava/model/language_model/utils.py``: ``cluster_and_merge``; the rank-adaptive
``attn_postprocess_rank`` and the ``--scale`` / ``--bias`` of ``scripts/v1_5/eval/*.sh`` of the October 2024
release, commit b72c5d6; read for this re-implementation, no code was copied).

Per stage, on the hidden states of one layer:
1. raters: the text tokens after the image whose relevance to the visual tokens exceeds the mean — the relevance of
   text token t is the mean over the visual tokens v of softmax_t(h_v · h_t) over the text tokens;
2. each visual token's score is the raters' head-mean attention to it, averaged over the raters;
3. the count kept: ``counts="rank"`` (default; the paper's rank-adaptive sparsification and the October 2024 code)
   keeps min(int(rank(A)·scale + bias), n − 1) where A is the raters × visual-token attention matrix
   (``torch.linalg.matrix_rank``); ``counts="fixed"`` (the current release) keeps the stage budget;
4. recycling: of the dropped tokens, the top ``recycle_ratio`` (30%, int(d·0.3) + 1) by score are clustered with
   DPC-kNN (density from the k = c nearest neighbours, distance over √C, centres by density × distance to a denser
   token) into c = int(r / ``cluster_size``) + 1 compact tokens, each the mean of its cluster; the rest are gone.

Stages (``plan``): the code's ``pruning_loc`` 2 / 6 / 15 of 32: each of those layers' attention scores the tokens,
which are dropped from the layer after it on (vtprune's ``llm:l+1``, whose probe gives exactly layer l's attention).
``layers`` None scales them as round(l·L/32), clamped to 1..L−2, duplicates removed (1, 2 for L = 4; 1, 2, 6 for
L = 12; 2, 6, 15 for L = 32).

Budgets. The code's top-k counts for 192 / 128 / 64 retained tokens of 576 (``sparse_token_list_192 = [300, 200,
110]``, ``_128 = [303, 110, 36]``, ``_64 = [66, 30, 17]``) plus the compact tokens the recycling adds after each
stage give the visual share present after each stage (309 / 204 / 113 of 576 for 192). ``keep`` picks the nearest
of the three schedules (by keep·576), whose shape is then kept:
- ``budget="input"``: the first stage keeps ``keep`` and the later ones shrink as that schedule does;
- ``budget="average"``: the schedule is scaled by one factor, solved so that the mean over the L layers of the
  visual share is ``keep`` (METHODS.md §0.2). The code's schedules average more than their name under this
  accounting (≈ 206 of 576 for "192": the stage layer still sees every token), so keep = 1/3 keeps ≈ 0.93 of the
  code's counts.
With more stages than the code's three (``layers=``) the later ones continue its last stage-to-stage ratio; with
fewer, its first ones are used. With ``counts="rank"`` the stages are adaptive: the budget is an upper bound (the
rank-based count may keep fewer), and vtprune's budget accounting does not count them. ``scale`` / ``bias`` None take
the eval scripts' values of the nearest schedule: 13.5 / 0 (192, MME), 9 / 6 (128, POPE), 0.8 / 0 (64, TextVQA).

Faithful to the official code: the rater rule (softmax over the text of the visual × text dot products of the
hidden states, mean over the visual tokens, > mean), the raters' head-mean attention of the stage layer averaged over
the raters, the pruning layers 2 / 6 / 15, the per-budget counts, the rank formula with its scale / bias and its n − 1
cap and "rank = n keeps everything", the recycling (top 30% of the dropped by score, int(r/10) + 1 clusters,
DPC-kNN with k = c, the cluster centre assigned to itself, uniform means), text never dropped, drops in prefill only,
original positions (the in-LLM convention; see below).

Differs:
- Compact tokens: vtprune cannot add tokens, so each compact token takes the slot (and original position) of its
  cluster's centre, a dropped token kept for it, and its value (``Selection.values``) is the cluster mean. The code
  appends the compact tokens after the kept visual tokens, so a stage there ends with k + c visual tokens; here
  k + c equals the stage budget (k is solved so that k plus the clusters of its n − k dropped tokens fills the budget;
  with ``counts="rank"`` the budget bounds k + c).
- Raters are chosen at every stage from that stage's hidden states (the input of layer l+1); the code chooses them
  once from the input embeddings. Text = the non-visual tokens after the sample's first visual token (the code: all
  tokens after its single image); with no text after the image the prompt's last token rates alone.
- Positions: the code's default ("1_0") mode renumbers the survivors contiguously; vtprune keeps original positions.
- One rank, top-k and recycling per image (video, InternVL tile group) with its own budget; the code handles its
  single image per sample. Ties go to the earlier token (stable sorts) where the code's ``topk`` is unspecified;
  DPC-kNN breaks density ties by index where the code adds 1e-6 random noise. Scores, rank and clustering run in
  fp32 where the code uses the model's dtype; the rank's SVD runs on the host (``batched_ranks``: the counts need
  it there; on the H200 the pruned prefill with CUDA SVDs took 112-157 ms against an ideal of 37-58 ms, and the
  SVDs are the suspected cost, not yet re-measured on the host: README "Speed").
- Not implemented: SparseVLM+ (the code's ``USE_VERSION=2_0``: RoPE "gravity" correction, priority-head selection,
  its own counts), the 96-token schedule added to the code in December 2025, the code's training path (``pass``),
  and the 4-layer ``pruning_loc = [2, 6, 15, 19]`` default of the October 2024 code (its eval used the same formula
  at every listed layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.budget import scale_to_average
from vtprune.config import PrunerConfig, layer_tuple, scaled_layers
from vtprune.point import Point
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import PruneContext, Selection, Stage

PAPER_LAYERS = (2, 6, 15)  # of a 32-layer LLM: the code's pruning_loc (attention of layer l, drop after it)
PAPER_DEPTH = 32
PAPER_TOKENS = 576  # LLaVA-1.5's visual tokens, the unit of the code's counts
# Retained-token setting -> top-k count kept at each pruning layer (score.py's sparse_token_list_*).
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
# Retained-token setting -> (scale, bias) of the rank formula (the October 2024 eval scripts: MME, POPE, TextVQA).
RANK_SCALES = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
COUNTS = ("rank", "fixed")


@dataclass(frozen=True)
class SparseVLMConfig(PrunerConfig):
    """Attributes:
    layers: the decoder layers whose attention scores the visual tokens, which are dropped from the next layer on
        (the code's ``pruning_loc``), strictly increasing, each >= 0 and <= L-2. None = the code's 2 / 6 / 15 of 32
        scaled to the model's depth L (round(l·L/32), clamped to 1..L-2, duplicates removed).
    counts: "rank" (the paper's rank-adaptive count, min(int(rank·scale + bias), n-1), bounded by the stage budget)
        or "fixed" (the current release: each stage keeps its budget).
    scale, bias: the rank formula's factors (``counts="rank"``); None = the eval scripts' values for the retained
        setting nearest to keep (13.5 / 0 for 192 of 576, 9 / 6 for 128, 0.8 / 0 for 64).
    recycle: merge the best-scored dropped tokens into compact tokens (the code's token recycling).
    recycle_ratio: share of the dropped tokens (by score) that are recycled, int(d·ratio) + 1 of d (the code's 0.3).
    cluster_size: recycled tokens per compact token, int(r / size) + 1 clusters of r (the code's 10).
    """

    method = "sparsevlm"
    layers: tuple[int, ...] | None = None
    counts: str = "rank"
    scale: float | None = None
    bias: float | None = None
    recycle: bool = True
    recycle_ratio: float = 0.3
    cluster_size: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", layer_tuple(
            self.layers, 0, "decoder layers are numbered from 0", "(2, 6, 15)"))
        if self.counts not in COUNTS:
            raise ValueError(f"counts={self.counts!r} is not one of {list(COUNTS)}.")
        for name in ("scale", "bias"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number or None, got {type(value).__name__}.")
            if self.counts != "rank":
                raise ValueError(f"{name} sets the rank formula; it needs counts='rank' (got counts={self.counts!r}).")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale={self.scale} must be > 0: the count kept is int(rank·scale + bias).")
        if not isinstance(self.recycle, bool):
            raise TypeError(f"recycle must be True or False, got {self.recycle!r}.")
        if isinstance(self.recycle_ratio, bool) or not isinstance(self.recycle_ratio, (int, float)):
            raise TypeError(f"recycle_ratio must be a number in [0, 1], got {type(self.recycle_ratio).__name__}.")
        if not 0.0 <= self.recycle_ratio <= 1.0:
            raise ValueError(f"recycle_ratio={self.recycle_ratio} is outside [0, 1] (the code recycles 0.3).")
        if isinstance(self.cluster_size, bool) or not isinstance(self.cluster_size, int):
            raise TypeError(f"cluster_size must be an int, got {type(self.cluster_size).__name__}.")
        if self.cluster_size < 1:
            raise ValueError(f"cluster_size={self.cluster_size} must be at least 1 (the code uses 10).")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The code's 2 / 6 / 15-of-32 pruning layers scaled to ``num_layers`` decoder layers, each in 1..L-2."""
    if num_layers < 3:
        raise ValueError(
            f"sparsevlm needs an LLM of at least 3 decoder layers (a scoring layer >= 1 and a layer after it to drop "
            f"from); this one has {num_layers}. Give layers=(0,) to score with layer 0."
        )
    return scaled_layers(PAPER_LAYERS, num_layers, low=1, high=num_layers - 2, paper_depth=PAPER_DEPTH)


def nearest_setting(keep: float) -> int:
    """The code's retained-token setting (192, 128 or 64 of 576) nearest to ``keep``."""
    return min(SCHEDULES, key=lambda r: (abs(keep * PAPER_TOKENS - r), -r))


def recycled_count(dropped: int, ratio: float) -> int:
    """Dropped tokens recycled: the code's int(d·0.3) + 1, at most d."""
    return min(dropped, int(dropped * ratio) + 1) if dropped > 0 else 0


def cluster_count(dropped: int, ratio: float, size: int) -> int:
    """Compact tokens made from ``dropped`` dropped tokens: int(r / 10) + 1 of the r recycled (0 if none)."""
    recycled = recycled_count(dropped, ratio)
    return int(recycled / size) + 1 if recycled > 0 else 0


def official_shares(setting: int, recycle: bool, ratio: float, size: int) -> list[float]:
    """Visual share of the 576 tokens present after each of the code's stages: its top-k plus the compact tokens."""
    present, shares = PAPER_TOKENS, []
    for count in SCHEDULES[setting]:
        kept = min(count, present - 1)
        present = kept + (cluster_count(present - kept, ratio, size) if recycle else 0)
        shares.append(present / PAPER_TOKENS)
    return shares


def stage_fractions(config: SparseVLMConfig, stage_layers: tuple[int, ...], num_layers: int) -> list[float]:
    """Share of the original tokens each stage keeps (see the module docstring, "Budgets")."""
    keep = config.keep
    shares = official_shares(nearest_setting(keep), config.recycle, config.recycle_ratio, config.cluster_size)
    # The code has three pruning layers; more stages repeat its last step's ratio, fewer use its first ones.
    while len(shares) < len(stage_layers):
        shares.append(shares[-1] * shares[-1] / shares[-2])
    shares = shares[: len(stage_layers)]
    if config.budget == "input":
        return [min(1.0, keep * share / shares[0]) for share in shares]
    floor = stage_layers[0] / num_layers
    if keep <= floor:
        raise ValueError(
            f"keep={keep} under budget='average' cannot be met with the first sparsevlm drop at layer "
            f"{stage_layers[0]} of {num_layers}: the layers before it alone use {floor:.3f} of the full budget. Raise "
            "keep, give an earlier first layer (layers=), or use budget='input'."
        )

    return scale_to_average(shares, keep, stage_layers, num_layers)


def split_budget(total: int, present: int, config: SparseVLMConfig) -> tuple[int, int]:
    """(k, c): top-k tokens kept and compact tokens, with k + c = ``total`` (c made from the n - k dropped)."""
    if total >= present:
        return present, 0
    if not config.recycle:
        return total, 0
    ratio, size = config.recycle_ratio, config.cluster_size
    # k + clusters(n - k) grows by 0 or 1 with k, so the largest k that fits fills the total exactly.
    kept = total - cluster_count(present - total, ratio, size)
    while kept > 0 and kept + cluster_count(present - kept, ratio, size) > total:
        kept -= 1
    if kept <= 0:
        return 0, min(total, recycled_count(present, ratio))
    return kept, cluster_count(present - kept, ratio, size)


def batched_ranks(matrices: list[Tensor]) -> list[int]:
    """``torch.linalg.matrix_rank`` of every matrix in float32, computed on the host: the counts need the ranks there
    anyway (one device-to-host copy per shape of matrix instead of the one sync of ``tolist``), and a CUDA SVD per
    (raters x tokens) matrix costs milliseconds where the host's takes a fraction of one. Same default tolerance
    (max(m, n) x eps x the largest singular value) as one call per matrix."""
    ranks: list[int] = [0] * len(matrices)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, matrix in enumerate(matrices):
        shapes.setdefault(tuple(matrix.shape), []).append(i)
    for group in shapes.values():
        stacked = torch.stack([matrices[i] for i in group]).float().cpu()
        for i, rank in zip(group, torch.linalg.matrix_rank(stacked).tolist(), strict=True):
            ranks[i] = rank
    return ranks


def dpc_knn_merge(x: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """Cluster the (r, C) rows into ``clusters`` groups by DPC-kNN; returns the (clusters, C) group means and the
    (clusters,) indices of their centre rows.

    Density exp(-mean of the squared distances to the k = ``clusters`` nearest rows, itself included), distances
    divided by √C; a row's parent distance is its distance to the nearest denser row (the largest distance for the
    densest); the centres are the rows of largest density × parent distance; every row joins its nearest centre,
    each centre itself. Density ties go to the earlier row (the code adds 1e-6 noise instead)."""
    rows, channels = x.shape
    dist = torch.cdist(x, x) / channels**0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    index = torch.arange(rows, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    parent = dist.masked_fill(~denser, float("inf")).min(dim=-1).values
    parent = torch.where(torch.isinf(parent), dist.max(), parent)
    centres = torch.argsort(parent * density, descending=True, stable=True)[:clusters]
    assign = dist[:, centres].argmin(dim=-1)
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = x.new_zeros(clusters, channels).index_add_(0, assign, x)
    sizes = torch.bincount(assign, minlength=clusters).to(x.dtype)
    return sums / sizes[:, None], centres


@register_pruner
class SparseVLMPruner(Pruner):
    config_cls = SparseVLMConfig
    paper = ("SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference "
             "(ICML'25, arXiv 2410.04417)")
    status = "approximation"
    points = ("llm:K",)
    flash_compatible = True
    needs_training = "none"

    def layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers if self.config.layers is not None else default_layers(num_layers)
        if layers[-1] > num_layers - 2:
            raise ValueError(
                f"sparsevlm's layers={layers} name decoder layer {layers[-1]}, but the tokens are dropped from the "
                f"layer after it and the model has {num_layers} decoder layers (0..{num_layers - 1}). Give layers "
                f"up to {num_layers - 2}, or None for the code's layers scaled to this depth."
            )
        return layers

    def plan(self, num_layers: int) -> list[Stage]:
        stage_layers = tuple(layer + 1 for layer in self.layers(num_layers))
        fractions = stage_fractions(self.config, stage_layers, num_layers)
        adaptive = self.config.counts == "rank"
        return [Stage(Point("llm", layer), fraction, adaptive)
                for layer, fraction in zip(stage_layers, fractions, strict=True)]

    def scale_bias(self) -> tuple[float, float]:
        scale, bias = RANK_SCALES[nearest_setting(self.config.keep)]
        return (self.config.scale if self.config.scale is not None else scale,
                self.config.bias if self.config.bias is not None else bias)

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.attention_rows is None or ctx.hidden_states is None or ctx.text_mask is None:
            raise RuntimeError("sparsevlm needs the hidden states and attention rows of an 'llm:K' stage (K >= 1).")
        positions, valid = rater_positions(ctx)
        rows = ctx.attention_rows(positions) * valid[..., None]  # (B, Q, L), padded raters zeroed
        raters = valid.sum(dim=1).clamp(min=1).to(rows.dtype)
        relations = [rows[image.sample][:, image.positions] for image in ctx.images]  # per image (Q, n)
        scores = [rel.sum(dim=0) / raters[image.sample] for rel, image in zip(relations, ctx.images, strict=True)]
        totals = [image.budget for image in ctx.images]
        if self.config.counts == "rank":
            # Data-dependent counts: the ranks on the host, one copy per image size.
            ranks = batched_ranks(relations)
            scale, bias = self.scale_bias()
            for j, (rank, image) in enumerate(zip(ranks, ctx.images, strict=True)):
                n = image.num_tokens
                if rank >= n:
                    wanted = n  # the code: a full-rank matrix leaves the layer unsparsified
                else:
                    kept = max(0, min(int(rank * scale + bias), n - 1))
                    wanted = kept + (cluster_count(n - kept, self.config.recycle_ratio, self.config.cluster_size)
                                     if self.config.recycle else 0)
                totals[j] = min(image.budget, wanted)
        keep, values = [], []
        for image, score, total in zip(ctx.images, scores, totals, strict=True):
            kept, clusters = split_budget(total, image.num_tokens, self.config)
            order = torch.argsort(score, descending=True, stable=True)
            if clusters == 0:
                keep.append(order[:kept])
                values.append(None)
                continue
            dropped = order[kept:]
            recycled = dropped[: recycled_count(dropped.numel(), self.config.recycle_ratio)]
            hidden = ctx.hidden_states[image.sample]
            merged, centres = dpc_knn_merge(hidden[image.positions[recycled]].float(), clusters)
            keep.append(torch.cat((order[:kept], recycled[centres])))
            values.append(torch.cat((hidden[image.positions[order[:kept]]], merged.to(hidden.dtype))))
        return Selection(keep=keep, values=values if any(v is not None for v in values) else None)


def rater_positions(ctx: PruneContext) -> tuple[Tensor, Tensor]:
    """(B, Q) positions of each sample's raters, padded, and the (B, Q) bool mask of the real ones.

    A rater is a text token after the sample's first visual token whose relevance, the mean over the sample's visual
    tokens v of softmax over those text tokens t of h_v·h_t, exceeds the mean relevance (the code's "text raters");
    with no such text the prompt's last token rates alone, and with no relevance above the mean every text token
    rates. Samples without images get no raters."""
    hidden, text = ctx.hidden_states, ctx.text_mask
    batch, length = text.shape
    index = torch.arange(length, device=hidden.device)
    chosen = torch.zeros(batch, length, dtype=torch.bool, device=hidden.device)
    for sample in sorted({image.sample for image in ctx.images}):
        visual = torch.cat([image.positions for image in ctx.images if image.sample == sample])
        candidates = text[sample] & (index > visual.min())
        candidates |= ~candidates.any() & (index == length - 1)
        logits = hidden[sample, visual].float() @ hidden[sample].float().T  # (V, L)
        relevance = logits.masked_fill(~candidates, float("-inf")).softmax(dim=-1).mean(dim=0)
        mean = relevance.sum() / candidates.sum()
        raters = candidates & (relevance > mean)
        chosen[sample] = raters | (candidates & ~raters.any())
    counts = chosen.sum(dim=1)
    width = max(1, int(counts.max()))  # one sync: the padded rater count
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=hidden.device)[None, :] < counts[:, None]
    return order, valid


__all__ = ["SparseVLMConfig", "SparseVLMPruner", "default_layers", "dpc_knn_merge", "rater_positions",
           "split_budget", "stage_fractions"]
