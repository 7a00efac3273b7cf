"""Triton kernels behind :mod:`vtprune.kernels`: row gathering / sequence compaction and the attention-row probe.

Imported lazily by :mod:`vtprune.kernels` the first time a CUDA tensor reaches a kernel, so ``import vtprune``
never imports Triton. Every launcher validates its arguments with the same checks as the PyTorch reference in
:mod:`vtprune.kernels.reference` (the oracle these kernels are tested against) and adds the checks of its own
(device, dtype). CPU tensors run here only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported), which is how the tests exercise these kernels on machines without a GPU.

Two kernel families:

- ``_gather_rows_kernel`` copies rows: ``out[o, b, mid, m, :] = x[o, b, mid, index[b, m], :]`` for any tensor seen as
  (outer, batch, mid, tokens, features) through its strides, so hidden states (B, N, D), position ids (B, N) and
  (P, B, N), masks (B, N) and KV-cache layers (B, Hkv, N, Dh) all go through it. Elements are copied as raw
  integers of their width (bit-exact, any dtype of 1, 2, 4 or 8 bytes). A program copies a tile of BLOCK_M rows by
  BLOCK_F features, contiguous along the features, so 16-byte loads and stores are issued wherever the feature
  stride is 1 and the base addresses are 16-byte aligned. Several tensors of one shape, stride and dtype (every
  cache layer's keys) go in one launch: grid axis 1 walks a table of element offsets from the first tensor, and
  the outputs are slices of one allocation. With ``PACKED`` the destination row of each (b, m) comes from a table
  (varlen packing; -1 skips the row), so packing costs one pass, not a gather plus an index_select.
- ``_attn_stats_kernel`` + ``_attn_probs_kernel``: a two-pass softmax over the keys that never materialises more
  than (B, H, Q, N). Pass 1 streams the keys of one head in BLOCK_N blocks and keeps the running row maximum and
  sum of exponentials (split over the key axis into ``splits`` partial results when (B, H) alone cannot fill the
  GPU). Pass 2, one program per (batch, key block, query block, kv-head slice), recomputes the logits block per
  head, normalises it with the merged statistics and writes it (``reduce="none"``) and/or folds it into the sum and
  maximum over heads. Logits and softmax are fp32; bf16/fp16 inputs feed the tensor cores directly (their products
  are exact in fp32), fp32 inputs use an exact fp32 dot (no TF32).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from vtprune.kernels.reference import (
    DPP_DEPENDENT,
    CompactedSequence,
    _check_attention_inputs,
    _check_compact_inputs,
    _check_dpp_inputs,
    _check_gather_inputs,
    _check_greedy_inputs,
    _pack_unmasked,
    _valid_mask,
    _varlen_counts,
)
from vtprune.kernels.reference import attention_rows as _reference_attention_rows

__all__ = ["attention_rows", "compact_sequence", "dpp_greedy", "gather_tokens", "greedy_diverse", "supports"]

# Raw integer type of each element width: copies move bits, so NaN payloads, -0.0 and bool bytes survive as is.
_RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Bytes one gather program moves per tile, shrunk down to _MIN_TILE_BYTES while the grid would not fill the GPU.
_MAX_TILE_BYTES = 16384
_MIN_TILE_BYTES = 2048
_VECTOR_BYTES = 16
_OFFSET_TABLES: dict[tuple[torch.device, int, tuple[int, ...]], Tensor] = {}
_OFFSET_TABLES_KEPT = 8


def supports(op: str, *tensors: Tensor) -> bool:
    """Whether the Triton path handles these tensors for ``op`` ("gather", "attention", "greedy" or "dpp"); the
    reference does the rest (fp64 logits, 16-byte complex elements, non-fp32 similarities or kernels)."""
    if op == "gather":
        return all(t.element_size() in _RAW_DTYPES for t in tensors)
    if op in ("greedy", "dpp"):
        return all(t.dtype == torch.float32 for t in tensors)
    return all(t.dtype in _ATTENTION_DTYPES for t in tensors)


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    src_offsets_ptr,
    dst_ptr,
    index_ptr,
    dst_rows_ptr,
    n_batch,
    n_mid,
    n_kept,
    n_feat,
    m_blocks,
    f_blocks,
    src_stride_o,
    src_stride_b,
    src_stride_mid,
    src_stride_n,
    src_stride_f,
    dst_stride_t,
    dst_stride_o,
    dst_stride_b,
    dst_stride_mid,
    dst_stride_m,
    index_stride_b,
    index_stride_m,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ALIGN: tl.constexpr,
    MULTI: tl.constexpr,
    PACKED: tl.constexpr,
):
    pid = tl.program_id(0)
    f_block = pid % f_blocks
    rest = pid // f_blocks
    m_block = rest % m_blocks
    rest = rest // m_blocks
    mid = rest % n_mid
    rest = rest // n_mid
    b = rest % n_batch
    o = (rest // n_batch).to(tl.int64)
    b = b.to(tl.int64)
    mid = mid.to(tl.int64)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = f_block * BLOCK_F + tl.arange(0, BLOCK_F)
    rows_ok = offs_m < n_kept
    tokens = tl.load(index_ptr + b * index_stride_b + offs_m * index_stride_m, mask=rows_ok, other=0).to(tl.int64)

    src = src_ptr + o * src_stride_o + b * src_stride_b + mid * src_stride_mid
    if MULTI:
        # Element offset of this tensor from the first one. Rounding to ALIGN (the host checked every offset is a
        # multiple of it) tells the compiler the address keeps the base's 16-byte alignment, so loads stay wide.
        offset = tl.load(src_offsets_ptr + tl.program_id(1))
        src += (offset // ALIGN) * ALIGN
    if PACKED:
        dst_rows = tl.load(dst_rows_ptr + b * n_kept + offs_m, mask=rows_ok, other=-1).to(tl.int64)
        rows_ok = rows_ok & (dst_rows >= 0)
        dst = dst_ptr + o * dst_stride_o + dst_rows[:, None] * dst_stride_m
    else:
        dst = (
            dst_ptr
            + tl.program_id(1).to(tl.int64) * dst_stride_t
            + o * dst_stride_o
            + b * dst_stride_b
            + mid * dst_stride_mid
            + offs_m[:, None].to(tl.int64) * dst_stride_m
        )
    mask = rows_ok[:, None] & (offs_f[None, :] < n_feat)
    values = tl.load(src + tokens[:, None] * src_stride_n + offs_f[None, :] * src_stride_f, mask=mask)
    tl.store(dst + offs_f[None, :], values, mask=mask)


@triton.jit
def _attn_stats_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    mask_ptr,
    max_ptr,
    sum_ptr,
    scaling,
    n_heads,
    groups,
    n_queries,
    n_keys,
    head_dim,
    blocks_per_split,
    n_splits,
    q_stride_b,
    q_stride_h,
    q_stride_q,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_n,
    k_stride_d,
    pos_stride_b,
    pos_stride_q,
    mask_stride_b,
    mask_stride_n,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    q_block = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    kv_head = (h // groups).to(tl.int64)
    h = h.to(tl.int64)

    offs_q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < n_queries
    d_ok = offs_d < head_dim
    q = tl.load(
        q_ptr + b * q_stride_b + h * q_stride_h + offs_q[:, None] * q_stride_q + offs_d[None, :] * q_stride_d,
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    # Padded query rows get position -1: they see no key, so their statistics stay (-inf, 0) and are never stored.
    pos = tl.load(pos_ptr + b * pos_stride_b + offs_q * pos_stride_q, mask=q_ok, other=-1).to(tl.int64)

    row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_Q], tl.float32)
    k_base = k_ptr + b * k_stride_b + kv_head * k_stride_h
    first = split * blocks_per_split * BLOCK_N
    # Loops with run-time bounds are written as while loops: the interpreter of some Triton releases cannot
    # iterate range() over a run-time scalar (numpy >= 2), and the loads of one block give enough bytes in flight.
    block = 0
    while block < blocks_per_split:
        offs_n = first + block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        k = tl.load(
            k_base + offs_n[:, None].to(tl.int64) * k_stride_n + offs_d[None, :] * k_stride_d,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
        allowed = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
        if HAS_MASK:
            key_mask = tl.load(mask_ptr + b * mask_stride_b + offs_n * mask_stride_n, mask=n_ok, other=0)
            allowed = allowed & (key_mask != 0)[None, :]
        logits = tl.where(allowed, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        # A row that has seen no key yet keeps max -inf; shifting by 0 then keeps exp() at 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        row_max = new_max
        block += 1

    stats = (pid_bh * n_splits + split).to(tl.int64) * n_queries + offs_q
    tl.store(max_ptr + stats, row_max, mask=q_ok)
    tl.store(sum_ptr + stats, row_sum, mask=q_ok)


@triton.jit
def _attn_probs_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    mask_ptr,
    max_ptr,
    sum_ptr,
    all_ptr,
    head_sum_ptr,
    head_max_ptr,
    scaling,
    head_scale,
    n_heads,
    n_kv_heads,
    kv_per_slice,
    n_slices,
    n_queries,
    n_keys,
    head_dim,
    n_splits,
    q_stride_b,
    q_stride_h,
    q_stride_q,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_n,
    k_stride_d,
    pos_stride_b,
    pos_stride_q,
    mask_stride_b,
    mask_stride_n,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    STORE_ALL: tl.constexpr,
    STORE_SUM: tl.constexpr,
    STORE_MAX: tl.constexpr,
    GROUPS: tl.constexpr,
):
    pid_bs = tl.program_id(0)
    n_block = tl.program_id(1)
    q_block = tl.program_id(2)
    b = (pid_bs // n_slices).to(tl.int64)
    head_slice = pid_bs % n_slices

    offs_q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < n_queries
    n_ok = offs_n < n_keys
    d_ok = offs_d < head_dim
    pos = tl.load(pos_ptr + b * pos_stride_b + offs_q * pos_stride_q, mask=q_ok, other=-1).to(tl.int64)
    # The causal and padding mask do not depend on the head: build it once per program.
    allowed = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
    if HAS_MASK:
        key_mask = tl.load(mask_ptr + b * mask_stride_b + offs_n * mask_stride_n, mask=n_ok, other=0)
        allowed = allowed & (key_mask != 0)[None, :]
    out_ok = q_ok[:, None] & n_ok[None, :]
    # Offsets inside one (Q, N) plane fit in int32 (the launcher checks), which saves registers; planes use int64.
    out_offs = offs_q[:, None] * n_keys + offs_n[None, :]

    head_sum = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
    head_max = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
    kv_first = head_slice * kv_per_slice
    kv_last = tl.minimum(kv_first + kv_per_slice, n_kv_heads)
    kv_head = kv_first
    while kv_head < kv_last:
        k = tl.load(
            k_ptr
            + b * k_stride_b
            + kv_head.to(tl.int64) * k_stride_h
            + offs_n[:, None].to(tl.int64) * k_stride_n
            + offs_d[None, :] * k_stride_d,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        # Each kv head serves GROUPS consecutive query heads (repeat_kv); its key block is loaded once for all.
        for g in tl.static_range(GROUPS):
            h = (kv_head * GROUPS + g).to(tl.int64)
            q = tl.load(
                q_ptr + b * q_stride_b + h * q_stride_h + offs_q[:, None] * q_stride_q + offs_d[None, :] * q_stride_d,
                mask=q_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            # Merge pass 1's per-split statistics: max of maxima, sums rescaled to it.
            stats = (b * n_heads + h) * n_splits * n_queries + offs_q
            row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
            split = 0
            while split < n_splits:
                row_max = tl.maximum(row_max, tl.load(max_ptr + stats + split * n_queries, mask=q_ok, other=0.0))
                split += 1
            shift = tl.where(row_max == float("-inf"), 0.0, row_max)
            row_sum = tl.zeros([BLOCK_Q], tl.float32)
            split = 0
            while split < n_splits:
                part_max = tl.load(max_ptr + stats + split * n_queries, mask=q_ok, other=float("-inf"))
                part_sum = tl.load(sum_ptr + stats + split * n_queries, mask=q_ok, other=0.0)
                row_sum += part_sum * tl.exp(part_max - shift)
                split += 1
            # Rows that see no key (padding queries) sum to 0: they get zeros, as in the reference.
            inv_sum = tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)

            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
            probs = tl.where(allowed, tl.exp(logits - shift[:, None]) * inv_sum[:, None], 0.0)
            if STORE_ALL:
                tl.store(all_ptr + (b * n_heads + h) * n_queries * n_keys + out_offs, probs, mask=out_ok)
            head_sum += probs
            head_max = tl.maximum(head_max, probs)
        kv_head += 1

    reduced = (b * n_slices + head_slice) * n_queries * n_keys + out_offs
    if STORE_SUM:
        tl.store(head_sum_ptr + reduced, head_sum * head_scale, mask=out_ok)
    if STORE_MAX:
        tl.store(head_max_ptr + reduced, head_max, mask=out_ok)


@triton.jit
def _greedy_diverse_kernel(
    sim_ptr,
    first_ptr,
    out_ptr,
    score_ptr,
    n,
    count,
    sim_stride_b,
    sim_stride_r,
    sim_stride_c,
    MAXSUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per sample runs the whole greedy loop: the PyTorch loop launches a few kernels per pick, and
    # at N = 576 those launches, not the arithmetic, are the time. Each step reads one row of the similarities.
    b = tl.program_id(0).to(tl.int64)
    sim = sim_ptr + b * sim_stride_b
    score = score_ptr + b * n
    last = tl.load(first_ptr + b)
    tl.store(out_ptr + b * count, last)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        if MAXSUM:
            init = tl.zeros([BLOCK], dtype=tl.float32)
        else:
            init = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        tl.store(score + offs, init, mask=offs < n)
    for step in range(1, count):
        best = float("inf")
        best_index = 0
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < n
            current = tl.load(score + offs, mask=ok, other=0.0)
            row = tl.load(sim + last * sim_stride_r + offs * sim_stride_c, mask=ok, other=0.0)
            # The previous pick is retired as the row is added: +inf never wins max-sum, -inf never wins k-center.
            if MAXSUM:
                current = tl.where(offs == last, float("inf"), current + row)
                cost = current
            else:
                current = tl.where(offs == last, float("-inf"), tl.minimum(current, 1.0 - row))
                cost = -current
            tl.store(score + offs, current, mask=ok)
            cost = tl.where(ok, cost, float("inf"))
            block_best = tl.min(cost, axis=0)
            block_index = tl.argmin(cost, axis=0) + start
            # Strictly better only: an equal cost in a later block keeps the lower index, as torch.argmin does.
            better = block_best < best
            best_index = tl.where(better, block_index, best_index)
            best = tl.where(better, block_best, best)
        last = best_index.to(tl.int64)
        tl.store(out_ptr + b * count + step, last)
        # The next step reads this step's scores; make every thread's stores visible to the others.
        tl.debug_barrier()


@triton.jit
def _dpp_greedy_kernel(
    kernel_ptr,
    out_ptr,
    residual_ptr,
    basis_ptr,
    n,
    count,
    stride_b,
    stride_r,
    stride_c,
    DEPENDENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per sample runs the whole greedy DPP loop (the reference launches about ten kernels per pick).
    # Scratch per sample: the residuals (n; -inf once picked) and the Cholesky basis rows (count x n).
    b = tl.program_id(0).to(tl.int64)
    kern = kernel_ptr + b * stride_b
    residual = residual_ptr + b * n
    basis = basis_ptr + b * count * n
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(residual + offs, tl.load(kern + offs * (stride_r + stride_c), mask=ok, other=0.0), mask=ok)
    tl.debug_barrier()
    for step in range(0, count):
        best = float("-inf")
        best_index = 0
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            value = tl.load(residual + offs, mask=offs < n, other=float("-inf"))
            block_best = tl.max(value, axis=0)
            block_index = tl.argmax(value, axis=0) + start
            # Strictly better only: an equal residual in a later block keeps the lower index, as torch.argmax.
            better = block_best > best
            best_index = tl.where(better, block_index, best_index)
            best = tl.where(better, block_best, best)
        j = best_index.to(tl.int64)
        tl.store(out_ptr + b * count + step, j)
        d = tl.load(residual + j)
        floor_j = DEPENDENT * tl.load(kern + j * (stride_r + stride_c))
        independent = d > floor_j
        scale = tl.sqrt_rn(tl.where(independent, d, 1.0))
        tl.debug_barrier()  # every thread has read residual[j] before it is overwritten below
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < n
            projection = tl.zeros([BLOCK], dtype=tl.float32)
            for t in range(0, step):
                projection += tl.load(basis + t * n + j) * tl.load(basis + t * n + offs, mask=ok, other=0.0)
            row = tl.load(kern + j * stride_r + offs * stride_c, mask=ok, other=0.0)
            e = tl.where(independent, tl.div_rn(row - projection, scale), 0.0)
            tl.store(basis + step * n + offs, e, mask=ok)
            current = tl.load(residual + offs, mask=ok, other=0.0)
            floor = DEPENDENT * tl.load(kern + offs * (stride_r + stride_c), mask=ok, other=0.0)
            updated = current - e * e
            updated = tl.where(updated <= floor, 0.0, updated)
            # Picked items stay at -inf (never picked again); this step's pick joins them.
            updated = tl.where((current == float("-inf")) | (offs == j), float("-inf"), updated)
            tl.store(residual + offs, updated, mask=ok)
        # The next step reads this step's residuals and basis row; make every thread's stores visible.
        tl.debug_barrier()


# -------------------------------------------------------------------------------------------------- launchers


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every tensor a kernel fills is allocated here, scratch included (tests poison it to catch unwritten rows)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreted() -> bool:
    return not isinstance(_gather_rows_kernel, JITFunction)


def _check_device(tensor: Tensor) -> None:
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu" and _interpreted():
        return
    raise ValueError(
        f"The Triton kernels run on CUDA tensors, but got a tensor on {tensor.device}. Use the reference in "
        "vtprune.kernels.reference, or set TRITON_INTERPRET=1 before triton is imported to run CPU tensors "
        "through Triton's interpreter."
    )


def _target_programs(device: torch.device) -> int:
    """Programs that fill the device: two per SM; a small number under the interpreter so tests split work too."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _launch_context(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current device; a tensor on another GPU needs it switched for the launch.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _merge_dims(sizes: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int] | None:
    """(size, stride) of a run of dims read as one, or None when their strides do not allow it without a copy."""
    pairs = [(n, s) for n, s in zip(sizes, strides, strict=True) if n != 1]
    if not pairs:
        return 1, 0
    size, stride = pairs[-1]
    for n, s in reversed(pairs[:-1]):
        if s != stride * size:
            return None
        size *= n
    return size, stride


