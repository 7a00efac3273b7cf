"""The family protocol: what a model family states about itself, and the narrow view of a call it may read.

A family file (``adapters/<family>.py``) subclasses ``Family`` and states facts only: which token ids are visual,
how the visual tokens of a prompt split into images with their grids, where the vision-side features of the
``encoder`` / ``projector`` points can be read, how encoder features map into the LLM, where a CLS attention row
is, and the per-token LLM inputs it adds. It never sees the engine: what it may read of the running call comes
through ``self.view`` (a ``FamilyView``). See docs/adding_a_model.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.engine.layout import ImageLayout, encoded_index
from vtprune.kernels import attention_rows
from vtprune.point import PATTERNS

if TYPE_CHECKING:
    from vtprune.engine.core import Engine


class FamilyView:
    """What a family may read of the engine: the running call's images, its own vision-side records, and the rows
    the decoder layer running now holds. Nothing else of the engine's state."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def images(self) -> list[ImageLayout]:
        """The current prefill's images (empty outside a pruned prefill)."""
        state = self._engine.state
        return state.images if state is not None else []

    def recorder(self, key: str) -> Callable[[Any], None]:
        """A callable that records what a family's own vision-side hook saw under ``key`` for the coming prefill."""
        return self._engine.recorder(key)

    def records(self, key: str) -> list[Any]:
        """What was recorded under ``key`` for this prefill, in call order."""
        return list(self._engine.captured.get(key, []))

    def running_layer_rows(self) -> tuple[Tensor, Tensor] | None:
        """While a pruned prefill runs inside the LLM: the (B, M) rows of the LLM's input that the decoder layer
        running now holds and their valid flags; None where that layer holds the LLM's input as it came in."""
        return self._engine.running_layer_rows()


