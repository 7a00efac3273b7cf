"""CDPruner: keep the visual tokens that maximise a diversity conditioned on the instruction (Zhang et al., 2025).

Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", arXiv
2506.10967; official code github.com/Theia-4869/CDPruner (``llava/model/llava_arch.py``: ``encode_images``;
``llava/model/multimodal_encoder/clip_encoder.py``: where the CLIP image and text embeddings come from), read for
this re-implementation; no code was copied.

On the (n, D) visual tokens x of one image at the input of the LLM:
1. relevance r_i = −mean_t cos(x_i, t_t) over the prompt's text tokens t, min–max normalised over the image's tokens
   as (r − min + 1e-6) / (max − min); with ``theta`` set, r ← exp(α r), α = θ / (2(1 − θ));
2. the conditional DPP kernel L = diag(r) S diag(r), S_ij = cos(x_i, x_j);
3. greedy MAP inference of the DPP (each step: the token with the largest gain in log det L_picked, by the code's
   incremental Cholesky updates, ``vtprune.kernels.dpp_greedy``) until ``budget`` tokens are picked; they are kept
   in index order and the rest dropped. Nothing is merged.

Faithful to the official code: the similarity on the projected features (the LLM's input embeddings), the negated
mean cosine to the text as relevance with the code's min–max normalisation and its 1e-6, the kernel, the greedy
DPP with its incremental updates and first-maximum ties, ``theta`` as the code's commented-out alternative (off by
default, as there), survivors sorted, no merging, and the position convention of each family's code path
(``official_defaults``): the code gathers the kept embeddings before the LLM and lets it number them afresh on
LLaVA-style families (``positions="renumber"``); it has no Qwen version, and M-RoPE families keep original positions
(``"original"``, the only convention vtprune defines there).

Differs:
- Relevance (our adaptation): the code compares CLIP's image-patch embeddings (the vision tower's post-layernorm and
  visual projection) with CLIP's text-tower embedding of the instruction (one pooled embedding per 77-token segment,
  averaged). The VLMs vtprune wraps carry no CLIP text tower, so the relevance here is the mean cosine between each
  visual token and the LLM's input embeddings of the sample's text tokens (``ctx.text_mask`` at ``llm:0``: every
  non-visual, non-padding token, so the chat template and system prompt count as well as the question). Both sides
  are in the LLM's input space; the code's negation is kept although it was motivated by CLIP's image–text space,
  so this is an approximation of the paper's relevance, not the paper's.
- The min–max normalisation is per image (tile group, video); the code normalises over its whole (B, N) tensor, i.e.
  over all crops of all images it encodes at once (``relevance.min()`` / ``.max()`` without a dim).
- Every image of a batch is pruned on its own with its own budget, batched per group of equal-size images; the code
  runs at batch size 1 (its relevance averages over the text embeddings of every prompt of the call) with one fixed
  token count for every crop.
- All math in fp32 (the code computes the similarity in fp32, the relevance in the dtype of CLIP's embeddings).
  Where the kernel is rank-deficient (more picks than the feature dimension) the code would take the square root of
  a non-positive residual and produce NaN; the kernel treats such dependent tokens as gain 0 and fills the rest by
  index (``vtprune.kernels.reference.DPP_DEPENDENT``).
- ``where="llm:K"`` with K >= 1 (hidden states of decoder layer K's input, the text tokens contextualised) is our
  extension, with original positions. The encoder and projector points are refused (vtprune's context has no text
  there), and so are the decode points (the KV cache holds no token features).
- ``keep`` is the kept fraction (the code's ``visual_token_num`` / N); under ``budget="average"`` a drop at the LLM
  input keeps ``keep`` at every layer, so both budgets agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune import kernels
from vtprune.config import AUTO, WhereConfig
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import PruneContext, Selection


@dataclass(frozen=True)
class CDPrunerConfig(WhereConfig):
    """Attributes:
    where: "llm:K": the input of decoder layer K, where the context holds the visual tokens and the text tokens'
        hidden states; default "llm:0", the LLM's input embeddings, the code's point (it prunes the projector output
        before the LLM). K >= 1 is our extension.
    theta: None (default, as the code) uses the normalised relevance r as it is; a value in [0, 1) uses
        exp(α r) with α = θ / (2(1 − θ)), the code's commented-out alternative (θ = 0: plain diversity; larger θ
        weighs relevance more).
    positions: "auto" (default): the official code's convention for the family (see the module docstring).
    """

    method = "cdpruner"
    where: str = "llm:0"
    theta: float | None = None
    positions: str = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.point.kind != "llm":
            raise ValueError(
                f"cdpruner scores visual tokens against the prompt's text tokens, which vtprune's context holds only "
                f"at the LLM's layers; got where={self.where!r}. Use where='llm:0' (the LLM's input, the paper's "
                "point) or 'llm:K'."
            )
        theta = self.theta
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not 0.0 <= theta < 1.0):
            raise ValueError(
                f"theta={theta!r} must be None (the code's default: the relevance as it is) or a number in [0, 1) "
                "(relevance exp(alpha * r), alpha = theta / (2 (1 - theta)))."
            )


@register_pruner
class CDPrunerPruner(Pruner):
    config_cls = CDPrunerConfig
    paper = ("Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs "
             "(CDPruner, arXiv 2506.10967)")
    status = "approximation"
    points = ("llm:K",)
    flash_compatible = True
    needs_training = "none"
    official_defaults = {
        **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), {"positions": "original"}),
        "*": {"positions": "renumber"},
    }

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.hidden_states is None or ctx.text_mask is None:
            raise RuntimeError(
                f"cdpruner needs the hidden states and the text mask at {ctx.point}; the engine gave none."
            )
        # mean_t cos(x, t) = x̂ · mean_t t̂: one text centroid per sample instead of an (n, T) matrix per image.
        text = F.normalize(ctx.hidden_states.float(), dim=-1)
        mask = ctx.text_mask.float()
        centroid = torch.einsum("bl,bld->bd", mask, text) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        keep = [None] * len(ctx.images)
        for group in ctx.image_groups():
            images = [ctx.images[j] for j in group]
            if any(image.features is None for image in images):
                raise RuntimeError(f"cdpruner needs token features at {ctx.point}; the engine gave none.")
            x = F.normalize(torch.stack([image.features for image in images]).float(), dim=-1)  # (G, n, D)
            text_centroid = torch.stack([centroid[image.sample] for image in images])  # (G, D)
            relevance = self._relevance(-(x @ text_centroid.unsqueeze(2)).squeeze(2))
            kernel = relevance.unsqueeze(2) * (x @ x.transpose(1, 2)) * relevance.unsqueeze(1)
            picks = kernels.dpp_greedy(kernel, images[0].budget)
            for j, row in zip(group, picks.sort(dim=1).values, strict=True):
                keep[j] = row
        return Selection(keep=keep)

    def _relevance(self, score: Tensor) -> Tensor:
        """(G, n) negated mean text cosines -> (G, n) relevance, min–max normalised per image as the code (its 1e-6
        keeps the least relevant token's weight above 0); an image whose scores are all equal gets 1 everywhere."""
        low = score.amin(dim=1, keepdim=True)
        span = score.amax(dim=1, keepdim=True) - low
        relevance = torch.where(span > 0, (score - low + 1e-6) / span.clamp(min=torch.finfo(score.dtype).tiny), 1.0)
        theta = self.config.theta
        if theta is not None:
            relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
        return relevance
