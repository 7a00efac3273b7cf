"""The pruner contract: a config class, the insertion points a method acts at, its stages and ``select``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from vtprune.config import AUTO, PrunerConfig, WhereConfig
from vtprune.state import PruneContext, Selection, Stage


class Pruner(ABC):
    """Base class of every method. Subclasses set the class attributes and implement ``select`` (and ``plan``,
    unless the method drops once at the ``where=`` of a ``WhereConfig``).

    Class attributes (shown by ``vtprune methods`` and README's method table):
        name: registry name, the config's ``method`` (set by ``register_pruner``; never written twice).
        config_cls: the method's frozen config dataclass.
        paper: citation with arXiv id.
        status: "baseline", "faithful", "approximation" or "not yet".
        points: the insertion points the method can act at, among "encoder", "projector", "llm:K", "decode:K".
            ``wrap`` refuses a plan with a stage anywhere else (a ``where=`` outside them, for one).
        flash_compatible: whether it works with every attention backend (no ``output_attentions``).
        needs_training: "none", "calibration" or "training".
        needs: optional per-image fields of ``ImageTokens`` the method reads (``state.OPTIONAL_IMAGE_FIELDS``:
            "cls_attention", "global_view", "encoder_attention", "patch_pixels"); the adapter computes only these,
            so other methods pay nothing.
        official_defaults: where a method's official code differs per model family, the values of its config fields
            left at "auto" (or None), keyed by ``config.model_type`` with "*" for every other family; ``resolve``
            applies them when the model is wrapped.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[PrunerConfig]] = PrunerConfig
    paper: ClassVar[str] = ""
    status: ClassVar[str] = "not yet"
    points: ClassVar[tuple[str, ...]] = ()
    flash_compatible: ClassVar[bool] = True
    needs_training: ClassVar[str] = "none"
    needs: ClassVar[frozenset[str]] = frozenset()
    official_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: PrunerConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}.")
        if type(self).plan is Pruner.plan and not isinstance(config, WhereConfig):
            raise TypeError(
                f"{type(self).__name__} must define plan(num_layers): the default plan is one stage at the config's "
                "where=, and its config is not a WhereConfig."
            )
        self.config = config

    def resolve(self, model_type: str) -> None:
        """Set the config fields left at "auto" (or None, for a field ``official_defaults`` names) to the official
        code's values for ``model_type``; ``positions`` left at "auto" without one becomes "original", and so
        does an official "renumber" where the user moved a one-stage method inside the LLM (``where="llm:K"``,
        K >= 1, or a decode point: nothing is dropped before the LLM, so there is nothing to renumber). Called by
        the engine when it installs the method on a model; the resolved config is the one that runs and is saved."""
        defaults = self.official_defaults.get(model_type, self.official_defaults.get("*", {}))
        changes = {name: value for name, value in defaults.items() if getattr(self.config, name) in (AUTO, None)}
        if self.config.positions == AUTO and "positions" not in changes:
            changes["positions"] = "original"
        point = self.config.point if isinstance(self.config, WhereConfig) else None
        inside_llm = point is not None and (point.layer > 0 or point.kind == "decode")
        if changes.get("positions") == "renumber" and inside_llm:
            changes["positions"] = "original"
        if changes:
            self.config = self.config.replace(**changes)

    def plan(self, num_layers: int) -> list[Stage]:
        """The stages this method drops at, for an LLM with ``num_layers`` decoder layers. A stage without a
        ``fraction`` is sized by the engine from ``keep`` and ``budget`` (``vtprune.budget.size_plan``), which also
        makes every plan the identity at keep=1. The default: one stage at the ``where=`` of a ``WhereConfig``."""
        return [Stage(self.config.point)]

    @abstractmethod
    def select(self, ctx: PruneContext) -> Selection:
        """Choose the tokens to keep at one stage: per image, exactly ``ctx.images[j].budget`` distinct indices into
        its present tokens (at most that many at an adaptive stage). Never called at a stage that drops nothing."""
