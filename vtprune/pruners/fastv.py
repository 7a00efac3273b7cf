"""FastV: drop the visual tokens the last token attends to least, after LLM layer K (Chen et al., ECCV 2024).

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large Vision-Language
Models", arXiv 2403.06764; official code github.com/pkunlp-icler/FastV (read for this re-implementation; no code
was copied).

At the input of decoder layer K (``where="llm:K"``, default K = 2 as the code's ``fastv_k``), every visual token is
scored by the attention the prompt's last token pays it in layer K−1, averaged over heads; each image keeps its
``budget`` highest-scored tokens and the rest are dropped from layer K on (their keys and values too).

Faithful to the official code: K = 2, the last token's head-mean attention of layer K−1 as the score, top-k among
the image tokens only, survivors at their original positions (in-LLM method: ``positions="original"``), layers
before K untouched.

Differs:
- The attention row comes from vtprune's probe (layer K−1's query of the last token against its cached keys), not
  from ``output_attentions``: the same numbers, with sdpa and FlashAttention (the official code needs eager
  attention).
- ``keep`` is the fraction kept; the code's ``fastv_r`` is the fraction dropped (its default R = 50% is
  ``keep=0.5``). Under ``budget="average"`` the kept share at layer K is solved so the mean over all layers is
  ``keep`` (the convention of the FastV / PDrop tables).
- One top-k per image (per video, per InternVL tile group) with its own budget; the code ranks all image tokens of
  its single image together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import WhereConfig
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import PruneContext, Selection


@dataclass(frozen=True)
class FastVConfig(WhereConfig):
    """Attributes:
    where: "llm:K" with K >= 1: the decoder layer at whose input the tokens are dropped, scored by layer K−1's
        attention (default "llm:2", the paper's K). ``vtprune.calibrate`` may pick K in 1..4.
    """

    method = "fastv"
    search_space = {"where": ("choice", ("llm:1", "llm:2", "llm:3", "llm:4"))}  # for vtprune.calibrate
    where: str = "llm:2"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.point.kind != "llm" or self.point.layer < 1:
            raise ValueError(
                f"fastv scores tokens by the attention of decoder layer K-1, so it drops at 'llm:K' with K >= 1; "
                f"got where={self.where!r}. The paper's setting is where='llm:2'."
            )


@register_pruner
class FastVPruner(Pruner):
    config_cls = FastVConfig
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, ECCV'24, arXiv 2403.06764)"
    status = "faithful"
    points = ("llm:K",)
    flash_compatible = True
    needs_training = "none"

    def select(self, ctx: PruneContext) -> Selection:
        return top_last_token_attention(ctx, "fastv")


def top_last_token_attention(ctx: PruneContext, method: str) -> Selection:
    """Per image, its ``budget`` present tokens with the largest head-mean attention from the prompt's last token in
    layer K-1 (the probe's rows), ties to the earlier token. Shared by FastV and PyramidDrop (each of its stages)."""
    if ctx.attention_rows is None or ctx.attention_mask is None:
        raise RuntimeError(f"{method} needs the attention rows of layer K-1 from the engine (an 'llm:K' stage).")
    batch, length = ctx.attention_mask.shape
    # The prompt's last token is the last row of every sample (padding and fillers sit on the left).
    last = torch.full((batch, 1), length - 1, dtype=torch.long, device=ctx.device)
    scores = ctx.attention_rows(last)[:, 0]
    keep = []
    for image in ctx.images:
        image_scores = scores[image.sample].gather(0, image.positions)
        # Stable: equal scores keep the earlier token, whatever the device's top-k does with ties.
        keep.append(torch.argsort(image_scores, descending=True, stable=True)[: image.budget])
    return Selection(keep=keep)
