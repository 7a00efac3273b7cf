"""Random visual-token dropping: the floor every method must beat.

Not from a paper; the control used in most token-pruning studies. Each image keeps a uniformly random subset of its
tokens. The draw is seeded per image by (seed, index of the image within its prompt), so a prompt gives the same
selection alone or inside any batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.config import WhereConfig
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import PruneContext, Selection


@dataclass(frozen=True)
class RandomConfig(WhereConfig):
    """Attributes:
    where: insertion point: "encoder", "projector", "llm:K" or "decode:K".
    seed: base seed of the per-image draws.
    """

    method = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}.")


@register_pruner
class RandomPruner(Pruner):
    config_cls = RandomConfig
    paper = "baseline (seeded uniform random subset)"
    status = "baseline"
    points = ("encoder", "projector", "llm:K", "decode:K")

    def select(self, ctx: PruneContext) -> Selection:
        keep = [permutation(self.config.seed, image.index_in_sample, image.num_tokens, image.budget, ctx.device)
                for image in ctx.images]
        return Selection(keep=keep)


@functools.lru_cache(maxsize=256)
def permutation(seed: int, index_in_sample: int, num_tokens: int, count: int, device: torch.device) -> Tensor:
    """The first ``count`` of a seeded permutation of ``num_tokens``, on ``device``; cached, since the draw is a
    function of its arguments and a host-to-device copy blocks the host until the GPU has caught up."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index_in_sample)
    return torch.randperm(num_tokens, generator=generator)[:count].to(device)
