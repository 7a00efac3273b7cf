"""Pure-PyTorch reference implementations of vtprune's token kernels.

These functions are the CPU path and the oracle that the Triton kernels are tested against. They work on every
device and dtype that PyTorch supports, loop over neither tokens nor batch items, and do their math in the same
precision the Triton kernels will (fp32 for attention logits and softmax).

Shape letters used throughout:

- ``B``: batch size.
- ``N``: tokens per sample before pruning.
- ``M``: kept slots per sample after pruning (rows may be padded with filler slots whose ``valid`` is False).
- ``T``: total number of real kept tokens over the batch (varlen packing).
- ``D``: hidden size. ``H`` / ``Hkv``: query / key-value heads. ``Dh``: head dim.
- ``P``: rows of multi-axis position ids (3 for Qwen2-VL style M-RoPE, 4 for some successors).
- ``Q``: number of query rows scored by :func:`attention_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CompactedSequence", "attention_rows", "compact_sequence", "dpp_greedy", "gather_tokens", "greedy_diverse"]

_INDEX_DTYPES = (torch.int64, torch.int32)
_REDUCE_MODES = ("mean", "max", "none", "mean_max")


def _check_index_layout(index: Tensor) -> None:
    """Validate that a per-sample token index is a (B, M) integer tensor."""
    if index.ndim != 2:
        raise ValueError(
            f"index must be 2-D with shape (B, M), but got shape {tuple(index.shape)}. "
            "Pass one row of kept token positions per sample."
        )
    if index.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"index must have dtype torch.long or torch.int32, but got {index.dtype}. Convert it with index.long()."
        )


def _check_index(index: Tensor, x: Tensor, batch_dim: int, name: str) -> None:
    """Validate a per-sample token index against the tensor it will gather from.

    Args:
        index: (B, M) integer tensor of token positions.
        x: tensor whose dim ``batch_dim`` has size B.
        batch_dim: which dim of ``x`` is the batch dim.
        name: name of ``x`` used in error messages.
    """
    _check_index_layout(index)
    if index.device != x.device:
        raise ValueError(
            f"index is on {index.device} but {name} is on {x.device}. Move index to {x.device} before calling."
        )
    if index.shape[0] != x.shape[batch_dim]:
        raise ValueError(
            f"index has batch size {index.shape[0]} but {name} has batch size {x.shape[batch_dim]} "
            f"(dim {batch_dim} of shape {tuple(x.shape)}). Pass one index row per sample of {name}."
        )


def _gather(x: Tensor, index: Tensor, batch_dim: int, token_dim: int) -> Tensor:
    """Gather ``x`` along ``token_dim`` with a per-sample index; ``batch_dim`` must precede ``token_dim``.

    Args:
        x: any tensor with a batch dim of size B and a token dim of size N.
        index: (B, M) integer tensor, already validated.
        batch_dim: dim of ``x`` holding the batch.
        token_dim: dim of ``x`` holding the tokens, greater than ``batch_dim``.

    Returns:
        ``x`` with ``token_dim`` resized to M.
    """
    batch, kept = index.shape
    view_shape = [1] * x.ndim
    view_shape[batch_dim] = batch
    view_shape[token_dim] = kept
    out_shape = list(x.shape)
    out_shape[token_dim] = kept
    # An expanded (stride-0) index lets one torch.gather serve every layout without copying x or the index.
    return torch.gather(x, token_dim, index.long().reshape(view_shape).expand(out_shape))


def gather_tokens(x: Tensor, index: Tensor, dim: int = 1) -> Tensor:
    """Gather rows of ``x`` along the token dim ``dim`` with a per-sample index.

    The batch dim is the dim right before ``dim``, so the same function serves hidden states ``(B, N, *rest)``
    with ``dim=1``, plain position ids ``(B, N)`` with ``dim=1`` and multi-axis position ids ``(P, B, N)`` with
    ``dim=2`` (M-RoPE, ``P`` = 3 or 4).

    Args:
        x: tensor with a batch dim of size B at ``dim - 1`` and a token dim of size N at ``dim``.
        index: (B, M) long or int32 tensor of token positions, values in ``[0, N)``, on the device of ``x``.
            Values out of range are not checked here (that would need a device sync); torch raises on CPU.
        dim: token dim of ``x``; negative values count from the end. Must leave room for a batch dim before it.

    Returns:
        Tensor shaped like ``x`` with dim ``dim`` of size M, where
        ``out[..., b, m, ...] = x[..., b, index[b, m], ...]``.

    Raises:
        ValueError: if ``dim`` is out of range or has no batch dim before it, or if ``index`` is not 2-D, not an
            integer tensor, on another device, or has a different batch size than ``x``.
    """
    token_dim = _check_gather_inputs(x, index, dim)
    return _gather(x, index, token_dim - 1, token_dim)


def _check_gather_inputs(x: Tensor, index: Tensor, dim: int) -> int:
    """Validate the arguments of :func:`gather_tokens` (every path shares these checks); return the token dim."""
    if x.ndim < 2:
        raise ValueError(
            f"x must have a batch dim and a token dim, but got shape {tuple(x.shape)}. "
            "Pass a tensor of at least shape (B, N)."
        )
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim={dim} is out of range for x of shape {tuple(x.shape)}. Pass the token dim of x.")
    token_dim = dim % x.ndim
    if token_dim == 0:
        raise ValueError(
            f"dim={dim} points at the first dim of x (shape {tuple(x.shape)}), which leaves no batch dim before it. "
            "gather_tokens expects the batch dim right before the token dim, e.g. dim=1 for (B, N, D)."
        )
    _check_index(index, x, token_dim - 1, "x")
    return token_dim


@dataclass(frozen=True)
class CompactedSequence:
    """Per-token tensors of a batch after :func:`compact_sequence` dropped the pruned rows.

    Each field is None when the matching input was None (or, for ``cu_seqlens``/``max_seqlen``, when
    ``varlen=False``).
    """

    hidden_states: Tensor | None
    """(B, M, D) with padded filler rows, or packed (T, D) when ``varlen=True``."""
    position_ids: Tensor | None
    """Input layout with the token dim gathered: (B, M) / (P, B, M); packed (1, T) / (P, 1, T) when varlen."""
    attention_mask: Tensor | None
    """(B, M) original mask gathered times ``valid``, in the input mask's dtype; None when varlen."""
    cache: list[tuple[Tensor, Tensor]] | None
    """Per layer (keys, values), each (B, Hkv, M, Dh); stays padded even when varlen."""
    cu_seqlens: Tensor | None
    """(B + 1,) int32 cumulative kept-token counts starting at 0, as FlashAttention's varlen API takes them."""
    max_seqlen: int | None
    """Largest kept-token count of any sample, as FlashAttention's varlen API takes it."""


