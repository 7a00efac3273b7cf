"""ATP (training-free): instance-wise thresholds on visual redundancy and text relevance, plus a spatial skeleton.

Paper: "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models" (Ye et al., CVPR 2025), arXiv
2412.00447; project page yxxxb.github.io/ATP-LLaVA-page. **No official code has been released**, so this file follows
the paper's description as reconstructed in shared/METHODS.md §3 (abstract, project page and secondary sources; the
paper's method section could not be read in full here) and its "Training-free approximation [vtprune]". It is
ATP-TF, never ATP-LLaVA: report it so.

The paper's ATP module, inserted between two decoder layers, scores each visual token by the attention it receives
from the other visual tokens (self-modality) and from the instruction (cross-modality), keeps the tokens whose score
passes a threshold predicted per instance and per module by a small MLP head (trained with a budget loss), and
always keeps a uniformly sampled spatial skeleton of the grid (Spatial Augmented Pruning, SAP), so that the number
of tokens kept differs per instance and per layer.

What runs here, at the input of each layer K of ``layers`` (the attention of layer K-1 through vtprune's probe):
1. scores, per image of n present tokens: S_self(j) = the mean head-mean attention token j receives from the image's
   other visual tokens that can see it (causally later ones; a token none can see gets the mean), S_cross(j) = the
   mean attention from the text tokens after the image (the prompt's last token where there is none). They are
   combined as METHODS.md reconstructs, S_r = z(S_self) + z(S_cross), z-scored over the image, except that the
   z-scores are taken of the logarithms (attention shares are heavy-tailed; see ``threshold``).
2. SAP anchors: ``anchors`` x the stage's expected count are a uniform sub-grid of the image's grid (the
   ``uniform`` lattice mapped to the nearest present tokens; an even stride where there is no grid), always kept
   and counted in the budget.
3. the other tokens: ``counts="threshold"`` (default, instance-wise) keeps every non-anchor token whose re-standardised
   S_r exceeds θ = Φ⁻¹(1 − ρ) + ``shift``, ρ being the share of the non-anchor tokens the stage should keep on
   average; under a Gaussian null for the standardised log scores the expected kept share is exactly the stage's
   target, while each instance keeps more or fewer depending on the shape of its scores. The stage's budget
   (``headroom`` x its target) is an upper bound, so the stages are adaptive and batch rows keep different counts.
   ``counts="fixed"`` keeps the anchors plus the top of S_r up to exactly the stage's target (METHODS.md's
   "fixed-budget" variant; deterministic counts).

Schedule (``plan``): ``layers`` None = METHODS.md's {2, 8, 16, 24} of a 32-layer LLM (the paper inserts ATP modules at
several decoder layers; its exact layers are unverified), scaled as round(l·L/32), clamped to 1..L-1, duplicates
removed (1, 2, 3 for L = 4; 1, 3, 6, 9 for L = 12). The stages' targets, as shares of each image's original tokens,
shrink geometrically by ``decay``: ``budget="input"``: keep, keep·decay, keep·decay², ...; ``budget="average"``: c,
c·decay, ... (capped at 1) with c solved by bisection so the mean over the L layers of the visual share is ``keep``
(METHODS.md §0.2); infeasible when keep <= l₁/L (a clear ValueError). Under ``counts="threshold"`` a stage's count
is a per-image random variable whose expectation follows the targets: stage m keeps on average ρ_m = t_m / t_{m-1} of
what the previous stage left, so the expected kept counts, and with them K_in and K̄, equal the ones of the targets.

Faithful to the paper (as far as it could be read): several pruning modules between decoder layers, self- and
cross-modality attention scores of the preceding layer combined into one score, instance- and layer-wise thresholds
(so counts differ per image and per layer), a spatial skeleton always kept, drops in prefill only, original
positions, text never dropped.

Differs:
- **Not implemented: the paper's learned threshold heads** (an MLP on the instance's score statistics predicting two
  sigmoid-bounded thresholds per module, trained with the LM loss plus a budget loss, soft masks in training and the
  LLM fine-tuned jointly). Here the threshold is the closed-form Gaussian-null rule above; ``shift`` is the offset a
  calibration (``vtprune.calibrate``, not yet written) would fit on unlabeled samples so that the dataset average
  matches ``keep`` on a real model; at ``shift=0`` the average matches only as far as the standardised log scores are
  Gaussian. ``needs_training="none"``.
- The paper keeps a token when S_r > θ_r OR S_s > θ_s with a learned spatial threshold; here the spatial skeleton's
  size is fixed by ``anchors`` (METHODS.md: 30-40% of the layer's budget) and the anchors are counted in the budget.
- The score normalisation (z-scores of logarithms, the causal count of S_self) and the geometric schedule are
  vtprune's; the paper's normalisation is unknown. The attention is layer K-1's (the probe); METHODS.md notes the
  paper's choice of layer is unverified.
- One score, anchor set and threshold per image (per video, per InternVL tile group); the paper handles one image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import torch
from torch import Tensor

from vtprune.budget import scale_to_average
from vtprune.config import PrunerConfig, layer_tuple, scaled_layers
from vtprune.point import Point
from vtprune.pruners.base import Pruner
from vtprune.pruners.uniform import spread_all
from vtprune.registry import register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection, Stage

PAPER_LAYERS = (2, 8, 16, 24)  # of a 32-layer LLM: METHODS.md §3's training-free insertion layers [vtprune]
PAPER_DEPTH = 32
COUNTS = ("threshold", "fixed")
# Attention shares are positive; the floor only guards the logarithm against an fp32 underflow to 0.
TINY = 1e-12


@dataclass(frozen=True)
class ATPConfig(PrunerConfig):
    """Attributes:
    layers: decoder layers at whose input an ATP module drops, strictly increasing, each >= 1 (scored with the
        attention of the layer before) and < L. None = {2, 8, 16, 24} of 32 scaled to the model's depth L
        (round(l·L/32), clamped to 1..L-1, duplicates removed).
    decay: ratio of each stage's target to the previous one's (shares of the original tokens), in (0, 1].
        ``budget="input"``: keep, keep·decay, ...; ``budget="average"``: the same shape scaled to average ``keep``.
    counts: "threshold" (default): instance-wise thresholds, counts differ per image and average the stage's target;
        "fixed": exactly the stage's target per image (anchors + top scores).
    anchors: share of each stage's expected count given to the spatial skeleton (SAP), kept whatever the scores, in
        [0, 1] (0 = no skeleton).
    headroom: ``counts="threshold"`` only: a stage's budget, the most an image may keep there, is headroom x the
        stage's target (capped at every token); >= 1. The cap trims the instances above it, so a larger headroom
        biases the average less.
    shift: ``counts="threshold"`` only: offset added to the Gaussian-null threshold Φ⁻¹(1 − ρ) of the standardised
        scores; > 0 keeps fewer on average, < 0 more. 0 = the uncalibrated rule.
    """

    method = "atp"
    # headroom and shift tune the thresholds of counts="threshold" (the default); a "fixed" config refuses them.
    search_space: ClassVar[dict[str, tuple]] = {
        "decay": ("float", 0.3, 1.0),
        "anchors": ("float", 0.0, 0.7),
        "headroom": ("float", 1.0, 3.0),
        "shift": ("float", -1.0, 1.0),
    }
    layers: tuple[int, ...] | None = None
    decay: float = 0.5
    counts: str = "threshold"
    anchors: float = 0.35
    headroom: float = 1.5
    shift: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", layer_tuple(
            self.layers, 1, "atp scores the tokens with the attention of the layer before each module",
            "(2, 8, 16, 24)"))
        for name in ("decay", "anchors", "headroom", "shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(
                f"decay={self.decay} is outside (0, 1]: it is the ratio of each ATP stage's target to the previous "
                "one's (0.5 halves the visual tokens from one module to the next)."
            )
        if self.counts not in COUNTS:
            raise ValueError(f"counts={self.counts!r} is not one of {list(COUNTS)}.")
        if not 0.0 <= self.anchors <= 1.0:
            raise ValueError(
                f"anchors={self.anchors} is outside [0, 1]: it is the share of each stage's count kept as the "
                "spatial skeleton (METHODS.md suggests 0.3-0.4)."
            )
        if self.headroom < 1.0:
            raise ValueError(
                f"headroom={self.headroom} must be >= 1: a stage's budget is headroom x its target, and a budget "
                "below the target could not be met on average."
            )
        if self.counts == "fixed":
            for name, default in (("headroom", 1.5), ("shift", 0.0)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name} sets the instance-wise thresholds; it needs counts='threshold' "
                        f"(got counts='fixed')."
                    )


def default_layers(num_layers: int) -> tuple[int, ...]:
    """{2, 8, 16, 24} of 32 scaled to ``num_layers`` decoder layers, each in 1..L-1."""
    if num_layers < 2:
        raise ValueError(
            f"atp needs an LLM of at least 2 decoder layers (a module at layer >= 1 scored by the layer before it); "
            f"this one has {num_layers}."
        )
    return scaled_layers(PAPER_LAYERS, num_layers, low=1, high=num_layers - 1, paper_depth=PAPER_DEPTH)


def stage_targets(keep: float, budget: str, decay: float, layers: tuple[int, ...], num_layers: int) -> list[float]:
    """Share of each image's original tokens each stage keeps (on average, under ``counts="threshold"``)."""
    shape = [decay**m for m in range(len(layers))]
    if budget == "input":
        return [keep * s for s in shape]
    floor = layers[0] / num_layers
    if keep <= floor:
        raise ValueError(
            f"keep={keep} under budget='average' cannot be met with the first atp module at layer {layers[0]} of "
            f"{num_layers}: the layers before it alone use {floor:.3f} of the full budget. Raise keep, give an "
            "earlier first module (layers=, e.g. starting at 1), or use budget='input'."
        )
    return scale_to_average(shape, keep, layers, num_layers)