def _canonical(x: Tensor, batch_dim: int, token_dim: int) -> list[tuple[int, int]] | None:
    """x seen as (outer, batch, mid, tokens, features): five (size, stride) pairs, or None if x needs a copy."""
    shape, stride = tuple(x.shape), tuple(x.stride())
    groups = [
        _merge_dims(shape[:batch_dim], stride[:batch_dim]),
        (shape[batch_dim], stride[batch_dim]),
        _merge_dims(shape[batch_dim + 1 : token_dim], stride[batch_dim + 1 : token_dim]),
        (shape[token_dim], stride[token_dim]),
        _merge_dims(shape[token_dim + 1 :], stride[token_dim + 1 :]),
    ]
    return None if any(g is None for g in groups) else groups  # type: ignore[return-value]


def _offsets_table(offsets: tuple[int, ...], device: torch.device) -> Tensor:
    """(G,) int64 device tensor of element offsets. Recent tables are kept: a table depends only on the addresses,
    so a repeated call (benchmarks, CUDA graph capture) reuses its table instead of copying a new one."""
    # Keyed by stream too: a table is reused only on the stream whose copy wrote it, so it is always ready there.
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream, offsets)
    table = _OFFSET_TABLES.pop(key, None)
    if table is None:
        table = torch.tensor(offsets, dtype=torch.int64)
        if device.type == "cuda":
            # Pinned memory and a non-blocking copy: the table reaches the GPU without a host-device sync.
            table = table.pin_memory().to(device, non_blocking=True)
    _OFFSET_TABLES[key] = table
    while len(_OFFSET_TABLES) > _OFFSET_TABLES_KEPT:
        _OFFSET_TABLES.pop(next(iter(_OFFSET_TABLES)))
    return table