def _token_length(name: str, length: int, lengths: dict[str, int]) -> None:
    """Record the token length of one input and check that it agrees with the first one seen."""
    if lengths:
        other, other_length = next(iter(lengths.items()))
        if other_length != length:
            raise ValueError(
                f"{name} has {length} tokens but {other} has {other_length}. "
                "Pass per-token tensors of the same sequence, all with the same token count N."
            )
    lengths.setdefault(name, length)


def compact_sequence(
    index: Tensor,
    valid: Tensor | None = None,
    *,
    hidden_states: Tensor | None = None,
    position_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    cache: list[tuple[Tensor, Tensor]] | None = None,
    position_dim: int = -1,
    varlen: bool = False,
) -> CompactedSequence:
    """Drop rows from every per-token tensor of a batch at once, using per-sample kept indices.

    Samples may keep different numbers of tokens: each row of ``index`` is padded to M with filler positions
    whose ``valid`` entry is False. Filler rows are gathered like real ones (so any in-range filler works) and
    masked out through ``attention_mask``, or left out entirely with ``varlen=True``. Rows come out in the order
    of ``index``; sort each row ascending to keep the original token order.

    Args:
        index: (B, M) long or int32 kept positions per sample, values in ``[0, N)``.
        valid: (B, M) bool, True for real kept slots, or None when every slot is real.
        hidden_states: (B, N, D) or None.
        position_ids: (B, N) or (P, B, N) or None; the token dim is ``position_dim`` and the batch dim the one
            right before it.
        attention_mask: (B, N) 2-D mask (bool, integer or float; nonzero means attend) or None.
        cache: per layer (keys, values), each (B, Hkv, N, Dh), or None. Only the prompt part may be passed:
            a layer longer than N is rejected.
        position_dim: token dim of ``position_ids``; negative values count from the end.
        varlen: pack the kept rows of ``hidden_states`` and ``position_ids`` back to back instead of padding,
            and return ``cu_seqlens`` / ``max_seqlen``. A row is kept when its ``valid`` is True and, if
            ``attention_mask`` is given, its gathered mask is nonzero, i.e. exactly the rows the padded output's
            ``attention_mask`` marks. This syncs with the device once, since the packed size T is data-dependent.

    Returns:
        A :class:`CompactedSequence`. Padded (``varlen=False``): hidden (B, M, D), positions with token dim M,
        mask (B, M) equal to the gathered mask times ``valid`` (``valid`` cast to long when no mask was given),
        cache layers (B, Hkv, M, Dh). Packed (``varlen=True``): hidden (T, D) ordered by sample then slot,
        positions (1, T) or (P, 1, T), no mask, padded cache, ``cu_seqlens`` (B + 1,) int32, ``max_seqlen`` int.

    Raises:
        ValueError: if ``index`` or ``valid`` is malformed, if the inputs disagree on batch size or token count N,
            or if a cache layer is not 4-D or holds more or fewer positions than N.
    """
    pos_token_dim = _check_compact_inputs(
        index, valid, hidden_states, position_ids, attention_mask, cache, position_dim
    )
    hidden_out = None if hidden_states is None else _gather(hidden_states, index, 0, 1)
    pos_out = None if position_ids is None else _gather(position_ids, index, pos_token_dim - 1, pos_token_dim)
    mask_out = _valid_mask(None if attention_mask is None else _gather(attention_mask, index, 0, 1), valid)
    cache_out = None
    if cache is not None:
        cache_out = [(_gather(keys, index, 0, 2), _gather(values, index, 0, 2)) for keys, values in cache]

    if not varlen:
        return CompactedSequence(hidden_out, pos_out, mask_out, cache_out, None, None)

    batch, kept = index.shape
    if mask_out is None:
        return _pack_unmasked(index, hidden_out, pos_out, cache_out, pos_token_dim)

    keep, counts, cu_seqlens = _varlen_counts(mask_out)
    # FlashAttention takes max_seqlen as a Python int, so one sync here is unavoidable.
    max_seqlen = int(counts.max()) if batch > 0 else 0
    flat_keep = keep.flatten().nonzero().squeeze(1)
    if hidden_out is not None:
        hidden_out = hidden_out.flatten(0, 1).index_select(0, flat_keep)
    if pos_out is not None:
        flat_pos = pos_out.flatten(pos_token_dim - 1, pos_token_dim)
        pos_out = flat_pos.index_select(pos_token_dim - 1, flat_keep).unsqueeze(pos_token_dim - 1)
    return CompactedSequence(hidden_out, pos_out, None, cache_out, cu_seqlens, max_seqlen)


