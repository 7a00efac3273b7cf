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


def register_pruner(name: str) -> Callable[[T], T]:
    """Class decorator that registers a pruner under ``name`` (the ``method=`` a user passes to ``wrap``)."""

    def decorator(cls: T) -> T:
        _load_builtins()  # so that a user's class can never take a built-in name before the built-ins load
        if name in PRUNERS:
            raise ValueError(f"A pruner named '{name}' is already registered ({PRUNERS[name].__qualname__}).")
        cls.name = name
        PRUNERS[name] = cls
        return cls

    return decorator


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
