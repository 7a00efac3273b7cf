"""Pruner configuration: frozen, typed dataclasses that validate themselves and round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vtprune.point import Point

CONFIG_VERSION = 1
BUDGETS = ("input", "average")
POSITIONS = ("original", "renumber")
# A field left to the method's official code for the model's family, resolved when the model is wrapped.
AUTO = "auto"


def option_value(text: str) -> Any:
    """A method option typed on a command line: JSON where it reads as JSON ("0", "0.25", "false", "[1, 2]"), else the
    text itself ("kcenter", "llm:2")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass(frozen=True)
class PrunerConfig:
    """Options every method shares. Subclasses add their own fields, each typed and documented.

    Attributes:
        keep: fraction of visual tokens kept per image, in (0, 1].
        budget: "input" counts the visual tokens right after the (first) drop; "average" counts the mean number of
            visual tokens over all LLM layers (the convention of the FastV/PDrop/ApET tables).
        positions: position ids of the survivors of a drop before the LLM. "original" keeps each token's position
            in the unpruned prompt (the convention of in-LLM methods: FastV, PDrop, ToDRE); "renumber" gives them
            the positions the model would give the shorter prompt, as feeding only the kept tokens would (the
            convention of pre-LLM codes: VisionZip, DivPrune, ApET's LLaVA code). Drops inside the LLM keep the
            positions their rows had. M-RoPE families (Qwen2/2.5/3-VL) take "original" only. "auto": the
            method's official convention for the model's family (``Pruner.official_defaults``), set when wrapped;
            "original" for a method without one.
    """

    method: ClassVar[str] = ""
    # Fields ``vtprune.calibrate`` may tune, name -> ("float", low, high) | ("log", low, high) | ("int", low, high)
    # | ("choice", (value, ...)); empty = nothing to calibrate. ``keep`` and ``budget`` are never tuned.
    search_space: ClassVar[dict[str, tuple]] = {}
    keep: float = 1.0
    budget: str = "input"
    positions: str = "original"

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise TypeError(f"keep must be a number in (0, 1], got {type(self.keep).__name__}.")
        if not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(
                f"keep={self.keep} is outside (0, 1]. keep is the fraction of visual tokens kept, "
                "e.g. keep=0.11 keeps about 64 of 576."
            )
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r} is not one of {list(BUDGETS)}.")
        if self.positions not in (*POSITIONS, AUTO):
            raise ValueError(f"positions={self.positions!r} is not one of {[*POSITIONS, AUTO]}.")

    def replace(self, **changes: Any) -> PrunerConfig:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"method": self.method, "version": CONFIG_VERSION, **body}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunerConfig:
        data = dict(data)
        method = data.pop("method", cls.method)
        version = data.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(
                f"This config was written by a newer vtprune (config version {version} > {CONFIG_VERSION}); "
                "upgrade vtprune to read it."
            )
        if cls.method and method != cls.method:
            raise ValueError(f"Config is for method '{method}', not '{cls.method}'.")
        check_options(cls, data)
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @staticmethod
    def load(path: str | Path) -> PrunerConfig:
        """Read a config saved with ``save``; the method named inside picks the config class."""
        from vtprune.registry import get_pruner_class

        data = json.loads(Path(path).read_text())
        if "method" not in data:
            raise ValueError(f"{path} has no 'method' key; it was not written by PrunerConfig.save.")
        return get_pruner_class(data["method"]).config_cls.from_dict(data)


def check_options(config_cls: type, options: dict[str, Any]) -> None:
    """Raise a ValueError naming any option the method does not take, with the ones it does."""
    import difflib

    known = [f.name for f in dataclasses.fields(config_cls)]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"Method '{config_cls.method}' does not take the option '{name}'. Its options: {known}.{hint}"
            )


def scaled_layers(paper_layers: tuple[int, ...], num_layers: int, low: int, high: int,
                  paper_depth: int = 32) -> tuple[int, ...]:
    """A paper's layer schedule for a ``paper_depth``-layer LLM mapped to ``num_layers`` layers: round(l·L/depth),
    clamped to ``low``..``high``, duplicates removed, increasing (the default ``layers`` of the multi-stage
    in-LLM methods)."""
    return tuple(sorted({min(high, max(low, round(layer * num_layers / paper_depth))) for layer in paper_layers}))


def layer_tuple(layers: Any, minimum: int, reason: str, example: str) -> tuple[int, ...] | None:
    """The ``layers`` option of a multi-stage in-LLM method, validated: None (the method's scaled defaults) or a
    non-empty, strictly increasing tuple of ints (a list, as JSON gives, becomes a tuple), the first >= ``minimum``
    (``reason`` says why, in the error)."""
    if layers is None:
        return None
    if isinstance(layers, list):
        layers = tuple(layers)
    if not isinstance(layers, tuple) or not layers:
        raise ValueError(
            f"layers={layers!r} must be a non-empty tuple of decoder layer indices, e.g. {example}, or None for the "
            "paper's layers scaled to the model's depth."
        )
    if any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
        raise TypeError(f"layers={layers!r} must hold ints (decoder layer indices).")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"layers={layers!r} must be strictly increasing, e.g. {example}.")
    if layers[0] < minimum:
        raise ValueError(
            f"layers={layers!r} starts at layer {layers[0]}; {reason}, so every layer must be >= {minimum}."
        )
    return layers


@dataclass(frozen=True)
class WhereConfig(PrunerConfig):
    """Options of a method that drops once, at one insertion point the user picks among its ``Pruner.points``.

    Attributes:
        where: insertion point: "encoder", "projector", "llm:K" (input of decoder layer K) or "decode:K" (KV cache
            of layers >= K after prefill). Saved as this string; ``point`` is the parsed ``Point``.
    """

    where: str = "projector"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.where, Point):
            object.__setattr__(self, "where", str(self.where))
        # Parsed once, here; the stage is built from the parsed point.
        object.__setattr__(self, "_point", Point.parse(self.where))

    @property
    def point(self) -> Point:
        return self._point