def _check_compact_inputs(
    index: Tensor,
    valid: Tensor | None,
    hidden_states: Tensor | None,
    position_ids: Tensor | None,
    attention_mask: Tensor | None,
    cache: list[tuple[Tensor, Tensor]] | None,
    position_dim: int,
) -> int:
    """Validate the arguments of :func:`compact_sequence` (every path shares these checks) before anything is
    gathered; return the token dim of ``position_ids`` (0 when it is None)."""
    _check_index_layout(index)
    if valid is not None:
        if valid.shape != index.shape:
            raise ValueError(
                f"valid has shape {tuple(valid.shape)} but index has shape {tuple(index.shape)}. "
                "Pass one valid flag per index entry."
            )
        if valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor, but got {valid.dtype}. Convert it with valid.bool().")
        if valid.device != index.device:
            raise ValueError(
                f"valid is on {valid.device} but index is on {index.device}. Put both on the same device."
            )

    lengths: dict[str, int] = {}
    pos_token_dim = 0
    if hidden_states is not None:
        if hidden_states.ndim != 3:
            raise ValueError(
                f"hidden_states must have shape (B, N, D), but got {tuple(hidden_states.shape)}. "
                "Pass the decoder's input embeddings before they are packed or flattened."
            )
        _token_length("hidden_states", hidden_states.shape[1], lengths)
        _check_index(index, hidden_states, 0, "hidden_states")
    if position_ids is not None:
        if position_ids.ndim < 2 or not -position_ids.ndim <= position_dim < position_ids.ndim:
            raise ValueError(
                f"position_dim={position_dim} is out of range for position_ids of shape {tuple(position_ids.shape)}. "
                "Pass position ids shaped (B, N) or (P, B, N) and the index of their token dim."
            )
        pos_token_dim = position_dim % position_ids.ndim
        if pos_token_dim == 0:
            raise ValueError(
                f"position_dim={position_dim} points at the first dim of position_ids (shape "
                f"{tuple(position_ids.shape)}), which leaves no batch dim before it. Use the default -1 for "
                "(B, N) or (P, B, N) position ids."
            )
        _token_length("position_ids", position_ids.shape[pos_token_dim], lengths)
        _check_index(index, position_ids, pos_token_dim - 1, "position_ids")
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(
                f"attention_mask must be a 2-D (B, N) padding mask, but got shape {tuple(attention_mask.shape)}. "
                "Pass the tokenizer's mask, not the 4-D mask built inside the model."
            )
        _token_length("attention_mask", attention_mask.shape[1], lengths)
        _check_index(index, attention_mask, 0, "attention_mask")
    if cache:
        for layer_idx, layer in enumerate(cache):
            if len(layer) != 2:
                raise ValueError(
                    f"cache[{layer_idx}] has {len(layer)} entries, but each layer must be a (keys, values) pair. "
                    "Convert a transformers Cache with [(layer.keys, layer.values) for layer in cache.layers]."
                )
            for part, tensor in zip(("keys", "values"), layer, strict=True):
                name = f"cache[{layer_idx}] {part}"
                if tensor.ndim != 4:
                    raise ValueError(
                        f"{name} must have shape (B, Hkv, N, Dh), but got {tuple(tensor.shape)}. "
                        "Pass a list of (keys, values) pairs, one per layer."
                    )
                length = tensor.shape[-2]
                if lengths and length > next(iter(lengths.values())):
                    n_tokens = next(iter(lengths.values()))
                    raise ValueError(
                        f"{name} holds {length} positions but the sequence has {n_tokens} tokens. "
                        "compact_sequence only compacts the prompt: slice each cache layer to its first "
                        f"{n_tokens} positions (keys[:, :, :{n_tokens}]) and keep the rest yourself."
                    )
                _token_length(name, length, lengths)
                _check_index(index, tensor, 0, name)
    return pos_token_dim


