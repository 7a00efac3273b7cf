"""Pruning methods. Each file registers one method; adding a method = one file + one import line here."""

from vtprune.pruners import adsc, apet, divprune, fastv, pdrop, random, sparsevlm, todre, uniform, visionzip  # noqa: F401
from vtprune.pruners.base import Pruner

__all__ = ["Pruner"]
