"""What flows between an adapter and a pruner during one forward: the context, the selection, and the stats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtprune.point import Point


@dataclass(frozen=True)
class Stage:
    """One place where a pruner drops tokens.

    Attributes:
        point: where (a ``Point``; a string such as "llm:2" is parsed): "encoder", "projector", "llm:K" (input of
            decoder layer K) or "decode:K" (KV cache of layers >= K, after prefill).
        fraction: visual tokens left after this stage, as a fraction of the image's original count; None (the
            default) sizes the stage from the config's ``keep`` and ``budget`` (``vtprune.budget.size_plan``).
        adaptive: the pruner may keep fewer tokens than ``fraction`` says, down to none, depending on the input
            (ToDRE's relevance check); ``fraction`` is then an upper bound and budgets do not count the stage.
    """

    point: Point
    fraction: float | None = None
    adaptive: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "point", Point.parse(self.point))
        fraction = self.fraction
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0.0 < fraction <= 1.0):
            raise ValueError(f"Stage at '{self.point}': fraction={fraction!r} must be None or in (0, 1].")

    @property
    def layer(self) -> int:
        """The decoder layer the stage acts at (0 for the points before the LLM)."""
        return self.point.layer


# Per-image fields an adapter fills only for pruners that list them in ``needs`` (they cost a vision-side hook or
# per-image work that other methods should not pay for).
OPTIONAL_IMAGE_FIELDS = ("cls_attention", "global_view", "encoder_attention", "patch_pixels")


@dataclass
class ImageTokens:
    """The visual tokens of one image (or tile group, or video) as one stage sees them.

    Attributes:
        sample: batch row the image belongs to.
        index_in_sample: 0 for the first image of that prompt, 1 for the second, ...
        grid: (rows, cols) of the image's original token grid, or None where the family has no single grid.
        original_indices: (n,) indices of the tokens still present into the image's original tokens (raster order).
        positions: (n,) positions of those tokens in the current hidden sequence (llm / decode stages), else None.
        features: (n, C) features at this insertion point, or None where the point has none (decode).
        budget: how many of the n tokens this stage must keep.
        cls_attention: (n,) fp32 head-mean attention probabilities of the vision encoder's CLS query over the present
            tokens, from the encoder's final layer (even where the features come from an earlier one, as LLaVA's
            layer -2). Softmax over the CLS and all patches; the CLS-to-CLS entry is left out and the rest is not
            renormalised (where LLaVA's "full" feature strategy keeps the CLS as an image token, its entry is 0). A
            token made of several patches (InternVL's pixel shuffle) gets their summed attention; the tokens of an
            AnyRes tile get the attention of that tile's own CLS. Only where the pruner asks for it (its ``needs``),
            at the encoder and projector points, for images and videos of families whose encoder has a CLS token
            (a video's row spans its frames, each token with its own frame's CLS attention); None elsewhere
            (SigLIP, Qwen's ViTs, LLM stages).
        global_view: (n,) bool, True for the present tokens of the image's whole-image view: the base image of an
            AnyRes image, the thumbnail tile of a multi-tile InternVL image, every token of a single-view image
            (layout tokens such as row newlines are never image tokens). Only where the pruner asks for it, at the
            encoder and projector points; None elsewhere and for videos.
        encoder_attention: (n, S) fp32 head-mean self-attention probabilities of the vision encoder at the layer
            whose output the model consumes (LLaVA's ``vision_feature_layer``), laid out per token: row i holds the
            attention token i *receives* from each of the S query tokens of its image (entry [i, k] = A[k, i]), the
            queries numbered as the image's original tokens, so S = the image's original token count. Softmax over
            every token of the layer (a CLS included); rows and columns of non-image tokens (the CLS under LLaVA's
            "default" strategy) left out, the rest not renormalised. Only where the pruner asks for it, at the encoder
            and projector points, for families whose image tokens are one encoder patch each on a single tile (LLaVA);
            None elsewhere.
        patch_pixels: (n, 3·p·p) the pixel values of each token's p x p patch as the vision encoder got them (still
            normalised by the processor's mean and std), channel-major (c, y, x). Only where the pruner asks for it,
            at the encoder and projector points, for the families that give ``encoder_attention``; None elsewhere.
    """

    sample: int
    index_in_sample: int
    grid: tuple[int, int] | None
    original_indices: Tensor
    positions: Tensor | None
    features: Tensor | None
    budget: int
    cls_attention: Tensor | None = None
    global_view: Tensor | None = None
    encoder_attention: Tensor | None = None
    patch_pixels: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.original_indices.shape[0])

    def grid_coords(self) -> Tensor:
        """(n, 2) float (row, col) of each present token in its original grid."""
        if self.grid is None:
            raise ValueError("This image has no token grid; spatial methods need an adapter that provides one.")
        cols = self.grid[1]
        idx = self.original_indices
        return torch.stack((idx // cols, idx % cols), dim=-1).to(torch.float32)


@dataclass
class PruneContext:
    """Everything a pruner may read at one stage. Pruners talk to the model only through this object.

    Attributes:
        point: the stage's insertion point (``Point``: ``point.kind``, ``point.layer``).
        num_layers: decoder layers of the LLM.
        images: one entry per image, batch-major, in prompt order.
        hidden_states: (B, L, D) current hidden states (llm stage), else None.
        attention_mask: (B, L) 1 for real tokens of the current sequence (llm / decode stages), else None.
        text_mask: (B, L) bool, True for the non-visual, non-padding tokens of the current sequence (llm / decode
            stages), else None. ``text_positions`` lists them per sample.
        attention_rows: for llm stages at layer >= 1, ``attention_rows(query_positions (B, Q)) -> (B, Q, L)``:
            head-mean attention probabilities of layer K-1 for those query rows (softmax in fp32), computed by the
            probe kernel so any attention backend works. None elsewhere.
        attention_keys: for the same stages, ``attention_keys() -> (B, Hkv, L, Dh)``: layer K-1's post-RoPE keys of
            the current sequence (read from its cache layer where it holds them), for methods that rank tokens by
            their keys. None elsewhere.
        cache: the KV cache (decode stage), else None.
    """

    point: Point
    num_layers: int
    images: list[ImageTokens]
    hidden_states: Tensor | None = None
    attention_mask: Tensor | None = None
    text_mask: Tensor | None = None
    attention_rows: Callable[[Tensor], Tensor] | None = None
    attention_keys: Callable[[], Tensor] | None = None
    cache: Any = None

    @property
    def text_positions(self) -> list[Tensor] | None:
        """Per sample, (T_b,) positions of the text tokens in the current sequence. The lengths differ per sample,
        so this syncs with the device; methods that can work on ``text_mask`` should."""
        if self.text_mask is None:
            return None
        return [row.nonzero().squeeze(1) for row in self.text_mask]

    def __post_init__(self) -> None:
        self.point = Point.parse(self.point)

    @property
    def layer(self) -> int:
        return self.point.layer

    @property
    def device(self) -> torch.device:
        return self.images[0].original_indices.device

    def image_groups(self) -> list[list[int]]:
        """Indices into ``images`` of the images that share a token count and a budget, so that a method can batch
        each group into one (G, n, C) tensor instead of looping over images."""
        groups: dict[tuple[int, int], list[int]] = {}
        for j, image in enumerate(self.images):
            groups.setdefault((image.num_tokens, image.budget), []).append(j)
        return list(groups.values())


@dataclass
class Selection:
    """A pruner's answer: for each image of the context, which of its tokens to keep.

    Attributes:
        keep: per image, (k,) long indices into that image's tokens as the context listed them (any order).
        values: optional per image (k, C) replacement features for the kept tokens, in the order of ``keep``, for
            methods that fuse dropped tokens into kept ones; None keeps the features as they are.
    """

    keep: list[Tensor]
    values: list[Tensor | None] | None = None


@dataclass
class StageStats:
    """What one stage did. ``values``: per image, the (k, D) LLM-space rows the adapter wrote into the kept slots
    (encoder-point values after ``project``), in the order of ``kept``; None for an image (or for the whole stage)
    whose kept tokens went on unchanged."""

    point: Point
    kept: list[Tensor]  # per image: kept indices into the original visual tokens
    seconds: float
    values: list[Tensor | None] | None = None

    @property
    def layer(self) -> int:
        return self.point.layer


@dataclass
class CallStats:
    """Stats of the last prefill, filled by the adapter; read through ``model.vtprune.last_stats``."""

    image_sample: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    image_grid: list[tuple[int, int] | None] = field(default_factory=list)  # per image, (rows, cols) or None
    stages: list[StageStats] = field(default_factory=list)
    tokens_per_layer: Tensor | None = None  # (B, num_layers) visual tokens processed by each decoder layer

    def written_values(self, sample: int, stage: int = -1) -> list[Tensor | None] | None:
        """Per image of batch row ``sample``, the (k, D) rows stage ``stage`` wrote into its kept slots (see
        ``StageStats.values``); None where the stage wrote none. Kept out of ``as_dict``, which stays JSON-friendly
        and only flags such stages with ``"wrote_values"``."""
        values = self.stages[stage].values
        if values is None:
            return None
        return [values[j] for j, s in enumerate(self.image_sample) if s == sample]

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python view (this converts device tensors, so it syncs; call it outside hot loops)."""
        per_layer = self.tokens_per_layer.tolist() if self.tokens_per_layer is not None else []
        samples = []
        for b, layers in enumerate(per_layer):
            images = [j for j, s in enumerate(self.image_sample) if s == b]
            samples.append(
                {
                    "visual_tokens": sum(self.image_tokens[j] for j in images),
                    "tokens_per_layer": layers,
                    "K_in": layers[0] if layers else 0,
                    "K_avg": sum(layers) / len(layers) if layers else 0.0,
                    "stages": [_stage_dict(st, images) for st in self.stages],
                }
            )
        return {"samples": samples}


def _stage_dict(stage: StageStats, images: list[int]) -> dict[str, Any]:
    out = {
        "point": stage.point.kind,
        "layer": stage.point.layer,
        "kept": [stage.kept[j].tolist() for j in images],
        "seconds": stage.seconds,
    }
    if stage.values is not None:
        out["wrote_values"] = [stage.values[j] is not None for j in images]
    return out