def _valid_mask(mask_out: Tensor | None, valid: Tensor | None) -> Tensor | None:
    """The (B, M) output mask: the gathered mask times ``valid`` in the mask's dtype, ``valid.long()`` alone."""
    if mask_out is None:
        return None if valid is None else valid.long()
    if valid is None:
        return mask_out
    return mask_out & valid if mask_out.dtype == torch.bool else mask_out * valid.to(mask_out.dtype)


def _pack_unmasked(index: Tensor, hidden_out: Tensor | None, pos_out: Tensor | None,
                   cache_out: list[tuple[Tensor, Tensor]] | None, pos_token_dim: int) -> CompactedSequence:
    """Varlen packing when nothing is masked: every sample keeps all M slots, so packing is a reshape and needs no
    device sync. Shared by the reference and the Triton path."""
    batch, kept = index.shape
    cu_seqlens = torch.arange(batch + 1, device=index.device, dtype=torch.int32) * kept
    if hidden_out is not None:
        hidden_out = hidden_out.flatten(0, 1)
    if pos_out is not None:
        pos_out = pos_out.flatten(pos_token_dim - 1, pos_token_dim).unsqueeze(pos_token_dim - 1)
    return CompactedSequence(hidden_out, pos_out, None, cache_out, cu_seqlens, kept)


