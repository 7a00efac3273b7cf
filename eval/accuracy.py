"""Accuracy on the synth set: unpruned, pruned, blind (no visual tokens), the object oracles, the yardstick gates.

The blind run and the oracle are the checks that prove the yardstick measures visual evidence: with every visual
token hidden, accuracy must fall to chance per category; an oracle that keeps the tokens covering the objects must
keep nearly all of the unpruned accuracy at keep 0.11 and beat ``uniform`` by a wide margin (``gates``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vtprune.config import PrunerConfig
from vtprune.eval import reference, synth, synth_v2
from vtprune.pruners.base import Pruner
from vtprune.pruners.uniform import lattice, nearest_present_rows
from vtprune.state import PruneContext, Selection, Stage

IMAGE_CATEGORIES = tuple(dict.fromkeys(synth.IMAGE_CATEGORIES + synth_v2.IMAGE_CATEGORIES))
# Chance accuracy of yardstick version 1's categories (version 2: ``synth_v2.CHANCE``).
CHANCE = {
    "colour": 1 / len(synth.COLOURS), "shape": 1 / len(synth.SHAPES), "position": 1 / len(synth.QUADRANTS),
    "count": 1 / len(synth.NUMBERS), "text": 1 / len(synth.CHARS), "incontext": 1 / 5, "motion": 1 / 4,
    "appear": 1 / len(synth.SHAPES), "order": 1 / len(synth.SHAPES),
}


@torch.no_grad()
def predict(model: Any, spec: reference.FamilySpec, items: list[synth.Item], blind: bool = False,
            before: Callable[[list[synth.Item]], None] | None = None) -> list[str]:
    """First answer word for each item (greedy: argmax of the next-token logits).

    ``blind`` hides every visual token's key in the LLM (a 2-D mask) and, on version 2, takes the argmax over the
    item's category answers only: v2 run 5's checkpoint, never shown an image-less prompt, answered off the answer
    set and scored 0.0 everywhere, which says nothing about the prior the blind gate is there to bound."""
    device = next(model.parameters()).device
    batch = reference.encode(spec, items, device)
    if blind:
        visual = torch.isin(batch["input_ids"], visual_token_ids(model).to(device))
        batch["attention_mask"] = batch["attention_mask"] * (~visual).long()
    if before is not None:
        before(items)
    logits = model(**batch, logits_to_keep=1).logits[:, -1]
    if blind and hasattr(spec.task, "ANSWERS"):
        logits = restrict_to_answers(spec, items, logits)
    return reference.decode_answers(spec, logits.argmax(-1))


def restrict_to_answers(spec: reference.FamilySpec, items: list[synth.Item], logits: Tensor) -> Tensor:
    """``logits`` (B, vocab) with every word outside each item's category answers (``task.ANSWERS``) at -inf."""
    ids = reference.vocab(spec)
    allowed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for row, item in enumerate(items):
        allowed[row, [ids[w] for w in spec.task.ANSWERS[item.category]]] = True
    return logits.masked_fill(~allowed, float("-inf"))


def visual_token_ids(model: Any) -> Tensor:
    config = model.config
    ids = [getattr(config, name, None) for name in ("image_token_id", "video_token_id")]
    return torch.tensor([i for i in ids if i is not None])


def evaluate(model: Any, spec: reference.FamilySpec, categories: list[str], split: str = "test",
             limit: int | None = None, batch_size: int = 32, blind: bool = False,
             before: Callable[[list[synth.Item]], None] | None = None, progress: bool = True) -> dict[str, dict]:
    """Per category: accuracy, and accuracy per background family ("simple" / "cluttered" in version 1)."""
    from tqdm.auto import tqdm

    results = {}
    for category in categories:
        items = spec.task.split_items(split, category, limit)
        hits: dict[str, list[bool]] = {}
        bar = tqdm(total=len(items), desc=f"{spec.name} {category}", disable=not progress, leave=False)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            for item, guess in zip(chunk, predict(model, spec, chunk, blind, before), strict=True):
                hits.setdefault(background_of(item), []).append(spec.task.score(guess, item.answer))
            bar.update(len(chunk))
        bar.close()
        every = [hit for group in hits.values() for hit in group]
        results[category] = {
            "accuracy": sum(every) / len(every),
            "n": len(every),
            **{f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(hits.items())},
        }
    return results


