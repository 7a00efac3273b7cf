"""MustDrop: merge similar 3 x 3 windows, keep a CLS key set, drop by text attention in the LLM (arXiv 2411.10803).

Paper: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (Liu et al.), arXiv
2411.10803; official code github.com/liuting20/MustDrop (its README says Apache-2.0; there is no LICENSE file):
``llava/model/multimodal_encoder/clip_encoder.py`` (the ViT forward with the merge and the key set),
``llava/model/multimodal_encoder/local_merge.py`` (``conditional_pooling``, ``merge_wavg``),
``llava/model/language_model/modelling_sparse_llama.py`` (``dual_attention_filter``, the prefill drops and the KV trim)
and the README's thresholds; read for this re-implementation (shared/METHODS.md §8), no code was copied.

1. Vision stage, once per image at ``vision_point`` ("encoder": the features of the vision layer the model consumes,
   before the projector; "projector": after it), on the image's (n, C) features:
   - local spatial merge: the image's token grid is tiled into non-overlapping 3 x 3 windows from its top-left
     corner; a window's similarity is the mean cosine similarity over its 72 ordered pairs of distinct tokens; every
     window whose similarity is >= ``merge_threshold`` (0.8) becomes one token, the mean of its 9 features, written
     (``Selection.values``) into the slot of its top-left token, whose original position it keeps; its other 8
     tokens are dropped. n' = n - 8 x (windows merged) tokens go on.
   - key set: the ceil(``key_share`` · n') tokens (0.08: 47 of 576) the vision encoder's CLS attends to most
     (``ImageTokens.cls_attention``, the head-mean CLS row of its last layer; a merged token gets the mean over its
     window). Every later stage keeps them. They are remembered per image, by original token index, until the next
     vision stage (``key_sets``).
2. Prefill stages at the inputs of decoder layers ``layers`` (the code prunes the outputs of layers 2 / 6 / 10 / 14
   of 32, i.e. the inputs of 3 / 7 / 11 / 15), each scored with the attention of the layer before it (vtprune's
   probe): per image, over the text queries t (every non-visual token after the image, the assistant prefix
   included; the prompt's last token where none follows it) and its present visual keys j,
   G_j = Σ_t Ā_tj (global attention) and M_j = max_t Ā_tj (individual attention), Ā the head-mean probabilities.
   - ``counts="budget"`` (default; METHODS.md §8(d)'s deterministic variant [vtprune]): the stage keeps exactly its
     count: the key set first, then the other tokens by decreasing G.
   - ``counts="paper"`` (the code's rule): token j is dropped iff G_j < g · Σ_j G_j and M_j < i, key set kept
     whatever its scores; (g, i) = the README's values for the target nearest to keep · 576 (192: 0.001 / 0.001,
     128: 0.0012 / 0.001, 64: 0.011 / 0.01), ``g=`` / ``i=`` override. Counts emerge per image and per stage.

Schedule (``plan``):
- ``layers`` None: 3 / 7 / 11 / 15 of 32 scaled to the depth L as round(l·L/32), clamped to 1..L-1, duplicates
  removed (3 / 6 / 10 / 13 for L = 28; 1 / 2 for the 4-layer test models).
- The vision stage is adaptive (``Stage(point, 1.0, adaptive=True)``): it may keep any number of tokens up to all
  of them, and budgets do not count it. Its merge only ever lowers the counts the LLM stages are sized for.
- ``counts="budget"``: the LLM stages keep shares t_m of each image's *original* tokens (min(present, round(t_m·n))
  per image, the engine's sizing) that shrink by ``decay`` (0.75) per stage. ``budget="input"``: t = keep,
  keep·decay, keep·decay², ...: exactly ``keep`` (or the merge's n', where fewer) is left after the first drop inside
  the LLM. ``budget="average"``: c, c·decay, ... (capped at 1), c solved by bisection so that the mean over the L
  layers of the visual share is ``keep`` when nothing merges (METHODS.md §0.2); merged windows then only lower the
  mean (their savings in the layers before the first LLM stage are not spent again). Infeasible when keep <= l₁/L
  (a clear ValueError).
- ``counts="paper"``: every LLM stage is adaptive with no bound but the tokens present; ``keep`` only picks the
  README's (g, i) row (its "tokens" are layer-averaged), neither budget is enforced, keep=1 is still the identity.

Faithful to the official code: 3 x 3 windows, threshold 0.8, the off-diagonal mean cosine, a merged window as the
plain mean of its 9 tokens (the code's size-weighted mean, all sizes 1 there), a merge decided once per image with no
count fixed in advance, the key set as the top ceil(0.08 · n') tokens of the last ViT layer's head-mean CLS attention
(CLIP-L's layer 23, even though LLaVA's features come from layer -2), the key set kept by every later stage, the
prune points after layers 2 / 6 / 10 / 14 scored by those layers' attention, G and M of the head-mean attention of
the text after the image, the README's thresholds and the drop rule of ``counts="paper"``, text never dropped.

Differs:
- Where the merge acts: the code merges the output of ViT layer 0 and runs layers 1..23 on the n' tokens (without
  proportional attention), so the ViT gets cheaper and its later features, the feature layer and the CLS row see
  the merged sequence. Here the tower runs unchanged: the similarity is measured on the features the LLM receives
  (CLIP layer -2 at the encoder point), their window means are what is written, and the key set ranks the unmerged
  tower's CLS attention (a merged token gets its window's mean). The code's 0.8 was set for layer-0 outputs; late
  features can be more alike: on vtprune's LLaVA reference checkpoint and its sample image (``vtprune compare``)
  0.8 merges 52 of the 64 windows (576 -> 160 tokens). ``merge_threshold`` is the knob.
- Per-image merge: every window above the threshold merges, per image. The code merges the top-r windows of every
  image of the batch, r the *minimum* over the batch of the windows above the threshold, which couples samples.
- Slots: a merged token takes its window's top-left slot and original position, and every survivor keeps its place.
  The code puts the merged tokens first (by decreasing similarity), then the others in order, destroying grid order.
- Windows: only complete 3 x 3 windows merge; rows and columns past the last multiple of 3 never do (the code asserts
  a square grid divisible by 3: CLIP's 24 x 24, SigLIP's 27 x 27). Grids that stack tiles or frames (InternVL's
  (tiles · 16, 16), a video's frames) are tiled as one raster, so a window may straddle two tiles or frames; the
  similarity gate decides. Images without one grid (tiled AnyRes images of LLaVA-NeXT / OneVision: base and stitched
  tiles) are not merged; the code merges each 336 px crop in the ViT and forces the "flat" layout.
- Qwen2/2.5/3-VL: the vision stage acts at the projector (LLM-space features after the 2 x 2 merger, the similarity
  measured there), since the merger mixes patches and encoder-point values cannot be mapped to LLM tokens
  (``official_defaults``; the code has LLaVA only).
- Towers without a CLS row (SigLIP in LLaVA-OneVision, Qwen's ViTs, videos): the key set ranks the features' L2
  norms instead (vtprune's fallback, as VisionZip's: a ViT's attention concentrates on its high-norm tokens).
- ``counts="budget"`` and its geometric ``decay`` schedule are vtprune's: the code's counts come from the thresholds
  alone. decay = 0.75 keeps every stage's count above the 8% key set for keep >= 2/9 under both budgets on 32
  layers (128 of 576: 128 / 96 / 72 / 54 under "input", 144 / 108 / 81 / 61 under "average"); at keep = 1/9 the later
  stages (and under "average", with the layers before the first stage spending most of the budget, every stage:
  19 / 15 / 11 / 8) hold fewer tokens than the key set, and the key tokens of largest G are kept.
- The stages read vtprune's probe (layer l's query rows against its keys, fp32 softmax, any attention backend); the
  code swaps in an attention that returns full matrices at the pruning layers and handles batch size 1.
- Positions: survivors keep their original positions; the code renumbers them after every drop (and takes each
  layer's own cache length as its decode position). ``positions="renumber"`` renumbers only the vision stage's
  survivors, not the in-LLM ones: not the code's numbering.
- Not yet implemented: the decode stage, the code's trim of the KV caches of layers 2..14 to the final kept set after
  prefill (those layers' caches keep the tokens their own stage kept). The engine's decode-stage machinery assumes one
  cache layout from its layer on, and the trim needs a different one per group of layers.
- One merge, key set and filter per image (video, InternVL tile group) with its own counts; ties go to the earlier
  token (stable sorts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.budget import geometric_shares
from vtprune.config import AUTO, PrunerConfig, layer_tuple, scaled_layers
from vtprune.point import ENTRY_KINDS, Point
from vtprune.pruners.base import Pruner
from vtprune.pruners.visionzip import dominant_scores
from vtprune.registry import register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection, Stage

PAPER_LAYERS = (3, 7, 11, 15)  # inputs of the layers after the code's pruning layers 2 / 6 / 10 / 14 of 32
PAPER_DEPTH = 32
PAPER_TOKENS = 576  # LLaVA-1.5's visual tokens, the unit of the README's targets
# README: target tokens (layer-averaged, of 576) -> (g, i), the global and individual thresholds.
THRESHOLDS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}
WINDOW = 3  # the code's (3, 3) windows
COUNTS = ("budget", "paper")
VISION_POINTS = ("encoder", "projector")
DEFAULT_DECAY = 0.75


@dataclass(frozen=True)
class MustDropConfig(PrunerConfig):
    """Attributes:
    merge_threshold: a 3 x 3 window merges into one token when the mean cosine similarity of its tokens is >= this,
        in (0, 1] (the code's 0.8; 1 merges only windows of identical directions).
    key_share: share of the tokens left after the merge that form the key set, ceil(share · n'), kept by every later
        stage; in [0, 1) (the code's 0.08; 0 = no key set).
    layers: decoder layers at whose input the prefill stages drop, strictly increasing, each >= 1 (scored with the
        attention of the layer before) and < L. None = 3 / 7 / 11 / 15 of 32 (the inputs after the code's layers
        2 / 6 / 10 / 14) scaled to the model's depth L (round(l·L/32), clamped to 1..L-1, duplicates removed).
    counts: "budget" (default): each stage keeps exactly its share (key set, then the largest global attention),
        so ``keep`` is met under both budgets; "paper": the code's thresholds (``g``, ``i``), counts emerge.
    decay: ``counts="budget"`` only: ratio of each stage's share of the original tokens to the previous stage's, in
        (0, 1] (vtprune's schedule shape).
    g: ``counts="paper"`` only: global threshold, a share of the image's summed global attention, in [0, 1]. None =
        the README's value for the target nearest to keep · 576 (0.001 for 192, 0.0012 for 128, 0.011 for 64).
    i: ``counts="paper"`` only: individual threshold, an attention probability, in [0, 1]. None = the README's
        value (0.001 for 192 and 128, 0.01 for 64).
    vision_point: where the merge and the key set act: "encoder" (the features of the vision layer the model
        consumes; written means go through the projector) or "projector" (after it, in LLM space); "auto": "encoder"
        for the families with a token-wise projector, "projector" for Qwen (its merger mixes 2 x 2 patches).
    """

    method = "mustdrop"
    # For vtprune.calibrate with counts="budget" (the default). Not g / i: "paper" counts do not follow keep, so the
    # discrepancy objective would drive them to 0 (keep everything). Not merge_threshold: the merge is outside the
    # budget, so the objective would drive it to 1 (merge nothing).
    search_space: ClassVar[dict[str, tuple]] = {
        "decay": ("float", 0.3, 1.0),
        "key_share": ("float", 0.0, 0.3),
    }
    merge_threshold: float = 0.8
    key_share: float = 0.08
    layers: tuple[int, ...] | None = None
    counts: str = "budget"
    decay: float = DEFAULT_DECAY
    g: float | None = None
    i: float | None = None
    vision_point: str = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", layer_tuple(
            self.layers, 1, "mustdrop scores the tokens with the attention of the layer before each stage",
            "(3, 7, 11, 15)"))
        for name in ("merge_threshold", "key_share", "decay", "g", "i"):
            value = getattr(self, name)
            if value is None and name in ("g", "i"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
        if not 0.0 < self.merge_threshold <= 1.0:
            raise ValueError(
                f"merge_threshold={self.merge_threshold} is outside (0, 1]: it is the mean cosine similarity above "
                "which a 3 x 3 window merges (the code's 0.8)."
            )
        if not 0.0 <= self.key_share < 1.0:
            raise ValueError(
                f"key_share={self.key_share} is outside [0, 1): it is the share of the tokens protected as the key "
                "set (the code's 0.08; 0 for none)."
            )
        if self.counts not in COUNTS:
            raise ValueError(f"counts={self.counts!r} is not one of {list(COUNTS)}.")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(
                f"decay={self.decay} is outside (0, 1]: it is the ratio of each stage's share of the visual tokens "
                f"to the previous stage's (default {DEFAULT_DECAY})."
            )
        if self.counts == "paper" and self.decay != DEFAULT_DECAY:
            raise ValueError("decay shapes the counts of counts='budget'; counts='paper' takes its counts from the "
                             "thresholds g and i. Leave decay at its default, or use counts='budget'.")
        for name in ("g", "i"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.counts != "paper":
                raise ValueError(f"{name} is a threshold of counts='paper' (got counts={self.counts!r}); pass "
                                 "counts='paper' with it, or leave it None.")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is outside [0, 1]: it is a share of attention (the README's "
                                 "values are 0.001 to 0.011).")
        if self.vision_point not in (*VISION_POINTS, AUTO):
            raise ValueError(
                f"vision_point={self.vision_point!r} is not one of {[*VISION_POINTS, AUTO]}: the merge and the key "
                "set act before the LLM, on the vision features ('encoder') or after the projector ('projector')."
            )


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The inputs of the layers after the code's 2 / 6 / 10 / 14 of 32, scaled to ``num_layers``, each in 1..L-1."""
    if num_layers < 2:
        raise ValueError(
            f"mustdrop needs an LLM of at least 2 decoder layers (a stage at layer >= 1 scored by the layer before "
            f"it); this one has {num_layers}."
        )
    return scaled_layers(PAPER_LAYERS, num_layers, low=1, high=num_layers - 1, paper_depth=PAPER_DEPTH)


def stage_shares(keep: float, budget: str, decay: float, layers: tuple[int, ...], num_layers: int) -> list[float]:
    """``counts="budget"``: share of each image's original tokens each LLM stage keeps, shrinking by ``decay``."""
    return geometric_shares(
        keep, budget, decay, layers, num_layers,
        f"keep={keep} under budget='average' cannot be met with the first mustdrop stage at layer {layers[0]} "
        f"of {num_layers}: the layers before it see every token (the merge aside) and alone use "
        "{floor:.3f} of the full budget. Raise keep, give an earlier first stage (layers=, "
        "e.g. starting at 1), or use budget='input'.")


def nearest_target(keep: float) -> int:
    """The README's target (192, 128 or 64 of 576 tokens) nearest to ``keep``; a tie goes to the larger."""
    return min(THRESHOLDS, key=lambda target: (abs(keep * PAPER_TOKENS - target), -target))


def key_count(share: float, tokens: int) -> int:
    """ceil(share · tokens), the code's key set size; the epsilon keeps an exact product (0.08 · 25 = 2.0000000004
    in binary floating point) from rounding up."""
    return min(tokens, math.ceil(share * tokens - 1e-9))


def grid_windows(grid: tuple[int, int], device: torch.device) -> Tensor:
    """(W, 9) original indices of the complete non-overlapping 3 x 3 windows of a (rows, cols) raster grid, tiled from
    the top-left corner, windows in raster order and each window's tokens in raster order (its top-left first). Rows
    and columns past the last multiple of 3 belong to no window."""
    rows, cols = grid
    starts = (torch.arange(rows // WINDOW, device=device)[:, None] * WINDOW * cols
              + torch.arange(cols // WINDOW, device=device)[None, :] * WINDOW).flatten()
    steps = torch.arange(WINDOW, device=device)
    offsets = (steps[:, None] * cols + steps[None, :]).flatten()
    return starts[:, None] + offsets[None, :]


def window_similarity(x: Tensor) -> Tensor:
    """(W, k, C) tokens of W windows -> (W,) fp32 mean cosine similarity over the k·(k-1) ordered pairs of distinct
    tokens of each window."""
    unit = F.normalize(x.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    k = x.shape[1]
    distinct = ~torch.eye(k, dtype=torch.bool, device=x.device)
    return (similarity * distinct).sum(dim=(1, 2)) / (k * (k - 1))


def merge_windows(image: ImageTokens, threshold: float) -> Tensor:
    """(m, 9) indices into the image's present tokens of its windows to merge (similarity >= ``threshold``), each row
    its top-left token first; windows with a token no longer present, and images without a grid, merge nothing."""
    device = image.original_indices.device
    empty = torch.zeros(0, WINDOW * WINDOW, dtype=torch.long, device=device)
    if image.grid is None or image.features is None:
        return empty
    windows = grid_windows(image.grid, device)
    if windows.shape[0] == 0:
        return empty
    rows, cols = image.grid
    local = torch.full((rows * cols,), -1, dtype=torch.long, device=device)
    local[image.original_indices] = torch.arange(image.num_tokens, device=device)
    members = local[windows]
    complete = (members >= 0).all(dim=1)
    similarity = window_similarity(image.features[members.clamp(min=0)])
    return members[complete & (similarity >= threshold)]


def text_attention(ctx: PruneContext) -> list[tuple[Tensor, Tensor]]:
    """Per image, ((n,) G, (n,) M) of its present tokens: the sum and the max over its text queries of their fp32
    head-mean attention (layer K-1, the probe). Text queries: the non-visual tokens after the image; where none
    follows it, the prompt's last token. One probe call; its queries per sample are the text after its first image
    and its last token."""
    mask = ctx.attention_mask.bool()
    batch, length = mask.shape
    device = mask.device
    index = torch.arange(length, device=device)
    visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for image in ctx.images:
        visual[image.sample].index_fill_(0, image.positions, True)
    first = torch.where(visual.any(dim=1), torch.argmax(visual.to(torch.int8), dim=1), length)
    queries = ctx.text_mask & mask & (index[None, :] > first[:, None])
    # Padding and fillers sit on the left, so the last row of every sample is its prompt's last token.
    queries[:, -1] = True
    counts = queries.sum(dim=1)
    width = int(counts.max())  # one sync: the padded query count
    order = torch.argsort((~queries).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, W) query positions
    valid = torch.arange(width, device=device)[None, :] < counts[:, None]
    rows = ctx.attention_rows(order).float()  # (B, W, L)
    is_text = ctx.text_mask.gather(1, order) & valid
    out = []
    for image in ctx.images:
        b = image.sample
        raters = is_text[b] & (order[b] > image.positions.max())
        raters = torch.where(raters.any(), raters, valid[b] & (order[b] == length - 1))
        block = rows[b][:, image.positions] * raters[:, None]  # (W, n); probabilities are >= 0, so max ignores zeros
        out.append((block.sum(dim=0), block.max(dim=0).values))
    return out


@register_pruner
class MustDropPruner(Pruner):
    config_cls = MustDropConfig
    paper = ("Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model "
             "(MustDrop, arXiv 2411.10803)")
    status = "approximation"
    points = ("encoder", "projector", "llm:K")
    flash_compatible = True
    needs_training = "none"
    needs = frozenset({"cls_attention"})
    official_defaults = {
        **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), {"vision_point": "projector"}),
        "*": {"vision_point": "encoder"},
    }

    def __init__(self, config: MustDropConfig) -> None:
        super().__init__(config)
        # Per call: (sample, index_in_sample) -> (k,) original indices of the image's key set, written by the vision
        # stage (which starts afresh every prefill) and read by the LLM stages of the same prefill.
        self.key_sets: dict[tuple[int, int], Tensor] = {}

    def layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers if self.config.layers is not None else default_layers(num_layers)
        if layers[-1] >= num_layers:
            raise ValueError(
                f"mustdrop's layers={layers} name decoder layer {layers[-1]}, but the model has {num_layers} decoder "
                f"layers (0..{num_layers - 1}). Give layers below {num_layers}, or None for the code's stages scaled "
                "to this depth."
            )
        return layers

    def thresholds(self) -> tuple[float, float]:
        """(g, i) of ``counts="paper"``: the config's, else the README's for the target nearest to ``keep``."""
        g, i = THRESHOLDS[nearest_target(self.config.keep)]
        return (g if self.config.g is None else self.config.g, i if self.config.i is None else self.config.i)

    def plan(self, num_layers: int) -> list[Stage]:
        if self.config.vision_point == AUTO:
            raise ValueError(
                "mustdrop's vision_point is 'auto' (set per model family): wrap the model to resolve it, call "
                "pruner.resolve(model_type), or pass vision_point='encoder' or 'projector'."
            )
        layers = self.layers(num_layers)
        # The merge keeps as many tokens as its windows leave: an upper bound of all of them, outside the budgets.
        stages = [Stage(self.config.vision_point, 1.0, adaptive=True)]
        if self.config.counts == "paper":
            return stages + [Stage(Point("llm", layer), 1.0, adaptive=True) for layer in layers]
        shares = stage_shares(self.config.keep, self.config.budget, self.config.decay, layers, num_layers)
        return stages + [Stage(Point("llm", layer), share) for layer, share in zip(layers, shares, strict=True)]

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.point.kind in ENTRY_KINDS:
            return self._vision(ctx)
        if ctx.attention_rows is None or ctx.attention_mask is None or ctx.text_mask is None:
            raise RuntimeError("mustdrop needs the attention rows of layer K-1 from the engine (an 'llm:K' stage).")
        return self._filter(ctx)

    def _vision(self, ctx: PruneContext) -> Selection:
        """The merge and the key set of every image (one merge decision per image: counts differ)."""
        self.key_sets = {}
        keep: list[Tensor] = []
        values: list[Tensor | None] = []
        for image in ctx.images:
            merged = merge_windows(image, self.config.merge_threshold)
            present = torch.ones(image.num_tokens, dtype=torch.bool, device=ctx.device)
            present[merged[:, 1:].flatten()] = False
            kept = present.nonzero().squeeze(1)
            scores = dominant_scores(image.features[None], [image])[0]
            written = None
            if merged.shape[0]:
                features = image.features.float()
                means = features[merged].mean(dim=1)
                written = features.index_copy(0, merged[:, 0], means)[kept].to(image.features.dtype)
                scores = scores.index_copy(0, merged[:, 0], scores[merged].mean(dim=1))
            count = key_count(self.config.key_share, kept.numel())
            top = torch.argsort(scores[kept], descending=True, stable=True)[:count]
            self.key_sets[(image.sample, image.index_in_sample)] = image.original_indices[kept[top]]
            keep.append(kept)
            values.append(written)
        return Selection(keep=keep, values=values if any(v is not None for v in values) else None)

    def _is_key(self, image: ImageTokens) -> Tensor:
        key = self.key_sets.get((image.sample, image.index_in_sample))
        if key is None:
            raise RuntimeError(
                f"mustdrop has no key set for image {image.index_in_sample} of sample {image.sample}: its vision "
                "stage did not run in this prefill. Pass pixel values so the vision tower runs under the hooks."
            )
        return torch.isin(image.original_indices, key)

    def _filter(self, ctx: PruneContext) -> Selection:
        """One dual-attention stage: per image, the key set plus the top of G (budget) or the code's thresholds."""
        scores = text_attention(ctx)
        if self.config.counts == "budget":
            keep = []
            for image, (global_attention, _) in zip(ctx.images, scores, strict=True):
                order = torch.argsort(global_attention, descending=True, stable=True)
                # Key tokens first (by G among themselves), then the rest by G.
                order = order[torch.argsort((~self._is_key(image)[order]).to(torch.int8), stable=True)]
                keep.append(order[: image.budget])
            return Selection(keep=keep)
        g, i = self.thresholds()
        kept = []
        for image, (global_attention, individual) in zip(ctx.images, scores, strict=True):
            dropped = (global_attention < g * global_attention.sum()) & (individual < i)
            kept.append(~dropped | self._is_key(image))
        # Threshold counts are data-dependent: one device-to-host copy for all images.
        totals = torch.stack([mask.sum() for mask in kept]).tolist()
        return Selection(keep=[torch.argsort((~mask).to(torch.int8), stable=True)[: min(total, image.budget)]
                               for mask, total, image in zip(kept, totals, ctx.images, strict=True)])


__all__ = ["MustDropConfig", "MustDropPruner", "default_layers", "grid_windows", "key_count", "merge_windows",
           "nearest_target", "stage_shares", "text_attention", "window_similarity"]
