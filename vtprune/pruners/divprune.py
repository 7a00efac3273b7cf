"""DivPrune: keep the most diverse visual tokens, as a max–min diversity problem (Alvar et al., CVPR 2025).

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", arXiv 2503.02175; official code
github.com/vbdi/divprune (``LLaVA/llava/model/llava_arch.py``: ``DivPrune``, ``pairwise_cosine_similarity`` and the
pruning in ``prepare_inputs_labels_for_multimodal``), read for this re-implementation; no code was copied.

On the (n, C) visual tokens of one image after the projector (the LLM's input embeddings), with the cosine
distance d = 1 − cos:
1. the first pick is the token farthest from its nearest other token (the code's second-smallest distance per
   column: the smallest is the token itself);
2. each further pick is the token whose distance to its nearest pick is largest (greedy max–min / k-center), until
   ``budget`` tokens are kept; the rest are dropped before the LLM. Nothing is merged.

Faithful to the official code: the projector point (the code selects among ``new_input_embeds``' visual rows), the
cosine distance, the first pick and the max–min greedy rule, no merging, and the position convention of each
family's code path (``official_defaults``): for LLaVA-style families the code gathers the kept embeddings and lets
the model number them afresh, so survivors get contiguous positions (``positions="renumber"``); the code has no
Qwen version, and M-RoPE families keep original positions (``"original"``, the only convention vtprune defines
there).

Differs:
- Every image, tile group and video of a batch is pruned on its own with its own budget, batched per group of
  equal-size images on the device (``vtprune.kernels.diverse_subset``: one GEMM, then the greedy loop, one Triton
  launch on GPU); the code prunes one image at batch size 1 at a hard-coded offset (``SYS_TOKEN_LEN = 35``).
- Similarities in fp32 (the code uses the model's dtype); picks exclude tokens already kept (the code relies on
  their zero distance to themselves), which differs only when tokens are exact duplicates. Ties go to the lower
  index, as ``torch.argmax`` in the code.
- ``keep`` is the kept fraction (the code's ``SUBSET_RATIO``); under ``budget="average"`` a drop before the LLM
  keeps ``keep`` at every layer, so both budgets agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune import kernels
from vtprune.config import AUTO, WhereConfig
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import PruneContext, Selection


@dataclass(frozen=True)
class DivPruneConfig(WhereConfig):
    """Attributes:
    where: insertion point with features: "projector" (default, the code's: the LLM's input embeddings),
        "encoder" (the vision features before the projector) or "llm:K" (hidden states at decoder layer K's
        input; our extension).
    positions: "auto" (default): the official code's convention for the family (see the module docstring).
    """

    method = "divprune"
    where: str = "projector"
    positions: str = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.point.kind == "decode":
            raise ValueError(
                f"divprune selects among token features, which the KV cache does not hold; got where={self.where!r}. "
                "Use where='projector' (the paper's point), 'encoder' or 'llm:K'."
            )


@register_pruner
class DivPrunePruner(Pruner):
    config_cls = DivPruneConfig
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR'25, arXiv 2503.02175)"
    status = "faithful"
    points = ("encoder", "projector", "llm:K")
    flash_compatible = True
    needs_training = "none"
    official_defaults = {
        **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), {"positions": "original"}),
        "*": {"positions": "renumber"},
    }

    def select(self, ctx: PruneContext) -> Selection:
        keep = [None] * len(ctx.images)
        for group in ctx.image_groups():
            images = [ctx.images[j] for j in group]
            if any(image.features is None for image in images):
                raise RuntimeError(f"divprune needs token features at {ctx.point}; the engine gave none.")
            x = F.normalize(torch.stack([image.features for image in images]).float(), dim=-1)
            picks = kernels.diverse_subset(x, "isolated", images[0].budget, "kcenter")
            for j, row in zip(group, picks, strict=True):
                keep[j] = row
        return Selection(keep=keep)