def _varlen_counts(mask_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Kept rows of a (B, M) output mask: (B, M) bool ``keep``, (B,) counts and (B + 1,) int32 ``cu_seqlens``."""
    keep = mask_out != 0
    counts = keep.sum(dim=1)
    cu_seqlens = torch.zeros(mask_out.shape[0] + 1, device=mask_out.device, dtype=torch.int32)
    cu_seqlens[1:] = counts.cumsum(0)
    return keep, counts, cu_seqlens


def attention_rows(
    query: Tensor,
    key: Tensor,
    query_positions: Tensor,
    key_padding_mask: Tensor | None,
    scaling: float,
    reduce: str = "mean",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention probabilities of a few query rows against all keys, without the full N x N matrix.

    Matches what an eager causal attention layer would put in rows ``query_positions`` of its (B, H, N, N)
    attention map, for the cost of (B, H, Q, N).

    Args:
        query: (B, H, Q, Dh) query rows with RoPE already applied.
        key: (B, Hkv, N, Dh) keys with RoPE applied (what a KV cache stores). ``H`` must be a multiple of
            ``Hkv``; each kv head serves ``H // Hkv`` consecutive query heads, as transformers' ``repeat_kv`` does.
        query_positions: (B, Q) long or int32 index of each query row in the key sequence; causal, so the query
            at position p sees keys ``0..p``.
        key_padding_mask: (B, N) mask where nonzero / True means attend, or None to attend to every key.
        scaling: multiplier of the logits, usually ``Dh ** -0.5``.
        reduce: ``"mean"`` or ``"max"`` over heads -> (B, Q, N); ``"none"`` -> (B, H, Q, N);
            ``"mean_max"`` -> tuple (mean, max), each (B, Q, N).

    Returns:
        fp32 probabilities. A query row that may see no key at all (a padding query) gets all zeros rather than
        the NaNs a softmax over only -inf would give; eager attention in transformers returns a uniform row there
        instead, which is just as meaningless.

    Raises:
        ValueError: if ranks, batch sizes, head counts, head dims, dtypes, devices or ``reduce`` are wrong.
    """
    _check_attention_inputs(query, key, query_positions, key_padding_mask, reduce)
    batch, heads, n_queries, head_dim = query.shape
    _, kv_heads, n_keys, _ = key.shape
    groups = heads // kv_heads
    # Grouping the query heads per kv head avoids materialising repeat_kv's (B, H, N, Dh) copy of the keys.
    grouped_query = query.float().reshape(batch, kv_heads, groups * n_queries, head_dim)
    logits = (grouped_query @ key.float().transpose(-1, -2)).reshape(batch, heads, n_queries, n_keys) * scaling

    key_range = torch.arange(n_keys, device=query.device)
    allowed = key_range.view(1, 1, n_keys) <= query_positions.unsqueeze(-1)
    if key_padding_mask is not None:
        allowed = allowed & (key_padding_mask != 0).unsqueeze(1)
    allowed = allowed.unsqueeze(1)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    # Rows with no visible key are all -inf and softmax to NaN; zeros keep downstream sums and maxima finite.
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)

    if reduce == "none":
        return probs
    if reduce == "mean":
        return probs.mean(dim=1)
    if reduce == "max":
        return probs.amax(dim=1)
    return probs.mean(dim=1), probs.amax(dim=1)