def background_of(item: Any) -> str:
    """The background family of an item: version 2 names it; version 1 has simple and cluttered ones."""
    if isinstance(item, synth_v2.Item):
        return item.background
    return "cluttered" if item.cluttered else "simple"


# ---------------------------------------------------------------------------------------------------- the oracles
@dataclass(frozen=True)
class OracleConfig(PrunerConfig):
    """Attributes:
    question_aware: rank the tokens of the objects the question asks about first.
    min_coverage: share of a token's square an object or a glyph must cover for the token to count as on it.
    """

    method = "object-oracle"
    question_aware: bool = False
    min_coverage: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.min_coverage <= 1:
            raise ValueError(f"min_coverage must be in (0, 1], got {self.min_coverage}.")


class ObjectOracle(Pruner):
    """Keeps the tokens on objects and glyphs (coverage >= ``min_coverage``, most covered first; with
    ``question_aware`` the asked objects' tokens before all others), then fills the budget with a background lattice
    (the uniform baseline's lattice mapped to the nearest tokens not yet kept). It sees the generator's scene, so it
    is an oracle, not a method (eval only): it bounds what a good selection can keep at a budget. The lattice keeps
    the background's share of the image visible: the v1 checkpoints counted objects from that share."""

    config_cls = OracleConfig
    paper = "evaluation oracle (object coverage per token)"
    status = "oracle"
    points = ("projector",)

    def __init__(self, config: OracleConfig, spec: reference.FamilySpec) -> None:
        super().__init__(config)
        self.spec = spec
        self.coverage: list[tuple[Tensor, Tensor]] = []

    def plan(self, num_layers: int) -> list[Stage]:
        return [Stage("projector")]

    def prepare(self, items: list) -> None:
        """Per-token (object, asked) coverage for the next batch, in the adapter's image order."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.coverage = []
        for item in items:
            if item.kind == "video":
                # Qwen merges two frames into one temporal token: a token is as covered as the more covered frame.
                cover = token_coverage(self.spec, item.images, self.spec.video_size // 28, device)
                self.coverage.append(tuple(c.view(-1, 2, c.shape[-1]).amax(1).flatten() for c in cover))
            else:
                cover = token_coverage(self.spec, item.images, token_side(self.spec), device)
                self.coverage.extend(zip(*(c.unbind(0) for c in cover), strict=True))

    def select(self, ctx: PruneContext) -> Selection:
        if len(self.coverage) != len(ctx.images):
            raise RuntimeError(f"oracle has coverage for {len(self.coverage)} images, the batch has "
                               f"{len(ctx.images)}.")
        keep = []
        for (on_object, asked), image in zip(self.coverage, ctx.images, strict=True):
            keep.append(self._pick(on_object.to(ctx.device)[image.original_indices],
                                   asked.to(ctx.device)[image.original_indices], image))
        return Selection(keep=keep)

    def _ranked(self, on_object: Tensor, asked: Tensor) -> tuple[Tensor, Tensor]:
        """(object / glyph tokens most covered first, with ``question_aware`` the asked ones before all; the
        background tokens in index order), as indices of the image's present tokens."""
        threshold = self.config.min_coverage
        rank = torch.where(on_object >= threshold, 1.0 + on_object, torch.zeros_like(on_object))
        if self.config.question_aware:
            rank = torch.where(asked >= threshold, 4.0 + asked, rank)
        primary = (rank > 0).nonzero().squeeze(1)
        return primary[rank[primary].argsort(descending=True, stable=True)], (rank == 0).nonzero().squeeze(1)

    def _pick(self, on_object: Tensor, asked: Tensor, image) -> Tensor:
        order, background = self._ranked(on_object, asked)
        if order.numel() >= image.budget or image.grid is None:
            return torch.cat((order, background))[: image.budget]
        wanted = lattice(image.grid[0], image.grid[1], image.budget - order.numel())
        present = image.original_indices[background]
        fill = background[nearest_present_rows(present[None], wanted, image.grid[1])[0]]
        return torch.cat((order, fill))


