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
- **Thresholds.** Without ``heads`` (ATP-TF, the default) the threshold is the closed-form Gaussian-null rule above;
  ``shift`` is the offset ``vtprune.calibrate`` fits on unlabeled samples; at ``shift=0`` the average matches
  ``keep`` only as far as the standardised log scores are Gaussian. With ``heads`` (trained by
  ``vtprune.train(model, "atp", data, config)``, ``SoftATP``) each module's head, a small MLP on pooled statistics
  of the instance's scores (``head_features``), adds an instance-wise offset in (-2, 2) to that rule: the paper's
  learned threshold heads, trained as the paper does with soft masks σ((S − θ)·T) applied to the attention and the
  LM loss plus a budget loss. What differs from the paper's training: the LLM stays frozen (its ATP-only variant,
  which it reports "still performs well"; the main setting fine-tunes the LLM jointly), one threshold per module
  (no learned spatial threshold, see below), the head predicts an offset to the training-free rule (zero-initialised,
  so an untrained head is ATP-TF), the budget loss is the squared relative deviation of each module's soft kept share
  from its target (the paper's exact weighting is unknown), the soft scores of a later module are standardised over
  the tokens weighted by their soft survival (inference standardises over the hard survivors), and the headroom cap
  applies only to the hard drops. ``needs_training="none"``: the heads are optional.
- The paper keeps a token when S_r > θ_r OR S_s > θ_s with a learned spatial threshold; here the spatial skeleton's
  size is fixed by ``anchors`` (METHODS.md: 30-40% of the layer's budget) and the anchors are counted in the budget.
- The score normalisation (z-scores of logarithms, the causal count of S_self) and the geometric schedule are
  vtprune's; the paper's normalisation is unknown. The attention is layer K-1's (the probe); METHODS.md notes the
  paper's choice of layer is unverified.
- One score, anchor set and threshold per image (per video, per InternVL tile group); the paper handles one image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.budget import geometric_shares
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
HEAD_FEATURES = 6
HEAD_HIDDEN = 16
HEAD_SIZE = HEAD_FEATURES * HEAD_HIDDEN + HEAD_HIDDEN + HEAD_HIDDEN + 1
HEAD_RANGE = 2.0  # the largest offset a head adds to the training-free threshold, in standard deviations


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
    heads: learned threshold heads, one flat weight tuple per module (``ThresholdHead``), written by
        ``vtprune.train(model, "atp", ...)``; each adds an instance-wise offset, in (-2, 2), to the rule above.
        None = training-free (ATP-TF).
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
    heads: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads is not None:
            if isinstance(self.heads, (str, bytes)) or not isinstance(self.heads, (list, tuple)) or not self.heads:
                raise ValueError(
                    "heads must be None (the training-free thresholds) or one flat weight list per ATP module, as "
                    "vtprune.train(model, 'atp', ...) writes them into result.method_config."
                )
            heads = []
            for j, flat in enumerate(self.heads):
                if (not isinstance(flat, (list, tuple)) or len(flat) != HEAD_SIZE
                        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                               for v in flat)):
                    raise ValueError(
                        f"heads[{j}] must hold {HEAD_SIZE} finite numbers (the weights of one threshold head); "
                        "this config was not written by vtprune.train or was edited."
                    )
                heads.append(tuple(float(v) for v in flat))
            object.__setattr__(self, "heads", tuple(heads))
            if self.counts != "threshold":
                raise ValueError("heads predict the instance-wise thresholds; they need counts='threshold'.")
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
    return geometric_shares(
        keep, budget, decay, layers, num_layers,
        f"keep={keep} under budget='average' cannot be met with the first atp module at layer {layers[0]} of "
        f"{num_layers}: the layers before it alone use "
        "{floor:.3f} of the full budget. Raise keep, give an earlier first module (layers=, e.g. starting at 1), "
        "or use budget='input'.")


def standardise(x: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / std over the entries of ``mask`` (population std; 0 where the entries are constant); a float
    ``mask`` weighs the entries (weighted mean and variance)."""
    count = mask.sum().clamp(min=1e-6).to(x.dtype)
    mean = (x * mask).sum() / count
    var = ((x - mean) ** 2 * mask).sum() / count
    return (x - mean) / var.sqrt().clamp(min=1e-6)


def weighted_std(x: Tensor, weight: Tensor) -> Tensor:
    count = weight.sum().clamp(min=1e-6)
    mean = (x * weight).sum() / count
    return (((x - mean) ** 2 * weight).sum() / count).sqrt()


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
        heads = self.config.heads
        if heads is not None and len(heads) != len(self.layers(num_layers)):
            raise ValueError(
                f"This atp config carries {len(heads)} learned threshold heads, but its modules on this model sit at "
                f"layers {self.layers(num_layers)} ({len(self.layers(num_layers))} modules). Use the config on the "
                "model it was trained on, or train heads for this one with vtprune.train(model, 'atp', ...)."
            )
        stages = []
        for layer, (share, _) in self.targets(num_layers).items():
            cap = min(1.0, share * self.config.headroom) if adaptive else share
            stages.append(Stage(Point("llm", layer), cap, adaptive))
        return stages

    def head(self, layer: int, num_layers: int, device: torch.device) -> ThresholdHead | None:
        """The learned threshold head of the module at ``layer``, or None (the training-free rule)."""
        if self.config.heads is None:
            return None
        cache = self.__dict__.setdefault("_heads", {})
        if (layer, device) not in cache:
            flat = self.config.heads[self.layers(num_layers).index(layer)]
            cache[(layer, device)] = ThresholdHead.from_flat(flat).to(device)
        return cache[(layer, device)]

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.attention_rows is None or ctx.attention_mask is None or ctx.text_mask is None:
            raise RuntimeError("atp needs the attention rows of layer K-1 from the engine (an 'llm:K' stage, K >= 1).")
        _, ratio = self.targets(ctx.num_layers)[ctx.layer]
        scores = redundancy_scores(ctx, spreads=self.config.heads is not None)
        adaptive = self.config.counts == "threshold"
        head = self.head(ctx.layer, ctx.num_layers, ctx.device)
        # Expected count per image: ρ of its present tokens (threshold) or exactly the stage budget (fixed).
        wanted = [min(image.budget, round(ratio * image.num_tokens)) if adaptive else image.budget
                  for image in ctx.images]
        anchor_counts = [min(w, round(self.config.anchors * w)) for w in wanted]
        anchors = spatial_anchors(ctx.images, anchor_counts, ctx.device)
        orders, passed = [], []
        for image, (score, spread), anchor, a, w in zip(ctx.images, scores, anchors, anchor_counts, wanted,
                                                         strict=True):
            is_anchor = torch.zeros(image.num_tokens, dtype=torch.bool, device=score.device)
            is_anchor[anchor] = True
            rest = ~is_anchor
            z = standardise(score, rest)
            # Anchors first (score +inf), then the other tokens by standardised score, ties to the earlier token.
            orders.append(torch.argsort(z.masked_fill(is_anchor, float("inf")), descending=True, stable=True))
            if adaptive:
                others = image.num_tokens - a
                share = (w - a) / others if others > 0 else 0.0
                theta = threshold(share, self.config.shift)
                if head is not None and math.isfinite(theta):
                    theta = theta + head(head_features(z, rest.float(), theta, spread))
                passing = ((z > theta) & rest).sum()
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


def probe_queries(visual: Tensor, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The probe's queries: per sample its visual and text tokens from its first visual token on. Returns order
    (B, W) their positions (padded), valid (B, W) and slot (B, L): a position's column in ``order``."""
    batch, length = mask.shape
    device = mask.device
    index = torch.arange(length, device=device)
    has_visual = visual.any(dim=1)
    first = torch.where(has_visual, torch.argmax(visual.to(torch.int8), dim=1), length)
    queries = (visual | text) & mask & (index[None, :] >= first[:, None])
    counts = queries.sum(dim=1)
    width = max(1, int(counts.max()))  # one sync: the padded query count
    order = torch.argsort((~queries).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, W) query positions
    valid = torch.arange(width, device=device)[None, :] < counts[:, None]
    slot = torch.zeros(batch, length, dtype=torch.long, device=device)
    slot.scatter_(1, order, torch.arange(width, device=device).expand(batch, -1).contiguous())
    return order, valid, slot


def log_scores(rows: Tensor, order: Tensor, valid: Tensor, slot: Tensor, text: Tensor, positions: Tensor,
               length: int) -> tuple[Tensor, Tensor]:
    """One sample's (W, L) probe rows -> (log S_self, log S_cross) of the image at ``positions`` (see the module
    docstring), each (n,) fp32."""
    block = rows[slot[positions]][:, positions]  # (n, n): query i -> key j
    sees = positions[:, None] > positions[None, :]  # causal: only later tokens attend to j
    seen_by = sees.sum(dim=0)
    self_score = (block * sees).sum(dim=0) / seen_by.clamp(min=1)
    log_self = torch.log(self_score.clamp(min=TINY))
    has_raters = seen_by > 0
    # A token no other visual token can see (the image's last) gets the mean: neither kept nor dropped for it.
    fill = (log_self * has_raters).sum() / has_raters.sum().clamp(min=1)
    log_self = torch.where(has_raters, log_self, fill)
    raters = valid & text[order] & (order > positions.max())
    # No text after the image: the prompt's last token (the last row, padding sits on the left) rates alone.
    raters = torch.where(raters.any(), raters, valid & (order == length - 1))
    cross = (rows[:, positions] * raters[:, None]).sum(dim=0) / raters.sum().clamp(min=1)
    return log_self, torch.log(cross.clamp(min=TINY))


def combine(log_self: Tensor, log_cross: Tensor, weight: Tensor, spreads: bool = True
            ) -> tuple[Tensor, Tensor | None]:
    """S_r = z(log S_self) + z(log S_cross), z over ``weight`` (1 over the present tokens at inference, the soft
    survival of the tokens in training), and the (2,) spreads (weighted std) of the two log scores (None unless
    ``spreads``: only the learned heads read them)."""
    spread = torch.stack([weighted_std(log_self, weight), weighted_std(log_cross, weight)]) if spreads else None
    return standardise(log_self, weight) + standardise(log_cross, weight), spread


def redundancy_scores(ctx: PruneContext, spreads: bool = False) -> list[tuple[Tensor, Tensor | None]]:
    """Per image, ((n,) fp32 S_r of its present tokens, (2,) spreads of its log scores or None unless ``spreads``),
    from one probe call whose queries are, per sample, its visual and text tokens from its first visual token on."""
    mask, text = ctx.attention_mask.bool(), ctx.text_mask
    batch, length = mask.shape
    visual = torch.zeros(batch, length, dtype=torch.bool, device=mask.device)
    for image in ctx.images:
        visual[image.sample, image.positions] = True
    order, valid, slot = probe_queries(visual, text, mask)
    rows = ctx.attention_rows(order).float() * valid[..., None]  # (B, W, L)
    out = []
    for image in ctx.images:
        b = image.sample
        log_self, log_cross = log_scores(rows[b], order[b], valid[b], slot[b], text[b], image.positions, length)
        out.append(combine(log_self, log_cross, torch.ones_like(log_self), spreads))
    return out


# ------------------------------------------------------------------------------------------ learned threshold heads
class ThresholdHead(nn.Module):
    """The paper's threshold head, one per ATP module: a small MLP on pooled statistics of the instance's scores
    (``head_features``) that predicts its threshold. Here it predicts an offset, HEAD_RANGE·tanh(·), added to the
    training-free threshold; the last layer starts at zero, so an untrained head is ATP-TF exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(HEAD_FEATURES, HEAD_HIDDEN)
        self.out = nn.Linear(HEAD_HIDDEN, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor) -> Tensor:
        """(..., HEAD_FEATURES) -> (...) offset of the threshold, in standard deviations of the scores."""
        return HEAD_RANGE * torch.tanh(self.out(torch.nn.functional.gelu(self.hidden(features))).squeeze(-1))

    def flat(self) -> tuple[float, ...]:
        return tuple(torch.cat([p.detach().float().flatten().cpu() for p in self.parameters()]).tolist())

    @classmethod
    def from_flat(cls, flat: tuple[float, ...]) -> ThresholdHead:
        head = cls()
        values = torch.tensor(flat, dtype=torch.float32)
        offset = 0
        with torch.no_grad():
            for param in head.parameters():
                param.copy_(values[offset:offset + param.numel()].view_as(param))
                offset += param.numel()
        return head.requires_grad_(False)


def head_features(z: Tensor, weight: Tensor, theta: float, spread: Tensor) -> Tensor:
    """(HEAD_FEATURES,) fp32 statistics of one instance's standardised scores ``z`` over ``weight`` (its non-anchor
    tokens; their soft survival in training): the training-free threshold, the skewness and excess kurtosis of z,
    the share above the threshold, and the spreads of the two log scores."""
    count = weight.sum().clamp(min=1e-6)
    moment = lambda k: (z**k * weight).sum() / count  # noqa: E731 - a local shorthand
    above = ((z > theta).float() * weight).sum() / count
    stats = torch.stack([torch.as_tensor(theta, dtype=torch.float32, device=z.device), moment(3), moment(4) - 3.0,
                         above, spread[0], spread[1]])
    return stats.float().detach()


class SoftATP:
    """ATP in training mode on an unwrapped model (the paper: soft masks in training, hard drops at inference).

    At the input of each module's layer K it scores the visual tokens from layer K-1's attention (the same probe and
    scores as the pruner, over all tokens, standardised with each token weighted by its soft survival so far), and
    turns the head's threshold into a soft mask m = σ((z − θ)·temperature), anchors at 1. The product of the masks
    so far enters the attention of every layer from K on as a key bias log(m), so the LM loss reaches the heads; no
    token is dropped. ``budget_loss()`` is the mean over modules of ((kept share − target) / target)², the kept share
    being the mean soft survival of an image's tokens, the target the stage's expected share of the original tokens.
    Differs from the paper: the LLM is frozen (its ATP-only variant), one threshold per module (the spatial
    skeleton's size is fixed by ``anchors``), scores from attention without the soft bias of earlier modules, every
    visual token of a sample is one image, full-attention layers only.
    """

    def __init__(self, model: nn.Module, config: ATPConfig, visual_ids: Tensor, heads: nn.ModuleList,
                 temperature: float, make_probe: Any) -> None:
        # make_probe: the engine's ``vtprune.engine.probe.make_probe``, passed in by ``vtprune.train`` (a pruner
        # never imports the engine).
        self._make_probe = make_probe
        language_model = model.model.language_model
        self.layers = language_model.layers
        types = getattr(getattr(language_model, "config", None), "layer_types", None)
        if types and any(kind != "full_attention" for kind in types):
            raise ValueError(
                "ATP head training supports full-attention LLMs only; this one has sliding-window layers."
            )
        self.pruner = ATPPruner(config)
        num_layers = len(self.layers)
        self.targets = self.pruner.targets(num_layers)
        self.modules = list(self.targets)
        if len(heads) != len(self.modules):
            raise ValueError(f"{len(heads)} heads for {len(self.modules)} ATP modules at layers {self.modules}.")
        self.heads = heads
        self.temperature = temperature
        self.visual_ids = visual_ids
        self.inputs: dict[int, tuple] = {}
        self.terms: list[Tensor] = []
        self.kept: list[Tensor] = []
        self.survival: Tensor | None = None
        self.bias: Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self._on_top, with_kwargs=True)]
        for layer in self.modules:
            attn = self.layers[layer - 1].self_attn
            self.handles.append(attn.register_forward_pre_hook(self._capture(layer - 1), with_kwargs=True))
        for layer in range(self.modules[0], num_layers):
            self.handles.append(self.layers[layer].register_forward_pre_hook(self._on_layer(layer), with_kwargs=True))

    @staticmethod
    def new_heads(model: nn.Module, config: ATPConfig) -> nn.ModuleList:
        """One trainable head per module of ``config`` on ``model``, from the config's heads where it has them
        (zero-output heads, i.e. ATP-TF, otherwise)."""
        modules = ATPPruner(config).layers(len(model.model.language_model.layers))
        if config.heads is not None:
            if len(config.heads) != len(modules):
                raise ValueError(f"{len(config.heads)} heads in the config for {len(modules)} ATP modules.")
            return nn.ModuleList(ThresholdHead.from_flat(flat).requires_grad_(True) for flat in config.heads)
        return nn.ModuleList(ThresholdHead() for _ in modules)

    @staticmethod
    def export(heads: nn.ModuleList, config: ATPConfig) -> ATPConfig:
        """``config`` with the trained ``heads``."""
        return config.replace(heads=[list(head.flat()) for head in heads])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def budget_loss(self) -> Tensor:
        return torch.stack(self.terms).mean()

    def kept_shares(self) -> list[float]:
        """Mean soft survival of the visual tokens after each module, in the last forward."""
        return [float(k) for k in self.kept]

    def _on_top(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("ATP head training needs input_ids in every batch.")
        mask = kwargs.get("attention_mask")
        self.mask2d = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        self.visual = torch.isin(input_ids, self.visual_ids.to(input_ids.device)) & self.mask2d
        self.inputs, self.terms, self.kept, self.survival, self.bias = {}, [], [], None, None

    def _capture(self, layer: int):
        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[layer] = (hidden, kwargs["position_embeddings"], None)

        return capture

    def _on_layer(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer in self.targets:
                self._module(layer)
            dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
                else hidden.dtype
            kwargs["attention_mask"] = self._attention_bias().to(dtype)
            return args, kwargs

        return hook

    def _attention_bias(self) -> Tensor:
        """(B, 1, L, L) additive mask: causal and padding as the model's own, the diagonal always visible (no row is
        empty), plus log(soft survival) on the visual keys."""
        mask = self.mask2d
        length = mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        allowed = (causal[None] & mask[:, None, :]) | torch.eye(length, dtype=torch.bool, device=mask.device)[None]
        base = torch.zeros(allowed.shape, device=mask.device).masked_fill(~allowed, float("-inf"))
        return (base + self.bias[:, None, :])[:, None]

    def _module(self, layer: int) -> None:
        share_target, ratio = self.targets[layer]
        head = self.heads[self.modules.index(layer)]
        mask, visual = self.mask2d, self.visual
        text = mask & ~visual
        batch, length = mask.shape
        order, valid, slot = probe_queries(visual, text, mask)
        hidden = self.inputs[layer - 1]
        rows_of = self._make_probe(self.layers[layer - 1].self_attn, layer - 1, hidden, mask.long())
        with torch.no_grad():
            rows = rows_of(order).float() * valid[..., None]
        survival = torch.ones(batch, length, device=mask.device) if self.survival is None else self.survival
        updated = survival.clone()
        for b in range(batch):
            positions = visual[b].nonzero().squeeze(1)
            n = positions.numel()
            if n == 0:
                continue
            log_self, log_cross = log_scores(rows[b], order[b], valid[b], slot[b], text[b], positions, length)
            before = survival[b, positions].detach()
            score, spread = combine(log_self, log_cross, before)
            present = float(before.sum())
            wanted = min(n, round(ratio * present))
            a = min(wanted, round(self.pruner.config.anchors * wanted))
            side = math.isqrt(n)
            grid = (side, side) if side * side == n else None
            image = ImageTokens(sample=b, index_in_sample=0, grid=grid, positions=positions, features=None, budget=a,
                                original_indices=torch.arange(n, device=mask.device))
            is_anchor = torch.zeros(n, dtype=torch.bool, device=mask.device)
            if a > 0:
                is_anchor[spatial_anchors([image], [a], mask.device)[0]] = True
            weight = before * (~is_anchor)
            z = standardise(score, weight)
            others = float(weight.sum())
            share = min(1.0, max(0.0, (wanted - a) / others)) if others > 0 else 0.0
            theta = threshold(share, self.pruner.config.shift)
            if not math.isfinite(theta):
                soft = torch.full_like(z, 1.0 if theta < 0 else 0.0)
            else:
                theta = theta + head(head_features(z, weight, theta, spread))
                soft = torch.sigmoid((z - theta) * self.temperature)
            soft = torch.where(is_anchor, torch.ones_like(soft), soft)
            updated[b, positions] = survival[b, positions] * soft
        self.survival = updated
        shares = torch.stack([updated[b][visual[b]].mean() for b in range(batch) if visual[b].any()])
        self.terms.append(((shares - share_target) / share_target).pow(2).mean())
        self.kept.append(shares.mean().detach())
        bias = torch.zeros(batch, length, device=mask.device)
        self.bias = torch.where(visual, torch.log(updated.clamp(min=1e-6)), bias)


ATPPruner.soft_trainer = SoftATP  # vtprune.train's hook for methods with learned heads

__all__ = ["ATPConfig", "ATPPruner", "SoftATP", "ThresholdHead", "default_layers", "head_features",
           "redundancy_scores", "spatial_anchors", "stage_targets", "threshold"]