def standardise(x: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / std over the entries of ``mask`` (population std; 0 where the entries are constant)."""
    count = mask.sum().clamp(min=1).to(x.dtype)
    mean = (x * mask).sum() / count
    var = (((x - mean) * mask) ** 2).sum() / count
    return (x - mean) / var.sqrt().clamp(min=1e-6)


def threshold(share: float, shift: float) -> float:
    """θ on standardised scores whose exceedance probability under a standard normal is ``share`` (plus ``shift``);
    ±inf at the ends, so that share 0 keeps none and share 1 keeps all."""
    if share <= 0.0:
        return float("inf")
    if share >= 1.0:
        return float("-inf")
    return NormalDist().inv_cdf(1.0 - share) + shift


@register_pruner
class ATPPruner(Pruner):
    config_cls = ATPConfig
    paper = "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models (CVPR'25, arXiv 2412.00447)"
    status = "approximation"
    points = ("llm:K",)
    flash_compatible = True
    needs_training = "none"

    def layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers if self.config.layers is not None else default_layers(num_layers)
        if layers[-1] >= num_layers:
            raise ValueError(
                f"atp's layers={layers} name decoder layer {layers[-1]}, but the model has {num_layers} decoder "
                f"layers (0..{num_layers - 1}). Give layers below {num_layers}, or None for the default modules "
                "scaled to this depth."
            )
        return layers

    def targets(self, num_layers: int) -> dict[int, tuple[float, float]]:
        """Layer -> (share of the original tokens the stage keeps on average, ρ: share of the tokens present before
        it that it keeps on average)."""
        layers = self.layers(num_layers)
        config = self.config
        shares = stage_targets(config.keep, config.budget, config.decay, layers, num_layers)
        previous = [1.0, *shares[:-1]]
        return {layer: (share, share / before)
                for layer, share, before in zip(layers, shares, previous, strict=True)}

    def plan(self, num_layers: int) -> list[Stage]:
        adaptive = self.config.counts == "threshold"
        stages = []
        for layer, (share, _) in self.targets(num_layers).items():
            cap = min(1.0, share * self.config.headroom) if adaptive else share
            stages.append(Stage(Point("llm", layer), cap, adaptive))
        return stages

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.attention_rows is None or ctx.attention_mask is None or ctx.text_mask is None:
            raise RuntimeError("atp needs the attention rows of layer K-1 from the engine (an 'llm:K' stage, K >= 1).")
        _, ratio = self.targets(ctx.num_layers)[ctx.layer]
        scores = redundancy_scores(ctx)
        adaptive = self.config.counts == "threshold"
        # Expected count per image: ρ of its present tokens (threshold) or exactly the stage budget (fixed).
        wanted = [min(image.budget, round(ratio * image.num_tokens)) if adaptive else image.budget
                  for image in ctx.images]
        anchor_counts = [min(w, round(self.config.anchors * w)) for w in wanted]
        anchors = spatial_anchors(ctx.images, anchor_counts, ctx.device)
        orders, passed = [], []
        for image, score, anchor, a, w in zip(ctx.images, scores, anchors, anchor_counts, wanted, strict=True):
            is_anchor = torch.zeros(image.num_tokens, dtype=torch.bool, device=score.device)
            is_anchor[anchor] = True
            rest = ~is_anchor
            z = standardise(score, rest)
            # Anchors first (score +inf), then the other tokens by standardised score, ties to the earlier token.
            orders.append(torch.argsort(z.masked_fill(is_anchor, float("inf")), descending=True, stable=True))
            if adaptive:
                others = image.num_tokens - a
                share = (w - a) / others if others > 0 else 0.0
                passing = ((z > threshold(share, self.config.shift)) & rest).sum()
                passed.append(a + passing.clamp(max=image.budget - a))
        # Threshold counts are data-dependent: one device-to-host copy for all images.
        totals = torch.stack(passed).tolist() if adaptive else wanted
        return Selection(keep=[order[:total] for order, total in zip(orders, totals, strict=True)])


def spatial_anchors(images: list[ImageTokens], counts: list[int], device: torch.device) -> list[Tensor]:
    """Per image, ``counts[j]`` indices into its present tokens on a uniform sub-grid of its original grid (SAP's
    skeleton; an even stride along the tokens where there is no grid)."""
    wanted = [j for j, count in enumerate(counts) if count > 0]
    spread = spread_all([dataclasses.replace(images[j], budget=counts[j]) for j in wanted], device)
    out = [torch.zeros(0, dtype=torch.long, device=device) for _ in images]
    for j, indices in zip(wanted, spread, strict=True):
        out[j] = indices
    return out


def redundancy_scores(ctx: PruneContext) -> list[Tensor]:
    """Per image, (n,) fp32 S_r = z(log S_self) + z(log S_cross) of its present tokens (see the module docstring),
    from one probe call whose queries are, per sample, its visual and text tokens from its first visual token on."""
    mask, text = ctx.attention_mask.bool(), ctx.text_mask
    batch, length = mask.shape
    device = mask.device
    index = torch.arange(length, device=device)
    visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
    first = torch.full((batch,), length, dtype=torch.long, device=device)
    for image in ctx.images:
        visual[image.sample, image.positions] = True
        first[image.sample] = torch.minimum(first[image.sample], image.positions.min())
    queries = (visual | text) & mask & (index[None, :] >= first[:, None])
    counts = queries.sum(dim=1)
    width = max(1, int(counts.max()))  # one sync: the padded query count
    order = torch.argsort((~queries).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, W) query positions
    valid = torch.arange(width, device=device)[None, :] < counts[:, None]
    slot = torch.zeros(batch, length, dtype=torch.long, device=device)
    slot.scatter_(1, order, torch.arange(width, device=device).expand(batch, -1).contiguous())
    rows = ctx.attention_rows(order).float() * valid[..., None]  # (B, W, L)
    scores = []
    for image in ctx.images:
        b, positions = image.sample, image.positions
        block = rows[b, slot[b, positions]][:, positions]  # (n, n): query i -> key j
        sees = positions[:, None] > positions[None, :]  # causal: only later tokens attend to j
        seen_by = sees.sum(dim=0)
        self_score = (block * sees).sum(dim=0) / seen_by.clamp(min=1)
        log_self = torch.log(self_score.clamp(min=TINY))
        has_raters = seen_by > 0
        # A token no other visual token can see (the image's last) gets the mean: neither kept nor dropped for it.
        fill = (log_self * has_raters).sum() / has_raters.sum().clamp(min=1)
        log_self = torch.where(has_raters, log_self, fill)
        query_positions = order[b]
        raters = valid[b] & text[b, query_positions] & (query_positions > positions.max())
        # No text after the image: the prompt's last token (the last row, padding sits on the left) rates alone.
        raters = torch.where(raters.any(), raters, valid[b] & (query_positions == length - 1))
        cross = (rows[b][:, positions] * raters[:, None]).sum(dim=0) / raters.sum().clamp(min=1)
        log_cross = torch.log(cross.clamp(min=TINY))
        every = torch.ones_like(has_raters)
        scores.append(standardise(log_self, every) + standardise(log_cross, every))
    return scores


__all__ = ["ATPConfig", "ATPPruner", "default_layers", "redundancy_scores", "spatial_anchors", "stage_targets",
           "threshold"]