def token_side(spec: reference.FamilySpec) -> int:
    """Side of an image's token grid: 14-px patches, 2 x 2 merged (Qwen's merger, InternVL's pixel shuffle)."""
    return spec.image_size // (14 if spec.name == "llava" else 28)


def token_coverage(spec: reference.FamilySpec, scenes: list, side: int, device, fine: int = 4
                   ) -> tuple[Tensor, Tensor]:
    """(N, side * side) each, raster order: the share of each token's square covered by an object or a glyph, and by
    an object the question asks about (zeros where the task marks none: yardstick version 1). Known to the
    generator, hence an oracle."""
    labels = spec.task.label_maps(scenes, side * fine, device)

    def share(mask: Tensor) -> Tensor:
        return mask.float().view(len(scenes), side, fine, side, fine).mean((2, 4)).flatten(1)

    on_object = share(labels["shape"] > 0)
    asked = share(labels["asked"] > 0) if "asked" in labels else torch.zeros_like(on_object)
    return on_object, asked


def install_oracle(model: Any, spec: reference.FamilySpec, keep: float, question_aware: bool = False
                   ) -> tuple[Any, ObjectOracle]:
    """Hook the oracle into a model (bypassing the registry: it is not a user-facing method)."""
    return install_eval_pruner(model, ObjectOracle(OracleConfig(keep=keep, question_aware=question_aware), spec))


# ------------------------------------------------------------------------------------- CLS attention on objects
@dataclass(frozen=True)
class ClsTopConfig(PrunerConfig):
    method = "cls-top"


class ClsTop(Pruner):
    """Keeps the tokens the vision encoder's CLS attends to most (VisionZip's dominant tokens without its
    contextual merge), and records each image's CLS attention for the yardstick's gate (eval only)."""

    config_cls = ClsTopConfig
    paper = "evaluation probe (CLS attention top-k)"
    status = "oracle"
    points = ("projector",)
    needs = frozenset({"cls_attention"})

    def __init__(self, config: ClsTopConfig, record: bool = False) -> None:
        super().__init__(config)
        self.record = record  # keep each image's kept raster indices in ``kept`` (for ``cls_on_objects``)
        self.kept: list[Tensor] = []

    def plan(self, num_layers: int) -> list[Stage]:
        return [Stage("projector")]

    def select(self, ctx: PruneContext) -> Selection:
        keep = []
        for image in ctx.images:
            if image.cls_attention is None:
                raise ValueError("cls-top needs a vision encoder with a CLS token (CLIP, InternViT).")
            local = image.cls_attention.topk(image.budget).indices
            if self.record:
                self.kept.append(image.original_indices[local])
            keep.append(local)
        return Selection(keep=keep)


def cls_on_objects(model: Any, spec: reference.FamilySpec, items: list, keep: float = 0.11,
                   batch_size: int = 32) -> float:
    """Share of the top-``keep`` CLS-attention tokens of single images that lie on an object or a glyph (coverage
    >= 0.2): whether the CLS attention that ToDRE / VisionZip / MustDrop read points at the evidence."""
    adapter, probe = install_eval_pruner(model, ClsTop(ClsTopConfig(keep=keep), record=True))
    device = next(model.parameters()).device
    hits, total = 0, 0
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            probe.kept = []
            predict(model, spec, chunk)
            scenes = [s for it in chunk for s in it.images]
            on_object, _ = token_coverage(spec, scenes, token_side(spec), device)
            for kept, cover in zip(probe.kept, on_object, strict=True):
                hits += int((cover[kept.to(device)] >= 0.2).sum())
                total += kept.numel()
    finally:
        adapter.remove()
    return hits / total


def install_eval_pruner(model: Any, pruner: Pruner) -> tuple[Any, Pruner]:
    """Hook an eval-only pruner into a model, bypassing the registry (oracles and probes are not methods)."""
    from vtprune.engine import Engine

    engine = Engine(model)
    engine.install(pruner)
    return engine, pruner


