"""AnyRes tiling, shared by the LLaVA-NeXT and LLaVA-OneVision adapters: a base image, a grid of tiles, row newlines.

Token layout of one image (``pack_image_features`` in transformers, shared/ADAPTERS.md §2.2-2.3): the base tile's
h x w tokens in raster order; then the tiles stitched into one grid, cropped back to the image's aspect ratio
(``unpad_image``), for OneVision bilinearly down-sized when it exceeds ``anyres_max_N`` tiles, with the learned
``image_newline`` appended at the end of every row. An untiled image (OneVision's multi-image mode) is its base
tile plus one newline. Every slot uses ``image_token_id``, one contiguous run per image, and its length depends on
``image_sizes``.

Choices:
- One ImageLayout per image that lists only its prunable tokens, base and grid; newlines are left out. They are
  layout (the LLM reads row breaks from them), so the engine keeps them and does not count them as visual tokens.
  ``keep`` thus applies per image across base and tiles, and the pruner decides how to share it between them.
- ``grid`` is None for a tiled image: the base (h x w) and the cropped grid (rows x cols) differ in width, so no one
  raster holds both, and spatial methods fall back to token order. An untiled image gets its (h, w) grid.
- ``index_in_sample`` counts the images (and OneVision videos) of a prompt in prompt order.
- ``encoder`` / ``projector`` capture the raw tiles at the projector's input / output and re-pack them with the
  model's own steps (view, permute, ``unpad_image``, interpolation), so feature j of an image is the token at its
  j-th prunable position. The projector point is exact. Where OneVision interpolates (anyres_max down-sizing, video
  pooling) the encoder feature of a token is the same interpolation of pre-projector features: right for scoring,
  an approximation for values written back through ``project``.
- ``image_sizes`` (and OneVision's ``batch_num_images``) come from the prefill call. From transformers 5.18 on,
  ``generate`` encodes the images before that call and does not pass them, so the adapter also remembers the
  arguments of each ``get_image_features`` call (an instance-level wrapper that keeps the signature ``generate``
  inspects; ``unwrap`` removes it) and matches the encoded images the prefill receives to that call.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.adapters.common import ClipTowerCls, TokenwiseProjector
from vtprune.engine import Family, ImageLayout


@dataclass
class AnyResLayout(ImageLayout):
    """An ImageLayout plus what re-packing the raw projector features of one image or video needs.

    Attributes:
        source: index of the image (video) among the batch's images (videos), in the order the model encodes them.
        raw: how many raw tiles (base first) or frames the projector sees for it.
        image_size: (height, width) of the original image, for a tiled image.
        tiles: (rows, cols) of the tile grid of a tiled image, else None.
        packed: token grid of the stitched tiles after unpad and down-sizing (tiled image), or of one pooled frame
            (video); None for an untiled image.
    """

    source: int = 0
    raw: int = 1
    image_size: tuple[int, int] | None = None
    tiles: tuple[int, int] | None = None
    packed: tuple[int, int] | None = None


@dataclass
class VisualItem:
    """One image or video before it is placed: its layout (positions unset), slot count and prunable slots."""

    layout: AnyResLayout
    count: int  # placeholder slots, newlines included
    prunable: Tensor  # (n,) offsets of the prunable slots within its run


class _ImageCallRecorder:
    """Wraps ``owner.get_image_features`` on the instance; keeps the arguments of its last call and the per-image
    features it returned (the list object itself may later be replaced by generate's beam expansion)."""

    def __init__(self, owner: nn.Module, name: str = "get_image_features") -> None:
        self.owner, self.name = owner, name
        original = getattr(owner, name)
        signature = inspect.signature(original)
        self.arguments: dict[str, Any] | None = None
        self.images: tuple[Tensor, ...] = ()

        # functools.wraps keeps the signature: generate() filters the kwargs it passes by inspecting it.
        @functools.wraps(original)
        def recording(*args, **kwargs):
            output = original(*args, **kwargs)
            self.arguments = signature.bind(*args, **kwargs).arguments
            self.images = tuple(output.pooler_output)
            return output

        self.wrapper = recording
        setattr(owner, name, recording)

    def remove(self) -> None:
        if self.owner.__dict__.get(self.name) is self.wrapper:
            delattr(self.owner, self.name)
        self.arguments, self.images = None, ()


class AnyResAdapter(TokenwiseProjector, ClipTowerCls, Family):
    """Base of the LLaVA-NeXT and LLaVA-OneVision adapters; a subclass names its transformers modeling module."""

    modeling: ClassVar[str] = ""  # module holding the family's get_anyres_image_grid_shape / unpad_image
    # The projector is token-wise (TokenwiseProjector). CLIP (LLaVA-NeXT) has a CLS per tile, SigLIP (OneVision)
    # none (ClipTowerCls). Each tile's row is packed like its features, so every token carries the attention of its
    # own tile's CLS.

    def visual_token_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id)]

    def family_hooks(self) -> list[Any]:
        self._image_call = _ImageCallRecorder(self.inner)
        return [self._image_call]

    def _helper(self, name: str) -> Callable:
        return getattr(importlib.import_module(self.modeling), name)

    def tile_side(self) -> int:
        """Tokens along one side of a tile (24 for CLIP-L/336, 27 for SigLIP/384)."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    # --------------------------------------------------------------------------------------------------- layout
    def image_layout(self, input_ids: Tensor, visual_mask: Tensor, model_kwargs: dict[str, Any]) -> list[ImageLayout]:
        batch = input_ids.shape[0]
        per_sample: list[list[AnyResLayout]] = [[] for _ in range(batch)]
        image_id = int(self.model.config.image_token_id)
        if bool((input_ids == image_id).any()):
            self._place(input_ids == image_id, list(self._image_items(model_kwargs)), per_sample)
        for token_id, items in self._extra_items(input_ids, model_kwargs):
            self._place(input_ids == token_id, items, per_sample)
        layouts: list[ImageLayout] = []
        for entries in per_sample:
            entries.sort(key=lambda layout: int(layout.positions[0]))
            for index, layout in enumerate(entries):
                layout.index_in_sample = index
                layouts.append(layout)
        return layouts

    def _extra_items(self, input_ids: Tensor, model_kwargs: dict[str, Any]) -> Iterator[tuple[int, list[VisualItem]]]:
        """(token id, items) of other visual inputs than images (OneVision videos)."""
        return iter(())

    @staticmethod
    def _place(mask: Tensor, items: list[VisualItem], per_sample: list[list[AnyResLayout]]) -> None:
        """Give the items, in batch order, to the samples by their slot counts and set their positions."""
        remaining = iter(items)
        for sample, row in enumerate(mask):
            positions = row.nonzero().squeeze(1)
            start = 0
            while start < positions.numel():
                item = next(remaining, None)
                if item is None or start + item.count > positions.numel():
                    raise ValueError(
                        f"Sample {sample} has {positions.numel()} visual placeholders that do not add up to the token "
                        "counts of its images / videos. Build the prompt with the model's processor, from the same "
                        "images (image_sizes) the model receives. (transformers < 5.18 repeats image_sizes image by "
                        "image for num_beams / num_return_sequences > 1, which mismatches prompts with several "
                        "images: use one image per prompt there, or transformers >= 5.18.)"
                    )
                item.layout.sample = sample
                item.layout.positions = positions[start:start + item.count][item.prunable.to(positions.device)]
                per_sample[sample].append(item.layout)
                start += item.count
        if next(remaining, None) is not None:
            raise ValueError("vtprune: more images / videos were given than the prompt has placeholders for.")

    def _image_arguments(self, model_kwargs: dict[str, Any]) -> list[tuple[list[int], bool, str | None]]:
        """Per image of the batch, in the model's order: (height, width), whether it is tiled, anyres_max string."""
        config_ratio = getattr(self.model.config, "vision_aspect_ratio", None)
        if model_kwargs.get("image_sizes") is not None:
            # The model's forward does not pass vision_aspect_ratio on to get_image_features: the config's holds.
            return self._per_image(model_kwargs["image_sizes"], model_kwargs.get("batch_num_images"), config_ratio)
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        recorded = self._image_call.arguments
        if encoded is None or recorded is None:
            raise ValueError(
                "The prompt has image tokens but the model got no image_sizes. Pass the processor's image_sizes (and "
                "pixel_values) with the prompt."
            )
        ratio = recorded.get("vision_aspect_ratio") or config_ratio
        per_image = self._per_image(recorded["image_sizes"], recorded.get("batch_num_images"), ratio)
        # generate() repeats the encoded images of a prompt for beams / num_return_sequences without re-encoding
        # them, so map every image it hands the model back to the call that encoded it, by identity.
        made = self._image_call.images
        mapped = []
        for features in encoded.pooler_output:
            index = next((i for i, f in enumerate(made) if f is features), None)
            if index is None:
                raise ValueError(
                    "vtprune cannot lay out images encoded before vtprune.wrap (mm_encoder_outputs): their "
                    "image_sizes are unknown. Pass pixel_values and image_sizes instead."
                )
            mapped.append(per_image[index])
        return mapped

    @staticmethod
    def _per_image(sizes: Any, batch_num_images: Any, ratio: str | None) -> list[tuple[list[int], bool, str | None]]:
        sizes = [[int(v) for v in size] for size in (sizes.tolist() if isinstance(sizes, Tensor) else sizes)]
        if batch_num_images is None:
            tiled = [True] * len(sizes)
        else:
            counts = batch_num_images.tolist() if isinstance(batch_num_images, Tensor) else batch_num_images
            # OneVision tiles only an image that is alone in its prompt (get_image_features' need_patching).
            tiled = [n == 1 for n in counts for _ in range(n)]
        return [(size, tile, ratio) for size, tile in zip(sizes, tiled, strict=True)]

    def _image_items(self, model_kwargs: dict[str, Any]) -> Iterator[VisualItem]:
        side = self.tile_side()
        base = torch.arange(side * side)
        config = self.model.config
        for source, (size, tiled, ratio) in enumerate(self._image_arguments(model_kwargs)):
            if not tiled:
                layout = AnyResLayout(0, 0, base, (side, side), kind="image", source=source)
                yield VisualItem(layout, side * side + 1, base)
                continue
            image_size = config.vision_config.image_size
            tiles = self._helper("get_anyres_image_grid_shape")(size, config.image_grid_pinpoints, image_size)
            raw = self._helper("image_size_to_num_patches")(size, config.image_grid_pinpoints, image_size)
            stitched = torch.empty(1, tiles[0] * side, tiles[1] * side, device="meta")
            rows, cols = self._helper("unpad_image")(stitched, size).shape[1:]
            if ratio is not None:
                # anyres_max_N: OneVision shrinks a grid larger than N tiles (pack_image_features).
                scale = math.sqrt(rows * cols / (int(ratio.removeprefix("anyres_max_")) * side**2))
                if scale > 1.1:
                    rows, cols = int(rows // scale), int(cols // scale)
            grid = side * side + (torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)).flatten()
            layout = AnyResLayout(
                0, 0, base, None, kind="image", source=source, raw=raw, image_size=tuple(size), tiles=tuple(tiles),
                packed=(rows, cols),
            )
            yield VisualItem(layout, side * side + rows * (cols + 1), torch.cat((base, grid)))

    def global_view(self, image: ImageLayout) -> Tensor | None:
        view = super().global_view(image)
        if view is not None and image.tiles is not None:
            # The base tile (the whole image, resized) comes first; the stitched high-resolution tiles follow.
            view[self.tile_side() ** 2:] = False
        return view

    # ------------------------------------------------------------------------------------------------ features
    def features_per_image(self, point: str, records: list[Any], images: list[ImageLayout]) -> list[Tensor]:
        # OneVision projects images and videos in separate calls, images first.
        features = torch.cat(records)
        chunks = {}
        start = 0
        for kind in ("image", "video"):
            for layout in sorted((im for im in images if im.kind == kind), key=lambda im: im.source):
                chunks[kind, layout.source] = features[start:start + layout.raw]
                start += layout.raw
        if start != features.shape[0]:
            raise RuntimeError(
                f"vtprune: the projector saw {features.shape[0]} tiles / frames, the prompt's images and videos need "
                f"{start}. Pass the images and videos the prompt was built from (beam search with the encoder / "
                "projector points is not supported)."
            )
        return [self._pack(im, chunks[im.kind, im.source]) for im in images]

    def _pack(self, layout: AnyResLayout, raw: Tensor) -> Tensor:
        """(raw, h*w, C) tiles or frames -> (n, C) features of the prunable tokens, in placeholder order.

        reshape, not view: the encoder point's features are a slice (CLS dropped), not contiguous."""
        side = self.tile_side()
        if layout.kind == "video":
            frames = raw.reshape(raw.shape[0], side, side, -1).permute(0, 3, 1, 2).contiguous()
            pooled = nn.functional.interpolate(frames, size=list(layout.packed), mode="bilinear")
            return pooled.permute(0, 2, 3, 1).reshape(-1, raw.shape[-1])
        if layout.tiles is None:
            return raw[0]
        rows, cols = layout.tiles
        grid = raw[1:].reshape(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
        grid = grid.flatten(1, 2).flatten(2, 3)
        grid = self._helper("unpad_image")(grid, list(layout.image_size))
        if tuple(grid.shape[1:]) != layout.packed:
            grid = nn.functional.interpolate(grid[None], size=list(layout.packed), mode="bilinear")[0]
        return torch.cat((raw[0], grid.flatten(1, 2).transpose(0, 1)))
