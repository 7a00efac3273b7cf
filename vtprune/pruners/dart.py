"""DART: keep the visual tokens least duplicated with a few pivot tokens, after LLM layer K (Wen et al., 2025).

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More", arXiv
2502.11494; official code github.com/ZichenWen1/DART (read for this re-implementation at its last commit by the
authors, 5a19452 of 2025-08-31, through a fork's mirror: ``llava/model/language_model/modeling_llama_self.py``,
``DART.forward`` and ``DART.get_retained_image_token``; ``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py``; the
eval scripts ``scripts/v1_5/eval/*.sh`` and ``Qwen2-VL/eval_scripts/lmms_eval.sh``; no code was copied).

At the input of decoder layer K (``where="llm:K"``, default K = 2 as the scripts' ``--pruned_layer 2``), each image
picks pivots: its ``pivot_image_tokens`` visual tokens of largest L1 norm (4, the scripts' ``--pivot_image_token``)
and the ``pivot_text_tokens`` tokens of largest L1 norm among the text after the image (4,
``--pivot_text_token``). The image pivots are kept. The rest of the image's budget is split evenly among all
pivots, and the pivots take turns: each keeps its share of the not-yet-kept visual tokens with the lowest cosine
similarity to it, i.e. the tokens least duplicated with it. Every other visual token is dropped from layer K on
(keys and values too).

Faithful to the official code: K = 2; 4 image + 4 text pivots by L1 norm; text pivot candidates = every token after
the image (question and assistant prefix; the code's ``image_token_start_index + image_token_length:``); image
pivots kept and not candidates; text pivots only score (never kept as visual tokens: they are text and stay
anyway); the pivots walk one after the other, each taking the lowest-cosine tokens not taken yet; survivors at their
original positions (in-LLM method: ``positions="original"``; the code gathers ``position_ids = keep_indexs``);
layers before K untouched; no attention weights needed, so any attention backend works (the scripts run sdpa and
FlashAttention-2).

Differs:
- Pivot norms: as the code, the L1 norm of layer K−1's post-RoPE keys, every head concatenated
  (``ctx.attention_keys``, read from that layer's cache; the code repeats the KV heads of grouped-query attention,
  which scales every norm alike and ranks the same). ``pivot_source="hidden"`` ranks by the norm of the hidden
  states entering layer K instead (``pivot_norm="l2"``: L2 norms).
- Cosine: the code compares the hidden states after the model's *final* RMSNorm (``self.norm`` applied to layer
  K−1's output), i.e. cos(w ⊙ h) with the norm's per-channel weight w; here cos(h) of the same hidden states (the
  per-token RMS scale cancels in a cosine, the channel weights do not). Computed in fp32.
- Budget: the code gives each of the P = 4 + 4 pivots ``budget // P`` tokens on top of the 4 kept image pivots, so
  it keeps 4 + 8·16 = 132 for ``--max_num_trunction 128``. Here the image pivots count in the budget and the
  remaining budget − 4 is split as evenly as possible (the first pivots one more), so exactly ``budget`` tokens stay
  as every vtprune method does (``budget="average"`` solves the kept share at layer K so that the mean over all
  layers is ``keep``). With fewer than 4 text tokens after the image, the shares go to the pivots there are; with a
  budget below ``pivot_image_tokens``, the top-budget image pivots alone are kept.
- Pivot order: the code walks its pivots in the iteration order of a Python ``set`` of their positions (an
  artefact of hashing); here the image pivots first, then the text pivots, each by decreasing norm.
- One selection per image (per video, per InternVL tile group), with the text after that image; the code handles
  one image per prompt (batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.config import WhereConfig
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection

PIVOT_NORMS = {"l1": 1, "l2": 2}
PIVOT_SOURCES = ("keys", "hidden")


@dataclass(frozen=True)
class DARTConfig(WhereConfig):
    """Attributes:
    where: "llm:K" with K >= 1: the decoder layer at whose input the duplicated tokens are dropped (default
        "llm:2", the official ``--pruned_layer``); the pivots and cosines come from the hidden states there, the
        output of layer K−1.
    pivot_image_tokens: visual pivots per image, the image's tokens of largest norm; kept (official: 4). >= 1.
    pivot_text_tokens: text pivots per image, the tokens of largest norm among the text after the image; they only
        score (official: 4). 0 uses image pivots alone.
    pivot_norm: the norm that ranks pivot candidates, "l1" (official) or "l2".
    pivot_source: what is normed: "keys" (official: layer K−1's post-RoPE keys) or "hidden" (the hidden states
        entering layer K).
    """

    method = "dart"
    # vtprune.calibrate's choices: the layer and the pivot counts (the paper ablates both), norm and source.
    search_space = {"where": ("choice", ("llm:1", "llm:2", "llm:3", "llm:4")), "pivot_image_tokens": ("int", 1, 16),
                    "pivot_text_tokens": ("int", 0, 16), "pivot_norm": ("choice", ("l1", "l2"))}
    where: str = "llm:2"
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4
    pivot_norm: str = "l1"
    pivot_source: str = "keys"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.point.kind != "llm" or self.point.layer < 1:
            raise ValueError(
                f"dart picks its pivots from the output of decoder layer K-1, so it drops at 'llm:K' with K >= 1; "
                f"got where={self.where!r}. The official setting is where='llm:2'."
            )
        for name, low in (("pivot_image_tokens", 1), ("pivot_text_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
            if value < low:
                raise ValueError(f"{name}={value} must be >= {low} (the official code uses 4).")
        if self.pivot_source not in PIVOT_SOURCES:
            raise ValueError(
                f"pivot_source={self.pivot_source!r} is not one of {list(PIVOT_SOURCES)}; the official code ranks "
                "by the keys."
            )
        if self.pivot_norm not in PIVOT_NORMS:
            raise ValueError(
                f"pivot_norm={self.pivot_norm!r} is not one of {list(PIVOT_NORMS)}; the official code ranks by 'l1'."
            )


def pivot_shares(valid: Tensor, remaining: int) -> Tensor:
    """(G, P) bool valid pivots, in walking order -> (G, P) long tokens each pivot keeps: ``remaining`` split as
    evenly as possible over the valid pivots of a row, the first ones one more; 0 for invalid pivots."""
    count = valid.sum(1, keepdim=True).clamp(min=1)
    base, extra = remaining // count, remaining % count
    rank = valid.long().cumsum(1) - 1
    return torch.where(valid, base + (rank < extra).long(), torch.zeros_like(rank))


def least_duplicated(similarity: Tensor, available: Tensor, shares: Tensor) -> Tensor:
    """The pivots' turns: pivot p keeps the ``shares[:, p]`` available tokens least cosine-similar to it.

    Args:
        similarity: (G, P, n) cosine similarity of each pivot to each visual token.
        available: (G, n) bool, tokens not kept yet (the image pivots are already kept).
        shares: (G, P) long, tokens each pivot keeps (never more than are still available).

    Returns:
        (G, n) bool, the tokens the pivots kept.
    """
    available = available.clone()
    n = similarity.shape[-1]
    ranks = torch.arange(n, device=similarity.device).expand_as(available)
    for p in range(similarity.shape[1]):
        scores = similarity[:, p].masked_fill(~available, float("inf"))
        # Stable: equal similarities keep the earlier token, whatever the device's sort does with ties.
        order = torch.argsort(scores, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, ranks)
        available &= ~(rank < shares[:, p : p + 1])
    return ~available


@register_pruner
class DARTPruner(Pruner):
    config_cls = DARTConfig
    paper = (
        "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More (DART, arXiv "
        "2502.11494)"
    )
    status = "approximation"
    points = ("llm:K",)
    flash_compatible = True
    needs_training = "none"

    def select(self, ctx: PruneContext) -> Selection:
        if ctx.hidden_states is None or ctx.text_mask is None:
            raise RuntimeError("dart needs the hidden states and text mask of an 'llm:K' stage from the engine.")
        hidden = ctx.hidden_states.float()
        ranked = hidden
        if self.config.pivot_source == "keys":
            if ctx.attention_keys is None:
                raise RuntimeError("dart needs layer K-1's keys from the engine (an 'llm:K' stage with K >= 1).")
            ranked = ctx.attention_keys().float().transpose(1, 2).flatten(2)  # (B, L, Hkv * Dh)
        norms = ranked.norm(p=PIVOT_NORMS[self.config.pivot_norm], dim=-1)  # (B, L)
        keep = [torch.arange(image.num_tokens, device=ctx.device) for image in ctx.images]
        for group in ctx.image_groups():
            images = [ctx.images[j] for j in group]
            if images[0].budget >= images[0].num_tokens:
                continue
            chosen = self._select_group(hidden, norms, ctx.text_mask, images)
            for row, j in enumerate(group):
                keep[j] = chosen[row]
        return Selection(keep=keep)

    def _select_group(self, hidden: Tensor, norms: Tensor, text_mask: Tensor, images: list[ImageTokens]) -> Tensor:
        """G images of n tokens and one budget -> (G, budget) kept indices into their tokens."""
        device = hidden.device
        budget, n = images[0].budget, images[0].num_tokens
        samples = torch.tensor([image.sample for image in images], device=device)
        positions = torch.stack([image.positions for image in images])  # (G, n)
        tokens = F.normalize(hidden[samples[:, None], positions], dim=-1)  # (G, n, D)
        token_norms = norms[samples[:, None], positions]

        image_pivots = min(self.config.pivot_image_tokens, budget)
        pivot_index = token_norms.topk(image_pivots, dim=1).indices  # (G, Pi), decreasing norm
        available = torch.ones(len(images), n, dtype=torch.bool, device=device)
        available.scatter_(1, pivot_index, False)
        pivots = [tokens.gather(1, pivot_index[..., None].expand(-1, -1, tokens.shape[-1]))]
        valid = [torch.ones_like(pivot_index, dtype=torch.bool)]

        length = hidden.shape[1]
        text_pivots = min(self.config.pivot_text_tokens, length)
        if text_pivots:
            # The official candidates: every token after the image (its question and the assistant prefix).
            after = torch.arange(length, device=device)[None] > positions.amax(1, keepdim=True)
            candidates = text_mask[samples] & after
            scores = norms[samples].masked_fill(~candidates, float("-inf"))
            top = scores.topk(text_pivots, dim=1)
            text = hidden[samples[:, None], top.indices]  # (G, Pt, D)
            pivots.append(F.normalize(text, dim=-1))
            valid.append(top.values > float("-inf"))

        pivots_all = torch.cat(pivots, dim=1)  # (G, P, D)
        similarity = pivots_all @ tokens.transpose(1, 2)  # (G, P, n)
        shares = pivot_shares(torch.cat(valid, dim=1), budget - image_pivots)
        kept = least_duplicated(similarity, available, shares)
        # Exactly ``budget`` per row: their indices in increasing order, without a device sync.
        return torch.argsort(kept.to(torch.int8), dim=1, descending=True, stable=True)[:, :budget]