def _check_attention_inputs(
    query: Tensor, key: Tensor, query_positions: Tensor, key_padding_mask: Tensor | None, reduce: str
) -> None:
    """Validate the arguments of :func:`attention_rows` (every path shares these checks)."""
    if reduce not in _REDUCE_MODES:
        raise ValueError(f"reduce={reduce!r} is not supported. Use one of {list(_REDUCE_MODES)}.")
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(
            f"query must be (B, H, Q, Dh) and key (B, Hkv, N, Dh), but got shapes {tuple(query.shape)} and "
            f"{tuple(key.shape)}. Transpose (B, L, H, Dh) projections with .transpose(1, 2) first."
        )
    if not query.is_floating_point() or not key.is_floating_point():
        raise ValueError(
            f"query and key must be floating point, but got {query.dtype} and {key.dtype}. "
            "Pass the projected (and rotated) query and key states."
        )
    batch, heads, n_queries, head_dim = query.shape
    _, kv_heads, n_keys, _ = key.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(
            f"key of shape {tuple(key.shape)} does not match query of shape {tuple(query.shape)}: batch size and "
            "head dim must agree. Pass query and key from the same layer and batch."
        )
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"query has {heads} heads, which is not a multiple of the {kv_heads} key heads. "
            "Pass key with num_key_value_heads heads and query with num_attention_heads heads."
        )
    if key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}. Put both on the same device.")
    if query_positions.shape != (batch, n_queries):
        raise ValueError(
            f"query_positions must have shape (B, Q) = {(batch, n_queries)}, but got {tuple(query_positions.shape)}. "
            "Pass the key-sequence index of each query row."
        )
    if query_positions.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"query_positions must have dtype torch.long or torch.int32, but got {query_positions.dtype}. "
            "Convert it with .long()."
        )
    if query_positions.device != query.device:
        raise ValueError(
            f"query_positions is on {query_positions.device} but query is on {query.device}. "
            "Put both on the same device."
        )
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, n_keys):
            raise ValueError(
                f"key_padding_mask must have shape (B, N) = {(batch, n_keys)}, but got "
                f"{tuple(key_padding_mask.shape)}. Pass the 2-D padding mask of the key sequence."
            )
        if key_padding_mask.device != query.device:
            raise ValueError(
                f"key_padding_mask is on {key_padding_mask.device} but query is on {query.device}. "
                "Put both on the same device."
            )


GREEDY_RULES = ("maxsum", "kcenter")


def greedy_diverse(similarity: Tensor, first: Tensor, count: int, rule: str) -> Tensor:
    """Greedy diverse subset of each sample's tokens from their pairwise similarities, first pick given.

    Args:
        similarity: (B, n, n) fp32 pairwise similarities (cosine for unit-norm tokens: ``x @ x.transpose(1, 2)``).
        first: (B,) long index of each sample's first pick.
        count: picks per sample, 1 <= count <= n.
        rule: ``"maxsum"``: each step adds the unpicked token with the smallest summed similarity to the picks so
            far (max-sum diversification); ``"kcenter"``: the unpicked token farthest (1 - similarity) from its
            nearest pick (greedy k-center).

    Returns:
        (B, count) long picks in the order they were made; ties go to the lower index.

    Raises:
        ValueError: on wrong ranks, shapes, dtypes, devices, ``count`` or ``rule``.
    """
    _check_greedy_inputs(similarity, first, count, rule)
    batch, n, _ = similarity.shape
    rows = torch.arange(batch, device=similarity.device)
    picked = torch.zeros(batch, n, dtype=torch.bool, device=similarity.device)
    # max-sum minimises the running sum; k-center maximises the running nearest distance, i.e. minimises its
    # negation. Both start from the first pick's row as the kernel does (0 + row, min(inf, 1 - row)).
    score = torch.zeros(batch, n, device=similarity.device) if rule == "maxsum" else torch.full(
        (batch, n), float("inf"), device=similarity.device)
    last = first
    picks = [first]
    for _ in range(count - 1):
        row = similarity[rows, last]
        score = score + row if rule == "maxsum" else torch.minimum(score, 1 - row)
        picked.scatter_(1, last.unsqueeze(1), True)  # no host sync (an index_put_ of a CPU scalar makes one)
        cost = score if rule == "maxsum" else -score
        last = cost.masked_fill(picked, float("inf")).argmin(dim=1)
        picks.append(last)
    return torch.stack(picks, dim=1)


