"""VFlowOpt: ViT importance (context relevance + patch entropy), pruning with recycling before the LLM, then two
more drops inside it (Yang et al., ICCV 2025).

Paper: "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization", arXiv
2508.05211; official code github.com/sihany077/VFlowOpt (LLaVA-OneVision only, CC BY-NC 4.0), commit 129eeef, read
for this re-implementation (``llava/model/multimodal_encoder/siglip_encoder.py``: the entropy and the combined
attention map; ``llava/model/language_model/llava_qwen_training_free.py``: pruning and grid recycling;
``transformers-4.46.0/.../qwen2/modeling_qwen2.py``: the in-LLM drops; ``lmms_eval/models/llava_ov_opt_all.py``: the
Bayesian search). No code was copied.

Importance, per image, on the vision encoder's self-attention A (head mean) at the layer whose output the model
consumes (LLaVA: ``vision_feature_layer``, -2; the code: the last SigLIP layer LLaVA-OV keeps):
1. received attention c_j = mean over the queries of A[:, j]; the "global" tokens K = {j : c_j > t · mean(c)} (an
   empty K falls back to every token, where the code's mean over nothing is NaN);
2. context relevance I_j = mean over k in K of A[k, j];
3. plus α · softmax_j(H_j), H_j the log2 entropy of the 256-bin gray-level histogram of token j's patch (gray =
   mean of R, G, B). **Bug not copied:** the code multiplies the *normalised* pixel values by 255 and casts them to
   uint8, so negative values wrap around (−0.2 becomes 205); here the pixels are first de-normalised with the
   processor's ``pixel_mean`` / ``pixel_std`` (CLIP's by default; set SigLIP's 0.5 / 0.5 for such towers), then
   scaled to 0..255, rounded and clamped per channel, as the image's own bytes.
The adapter gives the attention (``ImageTokens.encoder_attention``, computed by projecting q and k of that one layer
in a hook, whatever attention backend runs; the model is never switched to eager) and the pixels
(``ImageTokens.patch_pixels``) where its image tokens are single patches of one tile: LLaVA-1.5 today.

Stage 1 (``projector`` point, before the LLM): rank by I; keep the top k and recycle the dropped tokens: they are
binned into cells of ``a`` x ``a`` tokens of the image's own token grid (⌊row / a⌋, ⌊col / a⌋; the code hard-codes
its 27 x 27 grid), and each non-empty cell becomes one token whose value (``Selection.values``) is the cell's
importance-weighted mean (``recycle_value="weighted"``, the code; "mean": the plain mean) written into the slot of
the cell's most important dropped token, as the code does.
Stages 2 and 3 (inputs of LLM layers ≈ L/3 and 2L/3: the code's 0-based 9 and 18 of 28, scaled as round(l·L/28)
and clamped to 1..L-1): drop the present visual tokens of lowest ViT importance, the same map carried along (a recycled
token keeps its slot's importance); the code reads no LLM attention there (it reloads the ViT map it kept), and
neither does this file.

Schedule. R1, R2, R3: the visual share after stage 1 (of the image's tokens), then kept by stages 2 and 3 (of those
present). ``budget="input"``: R1 = ``keep``; R2, R3 = ``r2`` / ``r3`` or the released config nearest to ``keep``.
``budget="average"``: the layer mean (R1·l2 + R1R2·(l3 − l2) + R1R2R3·(L − l3)) / L equals ``keep``: with ``r1``
None, R1 is solved for the given (or released) R2, R3; with ``r1`` given, R3 is solved (the code's own rule, which
clips it to 1 — here an unreachable budget is an error). Where the released shape would need R1 > 1 (large
``keep``), the schedule becomes R1 = keep, R2 = R3 = 1 (stage 1 only). The released configs (LLaVA-OV-7B, the
code's scripts) for 50 / 25 / 10 %: t = 28.68 / 34.76 / 39.26, a = 11.76 / 15.58 / 17.39, α = 0, R2 = 0.7487 /
0.9833 / 1.0, R3 = 0.487 / 0.8773 / 0.6011 (R1 = 0.7233 / 0.2651 / 0.1166, which ``budget="average"`` re-derives
for the model's depth). ``search_space`` is the code's Bayesian search (scikit-optimize, 27 initial points, 300
calls; t in [0, 50], a in [3, 24], α in [−1, 1], R2 in [0.2 / 0.375, 1]), re-parametrised budget-free: the code
searches R1 in [keep, 1.5·keep] and solves R3; here R2 and R3 are searched and R1 is solved.

Positions (``positions="auto"``): the LLaVA-OV code rebuilds a shorter prompt after stage 1 (survivors renumbered,
"renumber"), and its LLM drops gather the position ids (original); vtprune does the same ("renumber" resolves for the
stage before the LLM; rows keep their positions at later drops). Qwen families (M-RoPE): "original".

Faithful: the context-relevance formula (t × mean threshold, mean over K), the softmax-entropy term and its α, the
grid recycling (weighted mean into the most important dropped slot), the stage layers 9 / 18 of 28 (scaled), the ViT
map reused by the LLM stages, the released hyper-parameters and the search bounds.

Differs (so ``status = "approximation"``):
- Counts: the code drops round(n(1 − R1)) + ⌊n / a²⌋ and re-keeps one token per non-empty cell, so it keeps about
  R1·n; here k (tokens kept by rank) is solved so that k + the cells of the n − k dropped is exactly the budget.
- ``a`` None scales the released a (tokens on a 27-token side) to the image's grid: a · cols / 27 (our choice); the
  code applies a to its 27 x 27 base grid and to every crop alike.
- Families other than LLaVA-1.5 have no ``encoder_attention`` / ``patch_pixels`` yet (AnyRes tiles, SigLIP without
  a single tile layout, Qwen's and InternVL's merged patches): there the importance is the ViT CLS attention row
  (the CLS being the archetypal global token) where the tower has one, else the feature norms at the point,
  normalised to sum 1 (vtprune's fallback), and the entropy term is skipped (with a warning where α ≠ 0). The
  paper's patch-to-token averaging for 2 x 2 merges is not implemented.
- AnyRes crops are not binned separately (one grid per image as vtprune sees it); the code's newline tokens with
  importance 1 are never candidates here (layout tokens are never image tokens).
- ``needs`` also asks for the CLS row (the fallback), so LLaVA pays one extra CLS-row projection it does not use.
- The calibration itself (``vtprune.calibrate``'s Bayesian search over ``search_space``) is not in this file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vtprune.config import AUTO, PrunerConfig, layer_tuple, scaled_layers
from vtprune.point import Point
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection, Stage

logger = logging.getLogger("vtprune")

PAPER_LAYERS = (9, 18)  # 0-based inputs of the code's in-LLM drops, of Qwen2-7B's 28 layers
PAPER_DEPTH = 28
PAPER_SIDE = 27  # LLaVA-OV's SigLIP grid side, the unit of the released a
# Released configs (average budget -> t, a, alpha, R1, R2, R3), LLaVA-OV-7B.
RELEASED = {
    0.5: (28.68, 11.76, 0.0, 0.7233, 0.7487, 0.487),
    0.25: (34.76, 15.58, 0.0, 0.2651, 0.9833, 0.8773),
    0.1: (39.26, 17.39, 0.0, 0.1166, 1.0, 0.6011),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RECYCLE_VALUES = ("weighted", "mean")
QWEN = {"positions": "original"}


def _number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    if not (low < value if low_open else low <= value) or not value <= high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value} is outside {bracket}{low}, {high}].")


@dataclass(frozen=True)
class VFlowOptConfig(PrunerConfig):
    """Attributes:
    t: threshold of the "global" tokens, in multiples of the mean received attention (c_j > t · mean c); None = the
        released config nearest to ``keep`` (28.68 / 34.76 / 39.26 for 50 / 25 / 10 %).
    alpha: weight α of softmax(patch entropy) added to the context relevance (0 in every released config).
    a: side of the recycling cells, in tokens of the image's grid (> 0, may be fractional as in the code); None = the
        released a for the nearest budget scaled to the image's grid (a · cols / 27).
    r1: R1, the visual share after stage 1 under ``budget="average"`` (R3 is then solved); None = solved from keep.
        Must be None under ``budget="input"``, where R1 is ``keep``.
    r2: R2, the share of the present tokens the first in-LLM stage keeps; None = the released config's.
    r3: R3, the same for the second in-LLM stage; None = the released config's (or solved, when ``r1`` is given).
    layers: decoder layers at whose input the in-LLM stages drop (at most two, strictly increasing, >= 1); None =
        the code's 9 and 18 of 28 scaled to the model's depth L (round(l·L/28), clamped to 1..L-1, deduplicated).
    recycle: merge the dropped tokens of each grid cell into one token at stage 1 (the paper's recycling).
    recycle_value: "weighted" (importance-weighted mean, the code; negative importances count as 0, a cell of zero
        weight takes the plain mean) or "mean" (plain mean of the cell's dropped tokens).
    pixel_mean, pixel_std: the processor's per-channel normalisation, to de-normalise the pixels for the entropy
        (``processor.image_processor.image_mean`` / ``image_std``; CLIP's by default).
    """

    method = "vflowopt"
    search_space: ClassVar[dict[str, tuple]] = {
        "t": ("float", 0.0, 50.0),
        "a": ("float", 3.0, 24.0),
        "alpha": ("float", -1.0, 1.0),
        "r2": ("float", 0.2 / 0.375, 1.0),
        "r3": ("float", 0.2 / 0.375, 1.0),
    }
    t: float | None = None
    alpha: float = 0.0
    a: float | None = None
    r1: float | None = None
    r2: float | None = None
    r3: float | None = None
    layers: tuple[int, ...] | None = None
    recycle: bool = True
    recycle_value: str = "weighted"
    pixel_mean: tuple[float, float, float] = CLIP_MEAN
    pixel_std: tuple[float, float, float] = CLIP_STD
    positions: str = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t is not None:
            _number("t", self.t, 0.0, math.inf)
        _number("alpha", self.alpha, -math.inf, math.inf)
        if self.a is not None:
            _number("a", self.a, 0.0, math.inf, low_open=True)
        for name in ("r1", "r2", "r3"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), 0.0, 1.0, low_open=True)
        if self.r1 is not None and self.budget == "input":
            raise ValueError("r1 is keep under budget='input'; leave r1=None, or use budget='average'.")
        if self.r1 is not None and self.r3 is not None:
            raise ValueError("r3 is solved from keep when r1 is given (budget='average'); give r1 or r3, not both.")
        object.__setattr__(self, "layers", layer_tuple(
            self.layers, 1, "the first stage before the LLM is vflowopt's own", "(9, 18)"))
        if self.layers is not None and len(self.layers) > 2:
            raise ValueError(f"layers={self.layers} names {len(self.layers)} stages; VFlowOpt has at most two in-LLM "
                             "stages (R2 and R3).")
        if not isinstance(self.recycle, bool):
            raise TypeError(f"recycle must be True or False, got {self.recycle!r}.")
        if self.recycle_value not in RECYCLE_VALUES:
            raise ValueError(f"recycle_value={self.recycle_value!r} is not one of {list(RECYCLE_VALUES)}.")
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or len(value) != 3:
                raise ValueError(
                    f"{name}={value!r} must be three numbers (R, G, B), the processor's image_{name[6:]}.")
            for channel in value:
                _number(name, channel, -math.inf, math.inf)
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"pixel_std={self.pixel_std} must be positive.")


def released(keep: float) -> tuple[float, ...]:
    """The released (t, a, alpha, R1, R2, R3) of the budget (50 / 25 / 10 %) nearest to ``keep``."""
    return RELEASED[min(RELEASED, key=lambda b: abs(b - keep))]


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The code's 9 / 18-of-28 in-LLM stages scaled to ``num_layers`` layers, each in 1..L-1 (none for L < 2)."""
    if num_layers < 2:
        return ()
    return scaled_layers(PAPER_LAYERS, num_layers, low=1, high=num_layers - 1, paper_depth=PAPER_DEPTH)


def layer_mean(fractions: list[float], layers: tuple[int, ...], num_layers: int) -> float:
    """Mean over the L layers of the visual share: ``fractions[0]`` from layer 0, ``fractions[m]`` from
    ``layers[m-1]``."""
    bounds = (0, *layers, num_layers)
    return sum(f * (bounds[m + 1] - bounds[m]) for m, f in enumerate(fractions)) / num_layers


def stage_fractions(config: VFlowOptConfig, layers: tuple[int, ...], num_layers: int) -> list[float]:
    """Visual share of the image's tokens left after stage 1 and each in-LLM stage (module docstring, "Schedule")."""
    keep = config.keep
    _, _, _, _, r2, r3 = released(keep)
    ratios = [config.r2 if config.r2 is not None else r2, config.r3 if config.r3 is not None else r3][: len(layers)]
    if config.budget == "input":
        return _products(keep, ratios)
    if config.r1 is not None:
        if len(ratios) < 2:
            raise ValueError(f"r1 with budget='average' solves R3, but this model has {len(ratios)} in-LLM stage(s) "
                             "(layers=); leave r1=None.")
        head = layer_mean(_products(config.r1, ratios[:1]) + [0.0], layers, num_layers)
        tail = config.r1 * ratios[0] * (num_layers - layers[1]) / num_layers
        solved = (keep - head) / tail
        if not 0.0 < solved <= 1.0:
            raise ValueError(
                f"keep={keep} under budget='average' cannot be met with r1={config.r1}, r2={ratios[0]}: R3 would be "
                f"{solved:.3f}, outside (0, 1]. Change r1 or r2, or leave r1=None to solve R1."
            )
        return _products(config.r1, [ratios[0], solved])
    r1 = keep / layer_mean(_products(1.0, ratios), layers, num_layers)
    if r1 <= 1.0:
        return _products(r1, ratios)
    if config.r2 is not None or config.r3 is not None:
        raise ValueError(
            f"keep={keep} under budget='average' needs R1 = {r1:.3f} > 1 with r2={ratios[:1]}, r3={ratios[1:]}; "
            "raise r2 / r3 or leave them None."
        )
    return _products(keep, [1.0] * len(ratios))  # the released shape cannot reach this budget: stage 1 only


def _products(first: float, ratios: list[float]) -> list[float]:
    out = [first]
    for ratio in ratios:
        out.append(out[-1] * ratio)
    return out


def patch_entropy(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(n, 3·p·p) normalised patch pixels -> (n,) fp32 log2 entropy of each patch's 256-bin gray histogram.

    De-normalised per channel (x · std + mean), scaled to 0..255, rounded and clamped (the image's bytes), gray =
    mean of R, G, B rounded to a level; the code's uint8 cast of the normalised values is not reproduced."""
    n = pixels.shape[0]
    x = pixels.float().reshape(n, 3, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device)[None, :, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device)[None, :, None]
    levels = ((x * std_t + mean_t) * 255.0).round().clamp(0, 255)
    gray = levels.mean(dim=1).round().long()  # (n, p·p)
    hist = torch.zeros(n, 256, device=x.device).scatter_add_(1, gray, torch.ones_like(gray, dtype=torch.float32))
    prob = hist / hist.sum(dim=1, keepdim=True)
    return -(prob * torch.log2(prob.clamp(min=1e-30))).sum(dim=1)


def context_relevance(received: Tensor, t: float) -> Tensor:
    """(n, S) ``encoder_attention`` ([j, k] = A[k, j], S = n) -> (n,) mean over the global queries K of A[k, j], K the
    tokens whose received attention (mean over the queries) exceeds t × its mean; every token where none does."""
    c = received.float().mean(dim=1)
    chosen = c > t * c.mean()
    chosen = chosen | ~chosen.any()
    weights = chosen.float() / chosen.sum()
    return received.float() @ weights


def grid_cells(image: ImageTokens, a: float) -> tuple[Tensor, int]:
    """(n,) long cell id of each present token, (⌊row / a⌋, ⌊col / a⌋) on the image's grid (a grid of side ⌈√n⌉
    where the image has none), and the number of cell ids. For stage 1, where every token is present."""
    idx = image.original_indices
    n = image.num_tokens
    cols = image.grid[1] if image.grid is not None else math.isqrt(n - 1) + 1
    rows = -(-n // cols)  # a video's frames stack their rows
    cell_cols = int((cols - 1) // a) + 1
    cell_rows = int((rows - 1) // a) + 1
    row = torch.div(idx, cols, rounding_mode="floor").float()
    col = (idx % cols).float()
    return (row / a).floor().long() * cell_cols + (col / a).floor().long(), cell_rows * cell_cols


def recycle_select(features: Tensor, importance: Tensor, cells: Tensor, num_cells: int, budget: int,
                   weighted: bool) -> tuple[Tensor, Tensor]:
    """Stage 1 on one image: keep the top k by importance and one recycled token per non-empty cell of the dropped,
    k solved so that exactly ``budget`` tokens are kept (no host sync).

    Args:
        features: (n, C) tokens. importance: (n,). cells: (n,) long cell ids in 0..num_cells-1. budget: tokens to
        keep (< n).
        weighted: importance-weighted cell means (the code) instead of plain means.

    Returns:
        keep (budget,) indices in index order; values (budget, C) in features' dtype (recycled slots hold their
        cell's mean of dropped tokens).
    """
    n, channels = features.shape
    device = features.device
    order = torch.argsort(importance, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=device))
    # A cell is among the dropped of "keep the top k" iff its least important token's rank is >= k.
    last = torch.full((num_cells,), -1, device=device, dtype=torch.long).scatter_reduce(0, cells, rank, "amax")
    hist = torch.bincount(last.clamp(min=0), weights=(last >= 0).float(), minlength=n + 1)
    suffix = hist.flip(0).cumsum(0).flip(0)  # suffix[k] = cells present among the dropped of top-k
    steps = torch.arange(n + 1, device=device)
    total = steps + suffix
    # total grows by 0 or 1 with k, so the largest k within the budget fills it exactly (where any k fits).
    k = torch.where(total <= budget, steps, torch.zeros_like(steps)).max()
    dropped = rank >= k
    big = torch.full((num_cells,), n, device=device, dtype=torch.long)
    best = big.scatter_reduce(0, cells, torch.where(dropped, rank, torch.full_like(rank, n)), "amin")
    present = best < n
    # With more cells than the budget leaves room for (only at k = 0), the cells of the most important tokens win.
    room = budget - k
    cell_order = torch.argsort(best, stable=True)
    allowed = torch.zeros(num_cells, dtype=torch.bool, device=device).scatter_(
        0, cell_order, torch.arange(num_cells, device=device) < room)
    present &= allowed
    slot = order[best.clamp(max=n - 1)]  # per cell, its most important dropped token
    # Absent cells point at some token too; counting (not scattering) keeps duplicate slots harmless.
    is_slot = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, slot, present.long()) > 0
    chosen = (rank < k) | is_slot
    keep = torch.argsort((~chosen).to(torch.int8), stable=True)[:budget]
    xf = features.float()
    ones = dropped.float()
    weights = importance.float().clamp(min=0) * ones if weighted else ones
    sums = torch.zeros(num_cells, channels, device=device).index_add_(0, cells, xf * weights[:, None])
    norm = torch.zeros(num_cells, device=device).index_add_(0, cells, weights)
    plain = torch.zeros(num_cells, channels, device=device).index_add_(0, cells, xf * ones[:, None])
    count = torch.zeros(num_cells, device=device).index_add_(0, cells, ones)
    means = torch.where(norm[:, None] > 0, sums / norm.clamp(min=1e-30)[:, None],
                        plain / count.clamp(min=1)[:, None])
    values = torch.where(is_slot[:, None], means[cells], xf)
    return keep, values[keep].to(features.dtype)


@register_pruner
class VFlowOptPruner(Pruner):
    config_cls = VFlowOptConfig
    paper = ("VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization "
             "(ICCV'25, arXiv 2508.05211)")
    status = "approximation"
    points = ("projector", "llm:K")
    flash_compatible = True
    needs_training = "calibration"
    needs = frozenset({"encoder_attention", "patch_pixels", "cls_attention"})
    official_defaults = {
        **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), QWEN),
        "*": {"positions": "renumber"},
    }

    def __init__(self, config: VFlowOptConfig) -> None:
        super().__init__(config)
        # Stage 1's importance per image of the running prefill, (sample, index_in_sample) -> (n,), read by the
        # in-LLM stages (the code's kept ViT map).
        self._importance: dict[tuple[int, int], Tensor] = {}
        self._warned = False

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers if self.config.layers is not None else default_layers(num_layers)
        if layers and layers[-1] >= num_layers:
            raise ValueError(
                f"vflowopt's layers={layers} name decoder layer {layers[-1]}, but the model has {num_layers} decoder "
                f"layers (0..{num_layers - 1}). Give layers below {num_layers}, or None for the code's 9 / 18 of 28 "
                "scaled to this depth."
            )
        return layers

    def plan(self, num_layers: int) -> list[Stage]:
        layers = self.stage_layers(num_layers)
        fractions = stage_fractions(self.config, layers, num_layers)
        points = [Point.parse("projector"), *(Point("llm", layer) for layer in layers)]
        return [Stage(point, fraction) for point, fraction in zip(points, fractions, strict=True)]

    def importance(self, image: ImageTokens) -> Tensor:
        """(n,) stage-1 importance of one image's tokens (module docstring, "Importance")."""
        config = self.config
        t = config.t if config.t is not None else released(config.keep)[0]
        if image.encoder_attention is not None:
            score = context_relevance(image.encoder_attention, t)
        elif image.cls_attention is not None:
            score = image.cls_attention.float()
        else:
            norms = image.features.float().norm(dim=-1)
            score = norms / norms.sum().clamp(min=1e-30)
        if config.alpha != 0:
            if image.patch_pixels is not None:
                entropy = patch_entropy(image.patch_pixels, config.pixel_mean, config.pixel_std)
                score = score + config.alpha * entropy.softmax(dim=0)
            elif not self._warned:
                self._warned = True
                logger.warning("vflowopt: this model family gives no patch pixels; the entropy term (alpha=%s) is "
                               "skipped.", config.alpha)
        return score

    def cell_side(self, image: ImageTokens) -> float:
        if self.config.a is not None:
            return float(self.config.a)
        cols = image.grid[1] if image.grid is not None else math.isqrt(image.num_tokens - 1) + 1
        return max(1.0, released(self.config.keep)[1] * cols / PAPER_SIDE)

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.point.kind == "projector":
            return self._select_first(ctx)
        keep = []
        for image in ctx.images:
            stored = self._importance.get((image.sample, image.index_in_sample))
            if stored is None or int(image.original_indices.max()) >= stored.numel():
                # Stage 1 left this image whole (it never ran): rank by feature norms at this layer instead.
                score = image.features.float().norm(dim=-1)
            else:
                score = stored[image.original_indices]
            keep.append(torch.argsort(score, descending=True, stable=True)[: image.budget])
        return Selection(keep=keep)

    def _select_first(self, ctx: PruneContext) -> Selection:
        self._importance = {}
        keep, values = [], []
        for image in ctx.images:
            score = self.importance(image)
            self._importance[(image.sample, image.index_in_sample)] = score
            n = image.num_tokens
            if image.budget >= n:
                keep.append(torch.arange(n, device=ctx.device))
                values.append(None)
            elif not self.config.recycle:
                keep.append(torch.argsort(score, descending=True, stable=True)[: image.budget])
                values.append(None)
            else:
                cells, num_cells = grid_cells(image, self.cell_side(image))
                kept, merged = recycle_select(image.features, score, cells, num_cells, image.budget,
                                              self.config.recycle_value == "weighted")
                keep.append(kept)
                values.append(merged)
        return Selection(keep=keep, values=values if any(v is not None for v in values) else None)


__all__ = ["VFlowOptConfig", "VFlowOptPruner", "context_relevance", "default_layers", "grid_cells",
           "patch_entropy", "recycle_select", "stage_fractions"]
