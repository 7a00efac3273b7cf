"""Turn a user's ``keep`` into token counts, under the two budget conventions of the literature.

``budget="input"``: ``keep`` is the fraction of visual tokens left right after the drop (entering LLM layer 0 for
pruning before the LLM, entering layer K for ``llm:K``). ``budget="average"``: ``keep`` is the mean fraction over
all L decoder layers, so a drop at layer K must keep ``(keep * L - K) / (L - K)`` to compensate for the K layers
that still see every token (METHODS.md §0.2).
"""

from __future__ import annotations


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
