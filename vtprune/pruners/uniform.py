"""Uniform spatial down-sampling: keep a regular sub-grid of each image's token grid.

Not from a single paper; the plain down-sampling baseline that recent benchmarks of token pruning found hard to
beat (e.g. "Rethinking visual token reduction..." style studies). For a budget k on an (H, W) grid it picks a
gh x gw lattice with gh ~ sqrt(k H / W) rows and gw = ceil(k / gh) columns, cell-centred, then thins the lattice
evenly to exactly k. 64 of 24 x 24 is the stride-3 lattice. Tokens already dropped by an earlier stage are skipped
by mapping each lattice point to the nearest surviving token.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.config import WhereConfig
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection


@dataclass(frozen=True)
class UniformConfig(WhereConfig):
    """Attributes:
    where: insertion point: "encoder", "projector", "llm:K" or "decode:K".
    """

    method = "uniform"


@functools.lru_cache(maxsize=256)
def lattice_on(rows: int, cols: int, count: int, device: torch.device) -> Tensor:
    """``lattice`` already on ``device``: built and copied once per (grid, count), since a host-to-device copy
    blocks the host until the GPU has caught up."""
    return lattice(rows, cols, count).to(device)


def lattice(rows: int, cols: int, count: int) -> Tensor:
    """(count,) raster indices of an evenly spread, cell-centred lattice on a rows x cols grid."""
    grid_rows = min(rows, max(1, round(math.sqrt(count * rows / cols))))
    grid_cols = min(cols, math.ceil(count / grid_rows))
    grid_rows = min(rows, math.ceil(count / grid_cols))
    r = ((torch.arange(grid_rows) + 0.5) * rows / grid_rows).long()
    c = ((torch.arange(grid_cols) + 0.5) * cols / grid_cols).long()
    points = (r[:, None] * cols + c[None, :]).flatten()
    pick = ((torch.arange(count) + 0.5) * points.numel() / count).long()
    return points[pick]


def nearest_present(image: ImageTokens, wanted: Tensor) -> Tensor:
    """Map wanted raster indices to as many distinct positions in ``image.original_indices``, near on the grid.

    Vectorised on the tokens' device (no loop over tokens, no sync): every present token goes to its nearest wanted
    point, every wanted point keeps its closest token (ties by index), and wanted points whose cell holds no present
    token are made up by the present tokens farthest from those chosen.
    """
    present = image.original_indices
    if present.numel() == image.grid[0] * image.grid[1]:
        return wanted.to(present.device)
    return nearest_present_rows(present[None], wanted, image.grid[1])[0]


def nearest_present_rows(present: Tensor, wanted: Tensor, cols: int) -> Tensor:
    """``nearest_present`` for R images at once that have the same grid width and the same number n of present
    tokens: (R, n) raster indices -> (R, m) indices into each row. Ties go to the lower index, so the kept set does
    not depend on the device's top-k."""
    rows, n = present.shape
    wanted = wanted.to(present.device)
    coords = torch.stack((present // cols, present % cols), -1).float()
    target = torch.stack((wanted // cols, wanted % cols), -1).float().expand(rows, -1, -1)
    # Squared grid distances are small integers, exact in fp32; (d², index) then orders tokens without ties.
    squared = torch.cdist(coords, target).square().round().long()
    nearest, owner = squared.min(dim=2)
    index = torch.arange(n, device=present.device)
    key = nearest * n + index
    never = torch.iinfo(key.dtype).max
    best = torch.full((rows, wanted.numel()), never, dtype=key.dtype, device=key.device)
    best = best.scatter_reduce(1, owner, key, reduce="amin")
    chosen = key == best.gather(1, owner)
    uncovered = best == never
    gap = squared.masked_fill(~uncovered[:, None, :], never).amin(dim=2).clamp(max=2**40)
    # Chosen tokens first, then the tokens nearest to a wanted point that found none in its cell.
    rank = torch.where(chosen, torch.full_like(gap, -1), gap) * n + index
    return rank.topk(wanted.numel(), dim=1, largest=False).indices


@register_pruner
class UniformPruner(Pruner):
    config_cls = UniformConfig
    paper = "baseline (regular spatial sub-grid)"
    status = "baseline"
    points = ("encoder", "projector", "llm:K", "decode:K")

    def select(self, ctx: PruneContext) -> Selection:
        return Selection(keep=spread_all(ctx.images, ctx.device))


def spread(image: ImageTokens, device: torch.device, on_grid: bool = True) -> Tensor:
    """(budget,) indices into the image's present tokens, spread evenly: the grid lattice mapped to the nearest
    present tokens, or an even stride along the token order where there is no grid (e.g. a packed sequence) or
    ``on_grid`` is False."""
    if image.grid is None or not on_grid:
        return even_stride(image.num_tokens, image.budget, device)
    local = lattice_on(image.grid[0], image.grid[1], image.budget, device)
    if image.num_tokens != image.grid[0] * image.grid[1]:
        local = nearest_present(image, local)
    return local


def spread_all(images: list[ImageTokens], device: torch.device, on_grid: bool = True) -> list[Tensor]:
    """``spread`` for every image; the images that need the nearest-present mapping and share grid, token count and
    budget (the images of a batch, after the same earlier drop) are mapped in one batched call."""
    out: list[Tensor | None] = [None] * len(images)
    batches: dict[tuple, list[int]] = {}
    for j, image in enumerate(images):
        if image.grid is None or not on_grid or image.num_tokens == image.grid[0] * image.grid[1]:
            out[j] = spread(image, device, on_grid)
        else:
            batches.setdefault((image.grid, image.num_tokens, image.budget), []).append(j)
    for (grid, _, budget), members in batches.items():
        wanted = lattice_on(grid[0], grid[1], budget, device)
        present = torch.stack([images[j].original_indices for j in members])
        for j, local in zip(members, nearest_present_rows(present, wanted, grid[1]).unbind(0), strict=True):
            out[j] = local
    return out


def even_stride(num_tokens: int, count: int, device: torch.device) -> Tensor:
    """(count,) indices spread evenly over ``num_tokens`` tokens in order (cell-centred)."""
    return ((torch.arange(count, device=device) + 0.5) * (num_tokens / count)).long()
