"""Pruning methods. Each file registers one method; adding a method = one file + one import line here."""

from vtprune.pruners import (  # noqa: F401
    adsc,
    apet,
    atp,
    cdpruner,
    dart,
    divprune,
    fastv,
    mustdrop,
    pdrop,
    random,
    sparsevlm,
    todre,
    uniform,
    vflowopt,
    visionzip,
)
from vtprune.pruners.base import Pruner

__all__ = ["Pruner"]
