"""The pruning engine (``Engine``), composed with a model family (``Family``) that states the model's facts.

``core``: hooks, stages, selection checks, cache edits, stats; ``rows``: per-call bookkeeping; ``probe``: attention
rows without attention weights; ``family``: the protocol a family file implements and the view it gets; ``layout``:
where an image's tokens sit. The engine never imports a family; families never import a pruner.
"""

from vtprune.engine.core import Engine
from vtprune.engine.family import Family, FamilyView
from vtprune.engine.layout import ImageLayout, encoded_index

__all__ = ["Engine", "Family", "FamilyView", "ImageLayout", "encoded_index"]
