"""The one registry of vtprune: pruning methods and model-family adapters, each a plain dict keyed by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

PRUNERS: dict[str, type] = {}
ADAPTERS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def register_pruner(cls: T) -> T:
    """Class decorator that registers a pruner under its config's ``method`` (the ``method=`` a user passes to
    ``wrap``), so that the name is written once: ``@register_pruner`` above ``class MyPruner(Pruner)`` whose
    ``config_cls.method = "my-method"``."""
    from vtprune.config import PrunerConfig
    from vtprune.point import check_patterns

    if not isinstance(cls, type):
        raise TypeError(
            f"register_pruner takes the class itself (@register_pruner, no arguments), got {cls!r}: the method's "
            "name is its config's `method`, written once there."
        )
    config_cls = getattr(cls, "config_cls", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, PrunerConfig)) or not config_cls.method:
        raise ValueError(
            f"{cls.__qualname__}.config_cls must be a PrunerConfig subclass with a non-empty `method` (the name "
            "users pass to wrap)."
        )
    check_patterns(getattr(cls, "points", ()), cls.__qualname__)
    _load_builtins()  # so that a user's class can never take a built-in name before the built-ins load
    name = config_cls.method
    if name in PRUNERS:
        raise ValueError(f"A pruner named '{name}' is already registered ({PRUNERS[name].__qualname__}).")
    cls.name = name
    PRUNERS[name] = cls
    return cls


def register_adapter(*model_types: str) -> Callable[[T], T]:
    """Class decorator that registers an adapter for one or more ``config.model_type`` values."""

    def decorator(cls: T) -> T:
        _load_builtins()
        for model_type in model_types:
            if model_type in ADAPTERS:
                raise ValueError(f"An adapter for model_type '{model_type}' is already registered.")
            ADAPTERS[model_type] = cls
        cls.model_types = model_types
        return cls

    return decorator


def get_pruner_class(name: str) -> Any:
    _load_builtins()
    if not isinstance(name, str):
        raise TypeError(f"method must be a string or a PrunerConfig, got {type(name).__name__}.")
    if name not in PRUNERS:
        known = sorted(PRUNERS)
        raise ValueError(f"Unknown method '{name}'. Available: {known}.{_suggest(name, known)}")
    return PRUNERS[name]


def get_adapter_class(model_type: str) -> Any:
    _load_builtins()
    if model_type not in ADAPTERS:
        known = sorted(ADAPTERS)
        raise ValueError(
            f"Unsupported model family '{model_type}' (config.model_type). Supported: {known}."
            f"{_suggest(model_type, known)} To add a family, write one adapter file (see docs/adding_a_model.md)."
        )
    return ADAPTERS[model_type]


def list_methods() -> list[str]:
    """Names of every registered pruning method, sorted."""
    _load_builtins()
    return sorted(PRUNERS)


def list_models() -> list[str]:
    """The ``config.model_type`` values vtprune has an adapter for, sorted."""
    _load_builtins()
    return sorted(ADAPTERS)


def _load_builtins() -> None:
    # Imported lazily so that `import vtprune` stays light and the registry module has no import cycle.
    from vtprune import adapters, pruners  # noqa: F401