class Family(ABC):
    """Base of every family file: the facts of one model family, read by the engine through these methods."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # The insertion points the family offers, in the vocabulary of ``Pruner.points``.
    points: ClassVar[tuple[str, ...]] = PATTERNS
    # Position ids with one row per axis (M-RoPE): survivors cannot be renumbered as a shorter grid would be.
    multi_axis_positions: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = getattr(model, "model", None)
        if self.inner is None or not hasattr(self.inner, "language_model"):
            raise ValueError(
                f"{type(model).__name__} does not look like a transformers 5.x vision-language model (no "
                "model.model.language_model). Pass the ...ForConditionalGeneration model."
            )
        self.language_model = self.inner.language_model
        self.text_config = self.language_model.config
        self._view: FamilyView | None = None

    @property
    def view(self) -> FamilyView:
        if self._view is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to an engine (vtprune.engine.Engine).")
        return self._view

    def attach(self, view: FamilyView) -> None:
        """Called once by the engine that runs this family."""
        self._view = view

    @abstractmethod
    def visual_token_ids(self) -> list[int]:
        """Token ids of the visual placeholders (image and video)."""

    @abstractmethod
    def image_layout(self, input_ids: Tensor, visual_mask: Tensor, model_kwargs: dict[str, Any]) -> list[ImageLayout]:
        """Split the visual tokens of a batch into images, batch-major, in the order the model scatters them.

        ``model_kwargs`` are the keyword arguments of this prefill's ``model.model`` call (``image_sizes``,
        ``image_grid_thw``, ...); from transformers 5.18 ``generate`` encodes the images before that call, so a
        family that needs image metadata may also record it from its vision-side hooks."""

    def capture_hook(self, point: str, store: Callable[[Any], None]) -> Any:
        """Register a hook that calls ``store(features)`` with the features at ``point`` (or any record the family's
        ``features_per_image`` reads) at every vision call; return its handle."""
        raise ValueError(f"{type(self).__name__} cannot capture features at the '{point}' point; use 'llm:K'.")

    def split_captured(self, point: str, features: Tensor) -> list[Tensor]:
        """Per-image (n, C) features from what ``capture_hook`` stored."""
        raise ValueError(f"{type(self).__name__} has no per-image split of '{point}' features; use 'llm:K'.")

    def features_per_image(self, point: str, records: list[Any], images: list[ImageLayout]) -> list[Tensor]:
        """Per-image (n, C) features, in the order of ``images``, from what ``capture_hook`` stored for this prefill
        (one record per vision call). The default suits families whose vision tower runs once per prefill; a family
        that runs it once per modality (images, then videos) overrides this."""
        features = self.split_captured(point, records[-1])
        index = encoded_index(images, {"image": len(features)}, by_kind=False)
        # A count mismatch is reported by the caller, with the counts.
        return [features[i] for i in index] if index and max(index) < len(features) else features

    def vision_cls_attention(self) -> nn.Module | None:
        """The self-attention module of the vision encoder's last layer where the encoder prepends a CLS token (row 0
        of that module's input), else None (the default): pruners that need ``cls_attention`` then get None."""
        return None

    def cls_attention_row(self, attn: nn.Module, hidden: Tensor) -> Tensor:
        """(T, 1 + P, C) input of ``vision_cls_attention`` for T tiles -> (T, 1 + P) fp32 head-mean attention
        probabilities of each tile's CLS query over its CLS (column 0) and its P patches.

        Projects the query of the CLS row only and the keys of all rows: O(T·P·C), not the layer's O(T·P²·C), and
        independent of the attention backend the encoder runs. The default suits CLIP and InternViT (``q_proj``,
        ``k_proj``, ``num_heads``, ``head_dim``, ``scale``; InternViT's ``q_norm`` / ``k_norm`` act on the full
        width, before the split into heads)."""
        tiles, length = hidden.shape[:2]
        query, key = attn.q_proj(hidden[:, :1]), attn.k_proj(hidden)
        if hasattr(attn, "q_norm"):
            query, key = attn.q_norm(query), attn.k_norm(key)
        query = query.reshape(tiles, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        key = key.reshape(tiles, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        # A ViT attends both ways; the kernel is causal, so the query is placed last, where it sees every key.
        last = torch.full((tiles, 1), length - 1, dtype=torch.long, device=hidden.device)
        return attention_rows(query, key, last, None, attn.scale)[:, 0]

    def cls_attention_tokens(self, rows: Tensor) -> Tensor:
        """(T, 1 + P) rows of ``cls_attention_row`` for one vision call -> (T, t, 1): each tile's CLS attention per
        token, laid out as the encoder point's capture, so that ``features_per_image`` splits and packs it like
        features. The default drops the CLS column: the encoder point holds the patches only."""
        return rows[:, 1:, None]

    def vision_score_attention(self) -> nn.Module | None:
        """The self-attention module of the vision encoder layer whose output the model consumes, where the family's
        image tokens are one patch each of a single tile (so that ``encoder_attention`` can number its queries as
        the image's tokens), else None (the default): pruners that need ``encoder_attention`` then get None."""
        return None

    def attention_matrix(self, attn: nn.Module, hidden: Tensor) -> Tensor:
        """(T, S, C) input of ``vision_score_attention`` for T tiles -> (T, S, S) fp32 head-mean attention
        probabilities (query rows, key columns). Projects q and k for every row, O(T·S²·C), once per vision call,
        independent of the attention backend. The default suits CLIP and SigLIP (``q_proj``, ``k_proj``,
        ``num_heads``, ``head_dim``, ``scale``; no rotary embedding)."""
        tiles, length = hidden.shape[:2]
        query = attn.q_proj(hidden).reshape(tiles, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        key = attn.k_proj(hidden).reshape(tiles, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        logits = query.float() @ key.float().transpose(-1, -2) * attn.scale
        return logits.softmax(dim=-1).mean(dim=1)

    def encoder_attention_tokens(self, matrix: Tensor) -> Tensor:
        """(T, S, S) ``attention_matrix`` of one vision call -> (T, t, t): per tile, for each of its t image tokens
        the attention it receives from each of them ([tile, i, k] = A[k, i]), laid out as the encoder point's
        capture. Only called where ``vision_score_attention`` is not None. The default suits a CLIP-style tower
        whose sequence is one CLS and then the image's patches (as ``cls_attention_tokens``): it drops the CLS."""
        return matrix[:, 1:, 1:].transpose(1, 2)

    def vision_pixel_module(self) -> nn.Module | None:
        """A module whose first input is the (T, 3, H, W) pixel values the vision encoder embeds (the patch
        embedding), where the family's image tokens are one patch each; else None (the default): pruners that
        need ``patch_pixels`` then get None."""
        return None

    def patch_pixel_tokens(self, pixels: Tensor) -> Tensor:
        """(T, 3, H, W) input of ``vision_pixel_module`` -> (T, t, 3·p·p) each image token's patch pixels, laid out
        as the encoder point's capture. Only called where ``vision_pixel_module`` is not None. The default cuts
        square patches of the vision config's ``patch_size`` in raster order, one per image token."""
        size = self.model.config.vision_config.patch_size
        patches = pixels.unfold(2, size, size).unfold(3, size, size)  # (T, 3, h, w, p, p)
        return patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (T, h·w, 3·p·p), raster order

    def global_view(self, image: ImageLayout) -> Tensor | None:
        """(n,) bool over an image's prunable tokens, True for its whole-image view; None for a video. The default
        suits families without tiles: every token of an image."""
        if image.kind == "video":
            return None
        return torch.ones(image.positions.numel(), dtype=torch.bool, device=image.positions.device)

    def family_hooks(self) -> list[Any]:
        """Register hooks the family needs on every call (e.g. to record image metadata that ``generate`` no longer
        passes to the model); return their handles (anything with ``remove()``)."""
        return []

    def prune_llm_kwargs(self, kwargs: dict[str, Any], index: Tensor, valid: Tensor) -> None:
        """Prune, in ``kwargs``, the LLM inputs besides embeddings, positions and mask that hold one entry per token
        (Qwen3-VL's deepstack features). The LLM's input is now the (B, M) original rows ``index``; slots with
        ``valid`` False are fillers. Called once per prefill, after the LLM-entry stages."""
        return None

    def layer0_rows_dropped(self, count: int) -> None:
        """Decoder layer 0's cache now holds ``count`` fewer prompt rows than before (LLM-entry pruning, or a decode
        policy at layer 0): families that derive decode positions from the cache length correct them here."""
        return None

    def project(self, encoder_features: Tensor) -> Tensor:
        """Map (n, C_vis) encoder features to the LLM's embedding space, for values written at the encoder point."""
        raise ValueError(
            f"{type(self).__name__} cannot map encoder-point values into the LLM space; write values at the "
            "'projector' point instead."
        )
