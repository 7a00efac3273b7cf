"""Token kernels of vtprune: gathering kept tokens, compacting a batch, and scoring attention rows.

The pure-PyTorch reference in :mod:`vtprune.kernels.reference` is used everywhere for now. A Triton path for
CUDA tensors will land later behind these same functions, chosen per call by the tensors' device; setting the
environment variable ``VTPRUNE_DISABLE_TRITON=1`` will force the reference. Importing this package never imports
Triton or initialises CUDA, so it works on CPU-only machines.
"""

from vtprune.kernels.reference import CompactedSequence, attention_rows, compact_sequence, gather_tokens

__all__ = ["CompactedSequence", "attention_rows", "compact_sequence", "gather_tokens"]
