"""ADSC: uniform down-sampling of the visual tokens at a few LLM layers (arXiv 2602.12618).

Paper: "Vision Token Reduction via Attention-Driven Self-Compression for Efficient Multimodal Large Language Models"
(Deniz et al., 2026). No official code was found; re-implemented from the abstract and shared/METHODS.md §4. The
method has no scores: at each selected decoder layer ("bottleneck") it keeps a regular subset of the visual tokens
still present and drops the rest, relying on the earlier layers to have moved the information into the survivors
and the text. Its accuracy claim is for a model fine-tuned with the down-sampling active (LoRA, a reverse curriculum
over pruning ratios): ``vtprune.train(model, method="adsc", ...)`` runs that recipe.

Schedule (``plan``): bottlenecks at ``layers`` (default: the paper-style 2, 8, 16, 24 of a 32-layer LLM, scaled to
the model's depth, the first at layer ≥ 1, deduplicated; 1, 2, 3 for 4 layers, 1, 3, 6, 9 for 12). Each bottleneck
keeps the same fraction ρ of the tokens present before it, so the visual tokens entering the layers are
    n (layers < l₁),  ρ n (l₁ ≤ layer < l₂),  ρ² n, ...
``budget="average"``: ρ is solved (bisection) so that the mean over the L layers is ``keep`` —
K̄/n = (l₁ + Σ_m ρ^m (l_{m+1} − l_m)) / L. ``budget="input"``: the first bottleneck keeps ``keep`` and each later one
``ratio`` of what is left: 0.65 by default, so that with every bottleneck keeping 0.65 the 2/8/16/24-of-32 schedule
averages 40% of the visual tokens over the layers — the share the paper's −53.7% FLOPs and −56.7% peak KV imply
(35–40%; the full text with its ratios was not retrievable, only the abstract and these figures). METHODS.md's 0.5
averages 27%.

Selection at a bottleneck: a cell-centred lattice with the budget's count on the image's original token grid (the
``uniform`` baseline's lattice), each lattice point taking the nearest token still present (distinct tokens,
vectorised on the device: every token goes to its nearest lattice point, every lattice point keeps its closest token,
and lattice points whose cell is empty are filled by the present tokens farthest from the chosen ones).
``stride="1d"`` keeps an even stride along the token order instead. Images without a grid use the 1-D stride.

Faithful: uniform, score-free down-sampling inside the LLM at several layers, original positions kept, attention
untouched (any backend), the LoRA recovery fine-tune with a curriculum over keep ratios (``vtprune.train``).

Differs / unverified (the paper's text with these details was not retrievable, METHODS.md §4):
- the bottleneck layers, the per-bottleneck ratio and the stride geometry are the METHODS.md parametric defaults,
  not the paper's values; the curriculum's order and schedule are our reading of "reverse curriculum" (strongest
  compression first); LoRA rank and steps are ours.
- LLaVA-NeXT row newlines are never dropped (vtprune keeps layout tokens); each image / tile group / video is
  down-sampled on its own with the same ρ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.budget import kept_count, size_plan, solve_ratio
from vtprune.config import PrunerConfig, layer_tuple, scaled_layers
from vtprune.point import Point
from vtprune.pruners.base import Pruner
from vtprune.pruners.uniform import spread_all
from vtprune.registry import register_pruner
from vtprune.state import PruneContext, Selection, Stage

PAPER_LAYERS = (2, 8, 16, 24)  # of a 32-layer LLM (METHODS.md §4 parametric default)
STRIDES = ("2d", "1d")


@dataclass(frozen=True)
class ADSCConfig(PrunerConfig):
    """Attributes:
    layers: decoder layers at whose input the visual tokens are down-sampled, strictly increasing, in 0..L-1.
        None = (2, 8, 16, 24) scaled to the model's depth L (round(l·L/32), duplicates removed).
    ratio: fraction of the present tokens each bottleneck after the first keeps, under ``budget="input"``
        (None = 0.65, see the module docstring). Under ``budget="average"`` ρ is solved from ``keep``; leave it None.
    stride: "2d" (a regular lattice on the image's token grid, recommended) or "1d" (every s-th token in order).
    """

    method = "adsc"
    layers: tuple[int, ...] | None = None
    ratio: float | None = None
    stride: str = "2d"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", layer_tuple(
            self.layers, 0, "decoder layers are numbered from 0", "(2, 8, 16, 24)"))
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ratio must be a number or None, got {type(self.ratio).__name__}.")
            if not 0.0 < self.ratio <= 1.0:
                raise ValueError(f"ratio={self.ratio} is outside (0, 1]: it is the fraction each bottleneck keeps.")
            if self.budget == "average":
                raise ValueError(
                    "ratio is solved from keep under budget='average'; leave ratio=None, or use budget='input' to "
                    "set the first bottleneck's keep and the ratio of the later ones yourself."
                )
        if self.stride not in STRIDES:
            raise ValueError(f"stride={self.stride!r} is not one of {list(STRIDES)}.")


# Keeps 40% of the visual tokens on average over a 32-layer LLM when every bottleneck keeps it (module docstring).
DEFAULT_RATIO = 0.65


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The 2 / 8 / 16 / 24-of-32 bottlenecks scaled to ``num_layers`` decoder layers, the first at layer 1 or later:
    the method compresses inside the LLM after earlier layers have moved information into the survivors, so no
    bottleneck sits at the LLM entry."""
    return scaled_layers(PAPER_LAYERS, num_layers, low=1 if num_layers > 1 else 0, high=num_layers - 1)


@register_pruner
class ADSCPruner(Pruner):
    config_cls = ADSCConfig
    paper = ("ADSC: Vision Token Reduction via Attention-Driven Self-Compression for Efficient MLLMs "
             "(arXiv 2602.12618)")
    status = "approximation"
    points = ("llm:K",)
    flash_compatible = True
    needs_training = "training"

    def layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers if self.config.layers is not None else default_layers(num_layers)
        if layers[-1] >= num_layers:
            raise ValueError(
                f"ADSC's layers={layers} name decoder layer {layers[-1]}, but the model has {num_layers} decoder "
                f"layers (0..{num_layers - 1})."
            )
        return layers

    def plan(self, num_layers: int) -> list[Stage]:
        layers, keep = self.layers(num_layers), self.config.keep
        if self.config.budget == "average":
            ratio = solve_ratio(keep, layers, num_layers)
            fractions = [ratio ** (m + 1) for m in range(len(layers))]
        else:
            ratio = DEFAULT_RATIO if self.config.ratio is None else self.config.ratio
            fractions = [keep * ratio**m for m in range(len(layers))]
        return [Stage(Point("llm", layer), fraction) for layer, fraction in zip(layers, fractions, strict=True)]

    def select(self, ctx: PruneContext) -> Selection:
        dropping = [j for j, image in enumerate(ctx.images) if image.budget < image.num_tokens]
        keep = [torch.arange(image.num_tokens, device=ctx.device) for image in ctx.images]
        spread_out = spread_all([ctx.images[j] for j in dropping], ctx.device, on_grid=self.config.stride == "2d")
        for j, local in zip(dropping, spread_out, strict=True):
            keep[j] = local
        return Selection(keep=keep)


def schedule_counts(config: ADSCConfig, num_layers: int, num_tokens: int) -> list[int]:
    """Visual tokens entering each decoder layer for one image of ``num_tokens`` (for docs and tests)."""
    counts = [num_tokens] * num_layers
    present = num_tokens
    for stage in size_plan(ADSCPruner(config), num_layers):
        present = min(present, kept_count(stage.fraction, num_tokens))
        counts[stage.layer:] = [present] * (num_layers - stage.layer)
    return counts


__all__ = ["ADSCConfig", "ADSCPruner", "default_layers", "schedule_counts", "solve_ratio"]
