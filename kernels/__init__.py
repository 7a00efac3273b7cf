"""Token kernels of vtprune: gathering kept tokens, compacting a batch, scoring attention rows, greedy diverse
selection and greedy DPP MAP inference.

Each public function with a Triton version picks its implementation per call (``VTPRUNE_TRITON_DPP=0`` keeps
``dpp_greedy`` alone on the reference): the Triton
kernels of :mod:`vtprune.kernels.triton_kernels` for CUDA tensors when Triton imports, the pure-PyTorch reference of
:mod:`vtprune.kernels.reference` otherwise (CPU tensors, no Triton, a dtype the kernels do not take, or inputs that
need autograd, which the kernels do not record). Setting the environment variable ``VTPRUNE_DISABLE_TRITON=1`` forces
the reference. Both paths validate their arguments identically and return the same values (bit for bit for the
gathers).

Importing this package never imports Triton or initialises CUDA, so it works on CPU-only machines; Triton is
imported the first time a CUDA tensor reaches a kernel.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from vtprune.kernels import reference
from vtprune.kernels.reference import CompactedSequence

__all__ = ["CompactedSequence", "attention_rows", "compact_sequence", "diverse_subset", "dpp_greedy",
           "gather_tokens", "greedy_diverse"]

logger = logging.getLogger("vtprune")

_triton_module: ModuleType | None = None
_triton_missing = False
_forced = False


def _force_triton(enabled: bool = True) -> bool:
    """Tests only: send every tensor, CPU ones included, through the Triton kernels; returns the previous setting.

    CPU tensors then run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before
    Triton is first imported. ``VTPRUNE_DISABLE_TRITON`` is ignored while forced.
    """
    global _forced
    previous, _forced = _forced, enabled
    return previous


def _load_triton() -> ModuleType | None:
    global _triton_module, _triton_missing
    if _triton_module is None and not _triton_missing:
        try:
            from vtprune.kernels import triton_kernels
        except ImportError as error:
            if _forced:
                raise
            _triton_missing = True
            logger.info("vtprune: Triton is not available (%s); using the PyTorch kernels. %s", error,
                        "Install the kernels extra for the fast path: pip install 'vtprune[kernels]'.")
            return None
        _triton_module = triton_kernels
    return _triton_module


def _triton_for(op: str, *tensors: Tensor | None) -> ModuleType | None:
    """The Triton kernels module when it should run ``op`` on these tensors, else None (use the reference)."""
    present = [t for t in tensors if t is not None]
    if not _forced:
        if os.environ.get("VTPRUNE_DISABLE_TRITON") == "1":
            return None
        if not present or present[0].device.type != "cuda":
            return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return None
    module = _load_triton()
    if module is None or not module.supports(op, *present):
        return None
    return module


def gather_tokens(x: Tensor, index: Tensor, dim: int = 1) -> Tensor:
    """Gather rows of ``x`` along the token dim ``dim`` with a per-sample index.

    See :func:`vtprune.kernels.reference.gather_tokens` for the arguments; the Triton path returns the same tensor
    bit for bit.
    """
    module = _triton_for("gather", x)
    return (module or reference).gather_tokens(x, index, dim)


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

    See :func:`vtprune.kernels.reference.compact_sequence` for the arguments; the Triton path returns the same
    tensors bit for bit and compacts all cache layers in one launch.
    """
    cache_tensors = [tensor for layer in cache or [] for tensor in layer]
    module = _triton_for("gather", index, hidden_states, position_ids, attention_mask, *cache_tensors)
    return (module or reference).compact_sequence(
        index,
        valid,
        hidden_states=hidden_states,
        position_ids=position_ids,
        attention_mask=attention_mask,
        cache=cache,
        position_dim=position_dim,
        varlen=varlen,
    )


def attention_rows(
    query: Tensor,
    key: Tensor,
    query_positions: Tensor,
    key_padding_mask: Tensor | None,
    scaling: float,
    reduce: str = "mean",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention probabilities of a few query rows against all keys, without the full N x N matrix.

    See :func:`vtprune.kernels.reference.attention_rows` for the arguments; the Triton path matches it to fp32
    rounding (about 1e-6 relative).
    """
    module = _triton_for("attention", query, key)
    return (module or reference).attention_rows(query, key, query_positions, key_padding_mask, scaling, reduce)


def greedy_diverse(similarity: Tensor, first: Tensor, count: int, rule: str) -> Tensor:
    """Greedy max-sum or k-center selection over pairwise similarities, ``count`` picks per sample.

    See :func:`vtprune.kernels.reference.greedy_diverse` for the arguments; the Triton path runs the whole loop in
    one launch and makes the same picks (same fp32 operations in the same order).
    """
    module = _triton_for("greedy", similarity)
    return (module or reference).greedy_diverse(similarity, first, count, rule)


def dpp_greedy(kernel: Tensor, count: int) -> Tensor:
    """Greedy MAP inference of a DPP with incremental Cholesky updates: (B, n, n) fp32 kernels -> (B, count) picks.

    See :func:`vtprune.kernels.reference.dpp_greedy` for the arguments. On CUDA the Triton loop (one launch, one
    program per sample) runs, with the reference's picks (checked on an H200 and under Triton's interpreter); it took
    CDPruner's B = 8 prefill from 57.1 to 46.0 ms on an H200 (README, "Speed"). ``VTPRUNE_TRITON_DPP=0`` keeps the
    reference (a loop of ``count`` batched PyTorch steps).
    """
    module = None if os.environ.get("VTPRUNE_TRITON_DPP") == "0" else _triton_for("dpp", kernel)
    return (module or reference).dpp_greedy(kernel, count)


# Pairwise similarities of a whole batch up to this size (fp32 bytes) are built at once; larger batches (long
# videos) go sample by sample so that the (n, n) matrix of one sample is the peak.
_BATCH_SIMILARITY_BYTES = 2**31
FIRST_PICKS = ("isolated",)


def diverse_subset(x: Tensor, first: Tensor | str, count: int, rule: str) -> Tensor:
    """Greedy diverse subset of each sample's tokens: (B, n, C) fp32 unit-norm tokens -> (B, count) picks in order.

    One GEMM for the cosine similarities of all pairs (the whole batch at once up to 2 GiB, else sample by sample),
    then :func:`greedy_diverse` with ``rule``. ``first``: (B,) long first picks, or ``"isolated"``: the token whose
    most similar other token is least similar (the farthest from its nearest neighbour; ties to the lower index).
    """
    if isinstance(first, str) and first not in FIRST_PICKS:
        raise ValueError(f"first={first!r} is not a (B,) tensor of picks or one of {list(FIRST_PICKS)}.")
    batch, n, _ = x.shape
    if batch > 1 and batch * n * n * 4 > _BATCH_SIMILARITY_BYTES:
        return torch.cat([diverse_subset(x[b : b + 1], first if isinstance(first, str) else first[b : b + 1], count,
                                         rule) for b in range(batch)])
    similarity = x @ x.transpose(1, 2)
    if isinstance(first, str):
        self_pairs = torch.eye(n, dtype=torch.bool, device=x.device)
        nearest = similarity.masked_fill(self_pairs, float("-inf")).amax(dim=2) if n > 1 else similarity[:, 0]
        first = nearest.argmin(dim=1)
    return greedy_diverse(similarity, first, count, rule)
