"""The engine's per-call bookkeeping: which original rows each group of decoder layers holds, and the call state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtprune.engine.layout import ImageLayout
from vtprune.state import CallStats, Stage


@dataclass
class RowGroup:
    """Decoder layers [start, next group's start) share one kept sequence.

    index/valid: (B, M) positions into the original sequence of the rows these layers hold (fillers: valid False).
    """

    start: int
    index: Tensor
    valid: Tensor
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    identity: bool = False

    def inverse(self, length: int) -> Tensor:
        """(B, length) original position -> row in this group's sequence, -1 where dropped."""
        rows = torch.arange(self.index.shape[1], device=self.index.device).expand_as(self.index)
        rows = torch.where(self.valid, rows, torch.full_like(rows, -1))
        inv = torch.full((self.index.shape[0], length), -1, dtype=torch.long, device=self.index.device)
        # amax so that filler rows (which point at position 0 with -1) never overwrite a real entry.
        return inv.scatter_reduce(1, self.index, rows, reduce="amax")

    def translate_mask(self, mask2d: Tensor, orig_len: int) -> Tensor:
        """Map a 2-D mask in original coordinates (prompt + generated) to this group's rows."""
        prompt = mask2d[:, :orig_len].gather(1, self.index) * self.valid.to(mask2d.dtype)
        return torch.cat((prompt, mask2d[:, orig_len:]), dim=1)


@dataclass
class CallState:
    visual_mask: Tensor  # (B, L) bool: the prunable visual tokens, i.e. the positions the images list
    text_mask: Tensor  # (B, L) bool: tokens that are not visual placeholders
    orig_len: int
    images: list[ImageLayout]
    kept: list[Tensor]  # per image: indices into its original tokens still present
    alive: list[int]  # per sample: prompt positions still present (padding included), kept on the host
    unpadded: bool  # the prompt's attention mask had no padding (known on the host)
    prefill_stages: list[Stage]
    decode_stages: list[Stage]
    groups: list[RowGroup] = field(default_factory=list)
    mask2d: Tensor | None = None  # (B, L) original prefill mask
    decode_mask2d: Tensor | None = None  # this decode step's mask in original coordinates
    phase: str = "prefill"
    layer: int = 0  # the decoder layer running now (set by its pre-hook)
    probe_inputs: dict[int, tuple[Tensor, tuple[Tensor, Tensor], Any]] = field(default_factory=dict)
    stats: CallStats = field(default_factory=CallStats)
    # Per optional ImageTokens field the pruner needs: per image, its value over the image's original tokens.
    image_extras: dict[str, list[Tensor | None]] | None = None
    # positions="renumber": (B,) original minus renumbered position of the last prompt row, taken off every decode
    # step's position ids.
    position_shift: Tensor | None = None
    # Device-side checks of the selections (stage, image, (out of range, duplicate)), read at the end of the call.
    checks: list[tuple[Stage, int, Tensor]] = field(default_factory=list)