def slice_limit(spec: reference.FamilySpec, total: int = 200) -> int:
    """Items per category of the fixed CI slice: about ``total`` items over the family's categories."""
    return -(-total // len(spec.categories))


def overall(results: dict[str, dict]) -> float:
    """Accuracy over every item of a result table (categories weighted by their item counts)."""
    items = sum(r["n"] for r in results.values())
    return sum(r["accuracy"] * r["n"] for r in results.values()) / items


def image_average(results: dict[str, dict]) -> float | None:
    """Mean accuracy over the image categories of a result table (each category weighs the same); None without
    any."""
    image = [c for c in IMAGE_CATEGORIES if c in results]
    return sum(results[c]["accuracy"] for c in image) / len(image) if image else None


def family_of(model: Any) -> reference.FamilySpec:
    """The reference family spec matching a loaded model or its config (model_type and yardstick version)."""
    config = getattr(model, "config", model)
    model_type = config.model_type
    if model_type not in reference.FAMILIES:
        raise ValueError(
            f"vtprune eval runs on the reference checkpoints ({list(reference.FAMILIES)}); this model is "
            f"'{model_type}'. Other models need a benchmark harness (the lmms-eval bridge is not built yet)."
        )
    return reference.spec_for(config)


def chance(spec: reference.FamilySpec) -> dict[str, float]:
    """Chance accuracy per category of the family's yardstick version."""
    return CHANCE if spec.version == 1 else spec.task.CHANCE


# ------------------------------------------------------------------------------------------------------- the gates
@dataclass(frozen=True)
class Gate:
    """One requirement of the yardstick (issue "Yardstick v2"), with the measured number."""

    name: str
    measured: float | None
    threshold: float
    kind: str  # ">=" or "<="

    @property
    def passed(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.threshold if self.kind == ">=" else self.measured <= self.threshold


BLIND_MARGIN = 0.05  # blind accuracy may exceed chance by this much (binomial noise at 1,000 items is ~1.5 points)


def gates(spec: reference.FamilySpec, runs: dict[str, dict], cls_share: float | None = None) -> list[Gate]:
    """The yardstick's gates for one family from its result table (``runs``: "unpruned", "blind", "oracle@0.11",
    "uniform@0.11" -> per-category results). A run that was not measured gives ``measured=None``, never a pass."""

    def acc(run: str, categories) -> float | None:
        result = runs.get(run)
        present = [c for c in categories if isinstance(result, dict) and c in result]
        return sum(result[c]["accuracy"] for c in present) / len(present) if present else None

    image = [c for c in spec.task.IMAGE_CATEGORIES if c in spec.categories]
    video = [c for c in spec.task.VIDEO_CATEGORIES if c in spec.categories]
    full, oracle, uniform = (acc(r, image) for r in ("unpruned", "oracle@0.11", "uniform@0.11"))
    out = [
        Gate("unpruned image average", full, 0.90, ">="),
        Gate("unpruned count", acc("unpruned", ["count"]), 0.80, ">="),
        Gate("unpruned glyph (text)", acc("unpruned", ["text"]), 0.80, ">="),
        Gate("unpruned in-context", acc("unpruned", list(spec.task.MULTI_CATEGORIES)), 0.80, ">="),
    ]
    if video:
        out.append(Gate("unpruned video", acc("unpruned", video), 0.80, ">="))
    chances = chance(spec)
    blind = runs.get("blind")
    if isinstance(blind, dict) and all(c in blind for c in spec.categories):
        excess = max(blind[c]["accuracy"] - chances[c] for c in spec.categories)
    else:
        excess = None
    out.append(Gate("blind: largest excess over chance", excess, BLIND_MARGIN, "<="))
    out.append(Gate("oracle@0.11 / unpruned (image)", None if oracle is None or not full else oracle / full,
                    0.95, ">="))
    out.append(Gate("oracle@0.11 - uniform@0.11 (image)", None if oracle is None or uniform is None
                    else oracle - uniform, 0.15, ">="))
    if spec.name in ("llava", "internvl"):
        out.append(Gate("top-11% CLS-attention tokens on objects", cls_share, 0.70, ">="))
    return out
