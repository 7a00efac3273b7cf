"""The attention-row probe: layer K-1's head-mean attention rows for chosen queries, from its saved inputs and
its cache, without asking the model for attention weights (works with sdpa and FlashAttention)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.kernels import attention_rows, gather_tokens


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def make_probe(attn: nn.Module, layer_idx: int, inputs: tuple[Tensor, tuple[Tensor, Tensor], Any],
               key_mask: Tensor) -> Callable[[Tensor], Tensor]:
    """``rows(query_positions)`` for layer ``layer_idx`` whose self-attention is ``attn`` and whose pre-hook saw
    ``inputs`` = (hidden states, (cos, sin), cache)."""

    def rows(query_positions: Tensor) -> Tensor:
        """(B, Q) query rows of the current sequence -> (B, Q, L) head-mean attention of layer K-1."""
        hidden, (cos, sin), cache = inputs
        batch = hidden.shape[0]
        cos = cos.expand(batch, *cos.shape[1:])
        sin = sin.expand(batch, *sin.shape[1:])
        q = attn.q_proj(gather_tokens(hidden, query_positions))
        q = q.view(batch, query_positions.shape[1], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        qc, qs = gather_tokens(cos, query_positions)[:, None], gather_tokens(sin, query_positions)[:, None]
        q = q * qc + rotate_half(q) * qs
        return attention_rows(q, probe_keys(attn, layer_idx, hidden, cos, sin, cache), query_positions, key_mask,
                              attn.scaling)

    return rows


def make_keys(attn: nn.Module, layer_idx: int, inputs: tuple[Tensor, tuple[Tensor, Tensor], Any]
              ) -> Callable[[], Tensor]:
    """``keys()`` -> (B, Hkv, L, Dh) post-RoPE keys of layer ``layer_idx`` over the current sequence, for methods
    that rank tokens by their keys (DART's pivots)."""

    def keys() -> Tensor:
        hidden, (cos, sin), cache = inputs
        batch = hidden.shape[0]
        return probe_keys(attn, layer_idx, hidden, cos.expand(batch, *cos.shape[1:]),
                          sin.expand(batch, *sin.shape[1:]), cache)

    return keys


def probe_keys(attn: nn.Module, layer_idx: int, hidden: Tensor, cos: Tensor, sin: Tensor, cache: Any) -> Tensor:
    """(B, Hkv, L, Dh) post-RoPE keys of layer K-1: read from its cache layer (layer K-1 has just written them)
    rather than recomputing k_proj over the whole sequence; recomputed only without a cache."""
    batch, length = hidden.shape[:2]
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers):
        keys = getattr(layers[layer_idx], "keys", None)
        if isinstance(keys, Tensor) and keys.dim() == 4 and keys.shape[0] == batch and keys.shape[2] == length:
            return keys
    k = attn.k_proj(hidden).view(batch, length, -1, attn.head_dim)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    return k * cos[:, None] + rotate_half(k) * sin[:, None]
