"""The user's verbs: ``wrap``, ``unwrap``, ``is_wrapped``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vtprune.config import PrunerConfig, check_options
from vtprune.registry import get_pruner_class


class VTPruneHandle:
    """What ``wrap`` attaches as ``model.vtprune``: the config, the pruner, the engine running them (its ``family``
    states the model's facts) and the last call's stats."""

    def __init__(self, config: PrunerConfig, pruner: Any, engine: Any) -> None:
        self.config = config
        self.pruner = pruner
        self.engine = engine

    @property
    def last_stats(self) -> dict[str, Any] | None:
        """Stats of the last prefill: per sample, the kept indices into the original visual tokens for every stage,
        visual tokens per decoder layer, K_in, K_avg and the selection time. None before the first pruned call."""
        raw = self.engine.last_stats
        return raw.as_dict() if raw is not None else None

    def __repr__(self) -> str:
        return f"VTPruneHandle({self.config!r}, family={type(self.engine.family).__name__})"

    def __deepcopy__(self, memo: dict) -> VTPruneHandle:
        # A copy of the model would keep hooks that call into this model's engine (its captured features, its
        # call state): a silent wrong answer. Refuse it, with the way to get a wrapped copy.
        raise TypeError(
            "copy.deepcopy of a vtprune-wrapped model is not supported: the copy's hooks would still run this model's "
            "engine. Copy the unwrapped model and wrap both: config = model.vtprune.config; vtprune.unwrap(model); "
            "twin = copy.deepcopy(model); vtprune.wrap(model, config); vtprune.wrap(twin, config)."
        )


def resolve_config(method: str | PrunerConfig | dict | os.PathLike, keep: float | None, options: dict) -> PrunerConfig:
    """Turn the forms ``wrap`` accepts (name, config object, dict, path to a saved JSON) into one config."""
    if isinstance(method, PrunerConfig):
        config = method
    elif isinstance(method, dict):
        if "method" not in method:
            raise ValueError("A config dict needs a 'method' key, e.g. {'method': 'uniform', 'keep': 0.11}.")
        config = get_pruner_class(method["method"]).config_cls.from_dict(method)
    elif isinstance(method, os.PathLike) or (isinstance(method, str) and method.endswith(".json")):
        if not Path(method).is_file():
            raise ValueError(f"Config file {method} does not exist.")
        config = PrunerConfig.load(method)
    elif isinstance(method, str):
        config_cls = get_pruner_class(method).config_cls
        check_options(config_cls, options)
        return config_cls(**({"keep": keep} if keep is not None else {}), **options)
    else:
        raise TypeError(
            f"method must be a method name, a PrunerConfig, a dict or a path to a saved config; got "
            f"{type(method).__name__}."
        )
    changes = dict(options)
    if keep is not None:
        changes["keep"] = keep
    return config.replace(**changes) if changes else config


def wrap(model: nn.Module, method: str | PrunerConfig | dict | os.PathLike, keep: float | None = None, **options):
    """Install visual-token pruning on a transformers VLM, in place, and return the same model.

    Args:
        model: a ``...ForConditionalGeneration`` of a supported family (``vtprune.list_models()``).
        method: a method name (``vtprune.list_methods()``), a ``PrunerConfig``, a dict or a path to a saved config.
        keep: fraction of visual tokens kept per image, in (0, 1].
        **options: method options (e.g. ``where="llm:2"``, ``budget="average"``, ``seed=0``).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"wrap needs a transformers model (nn.Module with .config), got {type(model).__name__}.")
    if is_wrapped(model):
        raise ValueError("This model is already wrapped by vtprune. Call vtprune.unwrap(model) first.")
    config = resolve_config(method, keep, options)
    from vtprune.engine import Engine

    engine = Engine(model)  # the registered family of model.config.model_type
    pruner = get_pruner_class(config.method)(config)
    engine.install(pruner)
    # The config as it runs: fields left to the official code of the family ("auto") are resolved by now.
    model.vtprune = VTPruneHandle(pruner.config, pruner, engine)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook ``wrap`` installed; the model behaves exactly as before ``wrap``."""
    if not is_wrapped(model):
        raise ValueError("This model is not wrapped by vtprune; nothing to unwrap.")
    model.vtprune.engine.remove()
    del model.vtprune
    return model


def is_wrapped(model: nn.Module) -> bool:
    return isinstance(getattr(model, "vtprune", None), VTPruneHandle)
