"""Insertion points: where a stage of a method acts, as one small value type.

``encoder`` (before the projector), ``projector`` (after it, before the scatter into the LLM input), ``llm:K`` (the
input of decoder layer K, during prefill) and ``decode:K`` (the KV cache of layers >= K, after prefill). The same
strings are what a user passes as ``where=`` and what a pruner lists in ``Pruner.points``, where ``llm:K`` and
``decode:K`` stand for any layer (``Point.pattern``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("encoder", "projector", "llm", "decode")
# The points before the LLM act at its entry, i.e. layer 0.
ENTRY_KINDS = ("encoder", "projector")
PATTERNS = ("encoder", "projector", "llm:K", "decode:K")
_SYNTAX = re.compile(r"^(encoder|projector)$|^(llm|decode):(\d+)$")


@dataclass(frozen=True, eq=False)
class Point:
    """One insertion point.

    Attributes:
        kind: "encoder", "projector", "llm" or "decode".
        layer: decoder layer K of "llm" / "decode"; 0 for the points before the LLM.
    """

    kind: str
    layer: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown insertion point kind {self.kind!r}; the kinds are {list(KINDS)}.")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"The layer of an insertion point must be an int >= 0, got {self.layer!r}.")
        if self.kind in ENTRY_KINDS and self.layer != 0:
            raise ValueError(f"The '{self.kind}' point acts before the LLM; its layer is 0, not {self.layer}.")

    @classmethod
    def parse(cls, where: str | Point) -> Point:
        """"projector" -> Point("projector", 0), "llm:2" -> Point("llm", 2); a Point is returned as it is."""
        if isinstance(where, Point):
            return where
        match = _SYNTAX.match(where) if isinstance(where, str) else None
        if match is None:
            raise ValueError(
                f"Invalid insertion point {where!r}. Use 'encoder', 'projector', 'llm:K' (prune at the input of "
                "decoder layer K) or 'decode:K' (evict visual entries of the KV cache of layers >= K after prefill)."
            )
        if match.group(1) is not None:
            return cls(match.group(1))
        return cls(match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return self.kind if self.kind in ENTRY_KINDS else f"{self.kind}:{self.layer}"

    def __repr__(self) -> str:
        return f"Point('{self}')"

    @property
    def pattern(self) -> str:
        """The entry of ``Pruner.points`` / ``Family.points`` this point matches: "llm:K" for "llm:2"."""
        return self.kind if self.kind in ENTRY_KINDS else f"{self.kind}:K"

    def check_depth(self, num_layers: int) -> Point:
        """Return the point, or raise where its layer is not a decoder layer of a model with ``num_layers``."""
        if self.layer >= num_layers:
            raise ValueError(
                f"The insertion point '{self}' names decoder layer {self.layer}, but the model has {num_layers} "
                f"decoder layers (0..{num_layers - 1}). Pick a layer in that range (where='llm:K' / 'decode:K' for a "
                "method that takes where=)."
            )
        return self

    # Equal by value; a Point never equals a string, and comparing one to a string is almost always a bug left from
    # the time stages carried the kind as a string ("llm"), so it raises instead of quietly being False.
    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            raise TypeError(
                f"A Point is compared with the string {other!r}. Compare point.kind (e.g. ctx.point.kind == 'llm') "
                "or str(point) (e.g. 'llm:2')."
            )
        if not isinstance(other, Point):
            return NotImplemented
        return (self.kind, self.layer) == (other.kind, other.layer)

    def __hash__(self) -> int:
        return hash((self.kind, self.layer))


def check_patterns(points: tuple[str, ...], owner: str) -> None:
    """Raise unless ``points`` is a tuple of entries of ``PATTERNS`` (``owner`` names who declared them)."""
    if not isinstance(points, tuple) or not points or any(p not in PATTERNS for p in points):
        raise ValueError(f"{owner}.points={points!r} must be a non-empty tuple of entries of {list(PATTERNS)}.")
