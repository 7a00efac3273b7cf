"""The pruner contract: a config class, the stages a method acts at, and ``select``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from vtprune.budget import stage_fraction
from vtprune.config import PrunerConfig, parse_where
from vtprune.state import PruneContext, Selection, Stage


class Pruner(ABC):
    """Base class of every method. Subclasses set the class attributes and implement ``plan`` and ``select``.

    Class attributes (shown by ``vtprune methods`` and README's method table):
        name: registry name (set by ``register_pruner``).
        config_cls: the method's frozen config dataclass.
        paper: citation with arXiv id.
        status: "baseline", "faithful", "approximation" or "not yet".
        points: insertion points the method can act at.
        flash_compatible: whether it works with every attention backend (no ``output_attentions``).
        needs_training: "none", "calibration" or "training".
        needs: optional per-image fields of ``ImageTokens`` the method reads (``state.OPTIONAL_IMAGE_FIELDS``:
            "cls_attention", "global_view"); the adapter computes only these, so other methods pay nothing.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[PrunerConfig]] = PrunerConfig
    paper: ClassVar[str] = ""
    status: ClassVar[str] = "not yet"
    points: ClassVar[tuple[str, ...]] = ()
    flash_compatible: ClassVar[bool] = True
    needs_training: ClassVar[str] = "none"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: PrunerConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}.")
        self.config = config

    @abstractmethod
    def plan(self, num_layers: int) -> list[Stage]:
        """The stages this method drops at, for an LLM with ``num_layers`` decoder layers."""

    @abstractmethod
    def select(self, ctx: PruneContext) -> Selection:
        """Choose the tokens to keep at one stage; ``ctx.images[j].budget`` says how many."""


def single_stage_plan(config: PrunerConfig, where: str, num_layers: int) -> list[Stage]:
    """Plan of a method that drops once, at ``where``, sized by the config's keep and budget."""
    point, layer = parse_where(where)
    if layer >= num_layers:
        raise ValueError(
            f"where={where!r} names decoder layer {layer}, but the model has {num_layers} decoder layers "
            f"(0..{num_layers - 1})."
        )
    return [Stage(point, layer, stage_fraction(config.keep, config.budget, layer, num_layers))]
