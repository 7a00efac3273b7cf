"""Turn a user's ``keep`` into token counts, under the two budget conventions of the literature.

The engine owns this for every method: a pruner's ``plan`` names its stages, ``size_plan`` gives each one its
fraction, and ``stage_budget`` turns a fraction into the count a stage keeps of one image.

``budget="input"``: ``keep`` is the fraction of visual tokens left right after the drop (entering LLM layer 0 for
pruning before the LLM, entering layer K for ``llm:K``). ``budget="average"``: ``keep`` is the mean fraction over
all L decoder layers, so a drop at layer K must keep ``(keep * L - K) / (L - K)`` to compensate for the K layers
that still see every token (METHODS.md §0.2).
"""

from __future__ import annotations

from typing import Any

from vtprune.state import Stage


def stage_fraction(keep: float, budget: str, layer: int, num_layers: int) -> float:
    """Fraction of the visual tokens to keep at a single drop placed at decoder layer ``layer`` (0 = LLM entry)."""
    if budget == "input" or layer == 0:
        return keep
    fraction = (keep * num_layers - layer) / (num_layers - layer)
    if fraction <= 0:
        raise ValueError(
            f"keep={keep} under budget='average' cannot be met by dropping at layer {layer} of {num_layers}: the "
            f"first {layer} layers alone already use {layer / num_layers:.3f} of the full budget. Drop earlier "
            "(a smaller K), raise keep, or use budget='input'."
        )
    return fraction


def kept_count(fraction: float, num_tokens: int) -> int:
    """Tokens kept out of ``num_tokens``: rounded, at least one, at most all."""
    return max(1, min(num_tokens, round(fraction * num_tokens)))


def stage_budget(stage: Stage, num_tokens: int, present: int) -> int:
    """Tokens a stage keeps of an image of ``num_tokens`` original tokens of which ``present`` are still there."""
    return min(present, kept_count(stage.fraction, num_tokens))


def size_plan(pruner: Any, num_layers: int) -> list[Stage]:
    """The pruner's plan for an LLM of ``num_layers`` decoder layers, every stage with its fraction.

    A stage the method left unsized (``fraction=None``) gets ``stage_fraction`` of the config's ``keep`` and
    ``budget`` at its layer. At keep=1 every stage keeps everything and none is adaptive: the exact identity for
    every method, with no method code involved (the engine never calls ``select`` at a stage that drops nothing).
    """
    keep, budget = pruner.config.keep, pruner.config.budget
    sized = []
    for stage in pruner.plan(num_layers):
        stage.point.check_depth(num_layers)
        if keep >= 1.0:
            sized.append(Stage(stage.point, 1.0))
        elif stage.fraction is None:
            sized.append(Stage(stage.point, stage_fraction(keep, budget, stage.layer, num_layers), stage.adaptive))
        else:
            sized.append(stage)
    return sized


def average_fraction(ratio: float, layers: tuple[int, ...], num_layers: int) -> float:
    """Mean over the L layers of the visual fraction present, for in-LLM stages at ``layers`` each keeping ``ratio``
    of the tokens present before it (ADSC's bottlenecks, PyramidDrop's stages)."""
    bounds = (*layers, num_layers)
    total = float(layers[0])
    for m in range(len(layers)):
        total += ratio ** (m + 1) * (bounds[m + 1] - bounds[m])
    return total / num_layers


def solve_ratio(keep: float, layers: tuple[int, ...], num_layers: int) -> float:
    """ρ in (0, 1] whose schedule averages ``keep`` over the layers (the mean is increasing in ρ: bisection)."""
    floor = layers[0] / num_layers
    if keep <= floor:
        raise ValueError(
            f"keep={keep} under budget='average' cannot be met with the first in-LLM stage at layer {layers[0]} of "
            f"{num_layers}: the layers before it alone use {floor:.3f} of the full budget. Give earlier layers= "
            "(e.g. starting at 0), raise keep, or use budget='input'."
        )
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        if average_fraction(mid, layers, num_layers) < keep:
            low = mid
        else:
            high = mid
    return high


def layer_mean(fractions: list[float], layers: tuple[int, ...], num_layers: int) -> float:
    """Mean over the L layers of the visual share, in-LLM stages at the inputs of ``layers`` each leaving
    ``fractions[m]`` of the original tokens (the layers before the first see every token)."""
    bounds = (*layers, num_layers)
    total = float(layers[0])
    for m, fraction in enumerate(fractions):
        total += fraction * (bounds[m + 1] - bounds[m])
    return total / num_layers


def scale_to_average(shape: list[float], keep: float, layers: tuple[int, ...], num_layers: int) -> list[float]:
    """min(1, c·shape[m]) for the factor c whose ``layer_mean`` is ``keep`` (bisection: the mean is increasing in c,
    from l₁/L at c = 0 to 1 once every share is capped). The caller checks keep > l₁/L, with its own message."""

    def scaled(factor: float) -> list[float]:
        return [min(1.0, factor * share) for share in shape]

    low, high = 0.0, 1.0 / min(shape)
    for _ in range(60):
        mid = 0.5 * (low + high)
        if layer_mean(scaled(mid), layers, num_layers) < keep:
            low = mid
        else:
            high = mid
    return scaled(high)


def geometric_shares(keep: float, budget: str, decay: float, layers: tuple[int, ...], num_layers: int,
                     infeasible: str) -> list[float]:
    """Shares of each image's original tokens kept by stages at ``layers`` that shrink by ``decay`` from one to the
    next: ``budget="input"``: keep, keep·decay, ...; ``"average"``: the same shape scaled so that ``layer_mean`` is
    ``keep`` (``scale_to_average``). Raises ValueError(``infeasible``) when keep <= l₁/L under the average budget
    (``infeasible`` may use {floor}: l₁/L)."""
    shape = [decay**m for m in range(len(layers))]
    if budget == "input":
        return [keep * share for share in shape]
    floor = layers[0] / num_layers
    if keep <= floor:
        raise ValueError(infeasible.format(floor=floor))
    return scale_to_average(shape, keep, layers, num_layers)
