"""Pruning methods. Each file registers one method; adding a method = one file + one import line here."""

from vtprune.pruners import adsc, apet, dart, fastv, random, todre, uniform  # noqa: F401
from vtprune.pruners.base import Pruner

__all__ = ["Pruner"]
