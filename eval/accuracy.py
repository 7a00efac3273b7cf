"""Accuracy on the synth set: unpruned, pruned, blind (no visual tokens) and a pixel-saliency oracle.

The blind run and the oracle are the two checks that prove the yardstick measures visual evidence: with every
visual token hidden, accuracy must fall to chance per category; an oracle that keeps the tokens covering the
objects must beat ``random`` at keep 0.11 by a wide margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vtprune.config import PrunerConfig
from vtprune.eval import reference, synth
from vtprune.pruners.base import Pruner
from vtprune.state import PruneContext, Selection, Stage

CHANCE = {
    "colour": 1 / len(synth.COLOURS), "shape": 1 / len(synth.SHAPES), "position": 1 / len(synth.QUADRANTS),
    "count": 1 / len(synth.NUMBERS), "text": 1 / len(synth.CHARS), "incontext": 1 / 5, "motion": 1 / 4,
    "appear": 1 / len(synth.SHAPES), "order": 1 / len(synth.SHAPES),
}


@torch.no_grad()
def predict(model: Any, spec: reference.FamilySpec, items: list[synth.Item], blind: bool = False,
            before: Callable[[list[synth.Item]], None] | None = None) -> list[str]:
    """First answer word for each item (greedy: argmax of the next-token logits)."""
    device = next(model.parameters()).device
    batch = reference.encode(spec, items, device)
    if blind:
        visual = torch.isin(batch["input_ids"], visual_token_ids(model).to(device))
        batch["attention_mask"] = batch["attention_mask"] * (~visual).long()
    if before is not None:
        before(items)
    logits = model(**batch, logits_to_keep=1).logits[:, -1]
    return reference.decode_answers(spec, logits.argmax(-1))


def visual_token_ids(model: Any) -> Tensor:
    config = model.config
    ids = [getattr(config, name, None) for name in ("image_token_id", "video_token_id")]
    return torch.tensor([i for i in ids if i is not None])


def evaluate(model: Any, spec: reference.FamilySpec, categories: list[str], split: str = "test",
             limit: int | None = None, batch_size: int = 32, blind: bool = False,
             before: Callable[[list[synth.Item]], None] | None = None, progress: bool = True) -> dict[str, dict]:
    """Per category: accuracy, and accuracy on simple and cluttered backgrounds."""
    from tqdm.auto import tqdm

    results = {}
    for category in categories:
        items = synth.split_items(split, category, limit)
        hits = {"simple": [], "cluttered": []}
        bar = tqdm(total=len(items), desc=f"{spec.name} {category}", disable=not progress, leave=False)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            for item, guess in zip(chunk, predict(model, spec, chunk, blind, before), strict=True):
                hits["cluttered" if item.cluttered else "simple"].append(synth.score(guess, item.answer))
            bar.update(len(chunk))
        bar.close()
        every = hits["simple"] + hits["cluttered"]
        results[category] = {
            "accuracy": sum(every) / len(every),
            "n": len(every),
            **{f"accuracy_{k}": (sum(v) / len(v) if v else None) for k, v in hits.items()},
        }
    return results


# ----------------------------------------------------------------------------------------------------- the oracle
@dataclass(frozen=True)
class OracleConfig(PrunerConfig):
    method = "saliency-oracle"


class SaliencyOracle(Pruner):
    """Keeps the tokens that cover objects and glyphs: it sees the generator's scene, so it is an oracle, not a method
    (eval only). It bounds what a good selection can keep at a budget."""

    config_cls = OracleConfig
    paper = "evaluation oracle (object coverage per token)"
    status = "oracle"
    points = ("projector",)

    def __init__(self, config: OracleConfig, spec: reference.FamilySpec) -> None:
        super().__init__(config)
        self.spec = spec
        self.scores: list[Tensor] = []

    def plan(self, num_layers: int) -> list[Stage]:
        return [Stage("projector")]

    def prepare(self, items: list[synth.Item]) -> None:
        """Compute per-token saliency for the next batch, in the adapter's image order."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scores = []
        for item in items:
            if item.kind == "video":
                per_frame = token_saliency(item.images, self.spec.video_size // 28, device)
                scores.append(per_frame.view(-1, 2, per_frame.shape[-1]).amax(1).flatten())
            else:
                side = {"llava": 24, "qwen2_5_vl": 12, "internvl": 16}[self.spec.name]
                scores.extend(token_saliency(item.images, side, device).unbind(0))
        self.scores = scores

    def select(self, ctx: PruneContext) -> Selection:
        if len(self.scores) != len(ctx.images):
            raise RuntimeError(f"oracle has scores for {len(self.scores)} images, the batch has {len(ctx.images)}.")
        keep = []
        for scores, image in zip(self.scores, ctx.images, strict=True):
            present = scores.to(ctx.device)[image.original_indices]
            keep.append(present.topk(image.budget).indices)
        return Selection(keep=keep)


def token_saliency(scenes: list[synth.Scene], side: int, device) -> Tensor:
    """(N, side * side) saliency per token, raster order: the fraction of the token's square covered by an object
    or a glyph (known to the generator, hence an oracle), plus a small pixel-variance term to order the background.
    Pixel variance alone would rank the grey clutter of cluttered images above the objects."""
    fine = 4
    labels = synth.label_maps(scenes, side * fine, device)
    foreground = ((labels["shape"] > 0).float()).view(len(scenes), side, fine, side, fine).mean((2, 4))
    images = synth.render(scenes, side * fine * 4, device)
    cell = images.shape[-1] // side
    blocks = images.reshape(len(scenes), 3, side, cell, side, cell).permute(0, 2, 4, 1, 3, 5)
    variance = blocks.reshape(len(scenes), side * side, -1).std(-1)
    return foreground.flatten(1) + 1e-2 * variance


def install_oracle(model: Any, spec: reference.FamilySpec, keep: float) -> tuple[Any, SaliencyOracle]:
    """Hook the oracle into a model (bypassing the registry: it is not a user-facing method)."""
    from vtprune.registry import get_adapter_class

    adapter = get_adapter_class(model.config.model_type)(model)
    oracle = SaliencyOracle(OracleConfig(keep=keep), spec)
    adapter.install(oracle)
    return adapter, oracle


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
    image = [c for c in synth.IMAGE_CATEGORIES if c in results]
    return sum(results[c]["accuracy"] for c in image) / len(image) if image else None


def family_of(model: Any) -> reference.FamilySpec:
    """The reference family spec matching a loaded model (by config.model_type)."""
    model_type = model.config.model_type
    if model_type not in reference.FAMILIES:
        raise ValueError(
            f"vtprune eval runs on the reference checkpoints ({list(reference.FAMILIES)}); this model is "
            f"'{model_type}'. Other models need a benchmark harness (the lmms-eval bridge is not built yet)."
        )
    return reference.FAMILIES[model_type]