def _gather_launch(
    sources: list[Tensor],
    index: Tensor,
    batch_dim: int,
    token_dim: int,
    dst_rows: Tensor | None = None,
    packed_rows: int = 0,
) -> list[Tensor]:
    """Gather the token dim of every tensor in ``sources`` (one dtype, shape and stride) in one launch.

    Args:
        sources: tensors of one dtype, shape and stride, batch dim ``batch_dim`` < token dim ``token_dim``.
        index: (B, M) token positions.
        dst_rows: (B, M) contiguous int64 packed output row of each slot, -1 to skip it; None for the padded layout.
        packed_rows: T, the packed row count, when ``dst_rows`` is given.

    Returns:
        One output per source: padded (token dim M), or packed (batch dim 1, token dim T).
    """
    first = sources[0]
    device = first.device
    batch, kept = index.shape
    out_shape = list(first.shape)
    if dst_rows is None:
        out_shape[token_dim] = kept
    else:
        out_shape[batch_dim] = 1
        out_shape[token_dim] = packed_rows
    out_all = _new_output((len(sources), *out_shape), first.dtype, device)
    outputs = list(out_all.unbind(0))
    if out_all.numel() == 0 or kept == 0:
        return outputs

    raw = _RAW_DTYPES[first.element_size()]
    layout = _canonical(first, batch_dim, token_dim)
    if layout is None:
        sources = [s.contiguous() for s in sources]
        layout = _canonical(sources[0], batch_dim, token_dim)
        assert layout is not None
    (n_outer, s_o), (_, s_b), (n_mid, s_mid), (_, s_n), (n_feat, s_f) = layout

    elem = first.element_size()
    # One launch reads every source through element offsets from the first one. Under the interpreter, CUDA
    # tensors are copied to the host one argument at a time, so offsets between allocations would point nowhere
    # there; sources not a whole number of elements apart cannot be reached either: launch those one by one.
    multi = (
        len(sources) > 1
        and not (_interpreted() and device.type == "cuda")
        and all((t.data_ptr() - first.data_ptr()) % elem == 0 for t in sources)
    )
    launches = [sources] if multi else [[s] for s in sources]

    target = _target_programs(device)
    tile_bytes = _MAX_TILE_BYTES
    while True:
        block_f = min(triton.next_power_of_2(n_feat), max(1, tile_bytes // elem))
        block_m = max(1, min(triton.next_power_of_2(kept), tile_bytes // (block_f * elem)))
        m_blocks, f_blocks = triton.cdiv(kept, block_m), triton.cdiv(n_feat, block_f)
        programs = n_outer * batch * n_mid * m_blocks * f_blocks * len(sources)
        if programs >= target or tile_bytes <= _MIN_TILE_BYTES:
            break
        tile_bytes //= 2

    out_numel = out_all[0].numel()
    if dst_rows is None:
        d_m = n_feat
        d_mid, d_b = kept * d_m, n_mid * kept * d_m
        d_o = batch * d_b
    else:
        d_m, d_mid, d_b = n_feat, 0, 0
        d_o = packed_rows * n_feat
    dst_view = out_all.view(raw)
    with _launch_context(device):
        for start, group in enumerate(launches):
            base = group[0].view(raw)
            align, offsets_table = 1, None
            if len(group) > 1:
                offsets = tuple((t.data_ptr() - group[0].data_ptr()) // elem for t in group)
                align = max(1, _VECTOR_BYTES // elem)
                while align > 1 and any(off % align for off in offsets):
                    align //= 2
                offsets_table = _offsets_table(offsets, device)
            dst = dst_view if multi else dst_view[start]
            grid = (n_outer * batch * n_mid * m_blocks * f_blocks, len(group))
            _gather_rows_kernel[grid](
                base,
                offsets_table if offsets_table is not None else index,
                dst,
                index,
                dst_rows if dst_rows is not None else index,
                batch,
                n_mid,
                kept,
                n_feat,
                m_blocks,
                f_blocks,
                s_o,
                s_b,
                s_mid,
                s_n,
                s_f,
                out_numel,
                d_o,
                d_b,
                d_mid,
                d_m,
                index.stride(0),
                index.stride(1),
                BLOCK_M=block_m,
                BLOCK_F=block_f,
                ALIGN=align,
                MULTI=len(group) > 1,
                PACKED=dst_rows is not None,
                num_warps=4,
            )
    return outputs


def _check_gather_dtype(tensor: Tensor, name: str) -> None:
    if tensor.element_size() not in _RAW_DTYPES:
        raise ValueError(
            f"{name} has dtype {tensor.dtype} ({tensor.element_size()}-byte elements); the Triton gather copies "
            "1, 2, 4 or 8-byte elements. Use vtprune.kernels.reference for this dtype."
        )


def gather_tokens(x: Tensor, index: Tensor, dim: int = 1) -> Tensor:
    """Triton version of :func:`vtprune.kernels.reference.gather_tokens` (same arguments, same result, bit for
    bit): ``out[..., b, m, ...] = x[..., b, index[b, m], ...]``, the batch dim right before ``dim``."""
    token_dim = _check_gather_inputs(x, index, dim)
    _check_device(x)
    _check_gather_dtype(x, "x")
    return _gather_launch([x], index, token_dim - 1, token_dim)[0]


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
    """Triton version of :func:`vtprune.kernels.reference.compact_sequence` (same arguments, same result, bit for
    bit). Every cache layer's keys go in one launch and every layer's values in another (one in all when keys and
    values share shape, stride and dtype). ``varlen=True`` packs in the same single pass and syncs with the device
    once, for the packed length and ``max_seqlen`` together."""
    pos_token_dim = _check_compact_inputs(
        index, valid, hidden_states, position_ids, attention_mask, cache, position_dim
    )
    _check_device(index)
    for name, tensor in (("hidden_states", hidden_states), ("position_ids", position_ids),
                         ("attention_mask", attention_mask)):
        if tensor is not None:
            _check_gather_dtype(tensor, name)
    if cache:
        for layer_idx, layer in enumerate(cache):
            for part, tensor in zip(("keys", "values"), layer, strict=True):
                _check_gather_dtype(tensor, f"cache[{layer_idx}] {part}")

    mask_out = None
    if attention_mask is not None:
        mask_out = _gather_launch([attention_mask], index, 0, 1)[0]
    mask_out = _valid_mask(mask_out, valid)
    cache_out = None
    if cache is not None:
        cache_out = _gather_cache(cache, index)

    batch, kept = index.shape
    if not varlen or mask_out is None:
        hidden_out = None if hidden_states is None else _gather_launch([hidden_states], index, 0, 1)[0]
        pos_out = None
        if position_ids is not None:
            pos_out = _gather_launch([position_ids], index, pos_token_dim - 1, pos_token_dim)[0]
        if not varlen:
            return CompactedSequence(hidden_out, pos_out, mask_out, cache_out, None, None)
        return _pack_unmasked(index, hidden_out, pos_out, cache_out, pos_token_dim)

    keep, counts, cu_seqlens = _varlen_counts(mask_out)
    rank = keep.cumsum(dim=1) - 1
    dst_rows = torch.where(keep, cu_seqlens[:-1, None].long() + rank, -1).contiguous()
    # One sync for both numbers (FlashAttention takes max_seqlen as a Python int; T sizes the outputs).
    if batch > 0:
        max_seqlen, total = (int(v) for v in torch.stack((counts.max(), counts.sum())).tolist())
    else:
        max_seqlen, total = 0, 0
    hidden_out = None
    if hidden_states is not None:
        hidden_out = _gather_launch([hidden_states], index, 0, 1, dst_rows, total)[0].squeeze(0)
    pos_out = None
    if position_ids is not None:
        pos_out = _gather_launch([position_ids], index, pos_token_dim - 1, pos_token_dim, dst_rows, total)[0]
    return CompactedSequence(hidden_out, pos_out, None, cache_out, cu_seqlens, max_seqlen)


def _gather_cache(cache: list[tuple[Tensor, Tensor]], index: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Gather every (B, Hkv, N, Dh) tensor of ``cache``, one launch per distinct (dtype, shape, stride)."""
    flat = [tensor for layer in cache for tensor in layer]
    families: dict[tuple[object, ...], list[int]] = {}
    for i, tensor in enumerate(flat):
        families.setdefault((tensor.dtype, tuple(tensor.shape), tensor.stride()), []).append(i)
    out: list[Tensor | None] = [None] * len(flat)
    for members in families.values():
        for i, gathered in zip(members, _gather_launch([flat[i] for i in members], index, 0, 2), strict=True):
            out[i] = gathered
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(cache))]  # type: ignore[misc]


def attention_rows(
    query: Tensor,
    key: Tensor,
    query_positions: Tensor,
    key_padding_mask: Tensor | None,
    scaling: float,
    reduce: str = "mean",
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton version of :func:`vtprune.kernels.reference.attention_rows` (same arguments and result, to fp32
    rounding): two passes over the keys, at most (B, H, Q, N) written, fp32 softmax."""
    _check_attention_inputs(query, key, query_positions, key_padding_mask, reduce)
    _check_device(query)
    for name, tensor in (("query", query), ("key", key)):
        if tensor.dtype not in _ATTENTION_DTYPES:
            raise ValueError(
                f"{name} has dtype {tensor.dtype}; the Triton attention_rows takes float16, bfloat16 or float32. "
                "Use vtprune.kernels.reference for other dtypes."
            )
    batch, heads, n_queries, head_dim = query.shape
    _, kv_heads, n_keys, _ = key.shape
    if n_queries * n_keys >= 2**31:
        raise ValueError(
            f"{n_queries} query rows x {n_keys} keys is too many for one (Q, N) plane of the Triton kernel. "
            "Score fewer query rows per call."
        )
    if min(batch, heads, n_queries, n_keys, head_dim) == 0:
        return _reference_attention_rows(query, key, query_positions, key_padding_mask, scaling, reduce)
    device = query.device
    groups = heads // kv_heads

    # bf16/fp16 products are exact in fp32, so the tensor cores give the reference's logits up to summation
    # order; fp32 (or mixed) inputs take the exact fp32 dot, since TF32 would cost ~1e-3 of relative error.
    # The interpreter has no bf16 dot at all, so it computes every dot in fp32.
    upcast = query.dtype != key.dtype or query.dtype == torch.float32 or _interpreted()
    precision = "ieee" if upcast else "tf32"
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_q = min(64, max(16, triton.next_power_of_2(n_queries)))
    block_n = 64 if block_d <= 128 else 32
    q_blocks = triton.cdiv(n_queries, block_q)
    n_blocks = triton.cdiv(n_keys, block_n)
    target = _target_programs(device)

    splits = min(n_blocks, max(1, triton.cdiv(target, batch * heads * q_blocks)))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, blocks_per_split)
    kv_per_slice = triton.cdiv(kv_heads, min(kv_heads, max(1, triton.cdiv(target, batch * n_blocks * q_blocks))))
    slices = triton.cdiv(kv_heads, kv_per_slice)

    mask = key_padding_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    stats_max = _new_output((batch * heads, splits, n_queries), torch.float32, device)
    stats_sum = _new_output((batch * heads, splits, n_queries), torch.float32, device)
    want_mean = reduce in ("mean", "mean_max")
    want_max = reduce in ("max", "mean_max")
    # With one head slice, the kernel writes the final mean / max; with several, per-slice partials.
    final = slices == 1
    all_out = _new_output((batch, heads, n_queries, n_keys), torch.float32, device) if reduce == "none" else None
    partial_shape = (batch, slices, n_queries, n_keys)

    def reduced_buffer(wanted: bool) -> Tensor | None:
        if not wanted:
            return None
        if final:
            return _new_output((batch, n_queries, n_keys), torch.float32, device)
        return _new_output(partial_shape, torch.float32, device)

    sum_out, max_out = reduced_buffer(want_mean), reduced_buffer(want_max)
    placeholder = stats_max
    common = dict(BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, HAS_MASK=mask is not None, UPCAST=upcast,
                  PRECISION=precision)
    # Both passes must tile the dot alike, so that pass 2 recomputes exactly the logits pass 1 normalised.
    num_warps = 8 if block_q >= 64 else 4
    mask_arg = mask if mask is not None else query_positions
    mask_strides = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    with _launch_context(device):
        _attn_stats_kernel[(batch * heads, q_blocks, splits)](
            query,
            key,
            query_positions,
            mask_arg,
            stats_max,
            stats_sum,
            scaling,
            heads,
            groups,
            n_queries,
            n_keys,
            head_dim,
            blocks_per_split,
            splits,
            *query.stride(),
            *key.stride(),
            *query_positions.stride(),
            *mask_strides,
            num_warps=num_warps,
            **common,
        )
        _attn_probs_kernel[(batch * slices, n_blocks, q_blocks)](
            query,
            key,
            query_positions,
            mask_arg,
            stats_max,
            stats_sum,
            all_out if all_out is not None else placeholder,
            sum_out if sum_out is not None else placeholder,
            max_out if max_out is not None else placeholder,
            scaling,
            1.0 / heads if final else 1.0,
            heads,
            kv_heads,
            kv_per_slice,
            slices,
            n_queries,
            n_keys,
            head_dim,
            splits,
            *query.stride(),
            *key.stride(),
            *query_positions.stride(),
            *mask_strides,
            STORE_ALL=all_out is not None,
            STORE_SUM=sum_out is not None,
            STORE_MAX=max_out is not None,
            GROUPS=groups,
            num_warps=num_warps,
            **common,
        )

    if reduce == "none":
        return all_out  # type: ignore[return-value]
    if not final:
        if sum_out is not None:
            total = _new_output((batch, n_queries, n_keys), torch.float32, device)
            sum_out = torch.sum(sum_out, dim=1, out=total).div_(heads)
        if max_out is not None:
            peak = _new_output((batch, n_queries, n_keys), torch.float32, device)
            max_out = torch.amax(max_out, dim=1, out=peak)
    if reduce == "mean":
        return sum_out  # type: ignore[return-value]
    if reduce == "max":
        return max_out  # type: ignore[return-value]
    return sum_out, max_out  # type: ignore[return-value]


def greedy_diverse(similarity: Tensor, first: Tensor, count: int, rule: str) -> Tensor:
    """Triton version of :func:`vtprune.kernels.reference.greedy_diverse`: the same picks, one launch for the
    whole loop (fp32 sums in the same order as the reference)."""
    _check_greedy_inputs(similarity, first, count, rule)
    _check_device(similarity)
    batch, n, _ = similarity.shape
    out = _new_output((batch, count), torch.long, similarity.device)
    if batch == 0:
        return out
    score = _new_output((batch, n), torch.float32, similarity.device)
    block = min(1024, max(16, triton.next_power_of_2(n)))
    with _launch_context(similarity.device):
        _greedy_diverse_kernel[(batch,)](
            similarity, first.contiguous(), out, score, n, count,
            similarity.stride(0), similarity.stride(1), similarity.stride(2),
            MAXSUM=rule == "maxsum", BLOCK=block,
        )
    return out


def dpp_greedy(kernel: Tensor, count: int) -> Tensor:
    """Triton version of :func:`vtprune.kernels.reference.dpp_greedy`: one launch for the whole loop, one program
    per sample. The projections sum over the basis rows in order where the reference's einsum may not, so on
    near-tied residuals a pick can differ by fp32 rounding; on kernels without near ties the picks are the same."""
    _check_dpp_inputs(kernel, count)
    _check_device(kernel)
    batch, n, _ = kernel.shape
    out = _new_output((batch, count), torch.long, kernel.device)
    if batch == 0:
        return out
    residual = _new_output((batch, n), torch.float32, kernel.device)
    basis = _new_output((batch, count, n), torch.float32, kernel.device)
    block = min(1024, max(16, triton.next_power_of_2(n)))
    with _launch_context(kernel.device):
        _dpp_greedy_kernel[(batch,)](
            kernel, out, residual, basis, n, count, kernel.stride(0), kernel.stride(1), kernel.stride(2),
            DEPENDENT=DPP_DEPENDENT, BLOCK=block,
        )
    return out