def _check_greedy_inputs(similarity: Tensor, first: Tensor, count: int, rule: str) -> None:
    """Validate the arguments of :func:`greedy_diverse` (every path shares these checks)."""
    if rule not in GREEDY_RULES:
        raise ValueError(f"rule={rule!r} is not supported. Use one of {list(GREEDY_RULES)}.")
    if similarity.ndim != 3 or similarity.shape[1] != similarity.shape[2]:
        raise ValueError(f"similarity must be (B, n, n), but got shape {tuple(similarity.shape)}.")
    if similarity.dtype != torch.float32:
        raise ValueError(f"similarity must be float32, but got {similarity.dtype}. Convert it with .float().")
    if first.shape != similarity.shape[:1] or first.dtype != torch.long:
        raise ValueError(
            f"first must be a (B,) = ({similarity.shape[0]},) long tensor, but got shape {tuple(first.shape)} and "
            f"dtype {first.dtype}."
        )
    if first.device != similarity.device:
        raise ValueError(f"first is on {first.device} but similarity on {similarity.device}; put both on one device.")
    if not 1 <= count <= similarity.shape[1]:
        raise ValueError(f"count={count} must be in 1..n = 1..{similarity.shape[1]}.")


# A pick whose residual (its squared distance to the span of the picks so far, in the kernel's feature space) is
# at most this fraction of its own diagonal entry is linearly dependent on them up to fp32 rounding, which grows
# with the number of rank-one updates (about picks x 6e-8 of the diagonal).
DPP_DEPENDENT = 1e-4


def dpp_greedy(kernel: Tensor, count: int) -> Tensor:
    """Greedy MAP inference of a determinantal point process, ``count`` picks per sample.

    Each step adds the unpicked item that most increases the log-determinant of the picked submatrix of
    ``kernel``, i.e. the one with the largest residual d_i^2 = L_ii - |c_i|^2, where c_i holds item i's coordinates
    on the incremental Cholesky basis of the picks; each pick j adds the basis vector
    e = (L_j - c_j . C) / d_j and every residual loses e^2 (Chen et al., NeurIPS 2018, as in CDPruner's code).

    An item whose residual has fallen to at most ``DPP_DEPENDENT`` of its diagonal is dependent on the picks:
    its residual is taken as 0 exactly and, once picked, it adds a zero basis vector. So a kernel of rank r < count
    gives r picks by the determinant, then the remaining items by index, without the NaN of a square root of a
    rounding-negative residual.

    Args:
        kernel: (B, n, n) fp32 symmetric positive semi-definite kernels (not checked: that costs a factorisation).
        count: picks per sample, 1 <= count <= n.

    Returns:
        (B, count) long picks in the order they were made; ties go to the lower index.

    Raises:
        ValueError: on a wrong rank, shape or dtype, or ``count`` out of range.
    """
    _check_dpp_inputs(kernel, count)
    batch, n, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    basis = kernel.new_zeros(count, batch, n)
    diagonal = torch.diagonal(kernel, dim1=1, dim2=2)
    floor = DPP_DEPENDENT * diagonal
    residual = diagonal.clone()
    picked = torch.zeros(batch, n, dtype=torch.bool, device=kernel.device)
    picks = []
    for i in range(count):
        # argmax returns the first maximal index: ties go to the lower index.
        j = residual.masked_fill(picked, float("-inf")).argmax(dim=1)
        picks.append(j)
        picked.scatter_(1, j.unsqueeze(1), True)  # no host sync (an index_put_ of a CPU scalar makes one)
        if i == count - 1:
            break
        d = residual[rows, j]
        independent = d > floor[rows, j]
        projection = torch.einsum("tb,tbn->bn", basis[:i, rows, j], basis[:i])
        e = (kernel[rows, j] - projection) / torch.where(independent, d, 1.0).sqrt().unsqueeze(1)
        e = e.masked_fill(~independent.unsqueeze(1), 0.0)
        basis[i] = e
        residual = residual - e.square()
        residual = residual.masked_fill(residual <= floor, 0.0)
    return torch.stack(picks, dim=1)


def _check_dpp_inputs(kernel: Tensor, count: int) -> None:
    """Validate the arguments of :func:`dpp_greedy`."""
    if kernel.ndim != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel must be (B, n, n), but got shape {tuple(kernel.shape)}.")
    if kernel.dtype != torch.float32:
        raise ValueError(f"kernel must be float32, but got {kernel.dtype}. Convert it with .float().")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= kernel.shape[1]:
        raise ValueError(f"count={count!r} must be an int in 1..n = 1..{kernel.shape[1]}.")
