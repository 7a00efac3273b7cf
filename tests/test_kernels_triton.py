"""The Triton kernels against the PyTorch reference: irregular shapes, every dtype, poisoned outputs.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter, which reads
``TRITON_INTERPRET=1`` when Triton is first imported, so this module sets it before importing Triton. On a GPU
machine the same cases run compiled on CUDA tensors, and the CPU cases run in a subprocess under the interpreter.
Every output the kernels allocate is filled with NaN bit patterns first, so an unwritten row cannot pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError:
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

import vtprune.kernels as kernels
from vtprune.kernels import reference

INSTALL_HINT = "Triton is not installed: install the kernels extra: pip install -e '.[kernels]'"

if HAVE_TRITON:
    from vtprune.kernels import triton_kernels

    INTERPRETED = triton_kernels._interpreted()
else:
    triton_kernels = None
    INTERPRETED = False

CPU_REASON = "the CPU cases run in a subprocess under TRITON_INTERPRET=1 (test_cpu_cases_under_interpreter)"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(HAVE_TRITON and not INTERPRETED, reason=CPU_REASON)),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Raw bit patterns that are NaN in every float format of their width (and odd values for integers and bools).
POISON = {1: 0xAB, 2: 0x7FC1, 4: 0x7FC00001, 8: 0x7FF8000000000001}
RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(autouse=True)
def _require_triton() -> None:
    if not HAVE_TRITON:
        pytest.fail(INSTALL_HINT)


@pytest.fixture
def triton_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Size]]:
    """Route kernels through Triton (forced for CPU tensors), poison every output, record output shapes."""
    allocated: list[torch.Size] = []
    allocate = triton_kernels._new_output

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        out = allocate(shape, dtype, device)
        out.view(RAW[out.element_size()]).fill_(POISON[out.element_size()])
        allocated.append(out.shape)
        return out

    monkeypatch.setattr(triton_kernels, "_new_output", poisoned)
    monkeypatch.delenv("VTPRUNE_DISABLE_TRITON", raising=False)
    previous = kernels._force_triton(True)
    try:
        yield allocated
    finally:
        kernels._force_triton(previous)


def bits_equal(out: Tensor, expected: Tensor) -> None:
    """Bit-exact comparison (the gathers are copies); NaN poison or a wrong row fails it."""
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.device == expected.device
    raw = RAW[out.element_size()]
    assert torch.equal(out.contiguous().view(raw), expected.contiguous().view(raw))


def make_index(batch: int, n_tokens: int, kept: int, seed: int, device: str, dtype=torch.long) -> Tensor:
    """(batch, kept) unsorted index with a repeated entry, different per sample."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(n_tokens, generator=gen)[:kept] for _ in range(batch)])
    index[0, -1] = index[0, 0]
    return index.to(device=device, dtype=dtype)


def randn(*shape: int, dtype=torch.float32, device: str = "cpu", seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------- gather_tokens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gather_tokens_hidden(device: str, dtype: torch.dtype, triton_path: list) -> None:
    for batch, n_tokens, kept, width, index_dtype in ((3, 37, 11, 40, torch.long), (2, 70, 33, 128, torch.int32)):
        x = randn(batch, n_tokens, width, dtype=dtype, device=device, seed=width)
        index = make_index(batch, n_tokens, kept, seed=kept, device=device, dtype=index_dtype)
        triton_path.clear()
        bits_equal(kernels.gather_tokens(x, index), reference.gather_tokens(x, index))
        assert triton_path == [torch.Size((1, batch, kept, width))]


@pytest.mark.parametrize("device", DEVICES)
def test_gather_tokens_layouts(device: str, triton_path: list) -> None:
    """Position ids (B, N), (P, B, N); bool masks; trailing dims; transposed, sliced and stride-0 inputs."""
    batch, n_tokens, kept = 3, 29, 9
    index = make_index(batch, n_tokens, kept, seed=1, device=device)
    positions = torch.randint(0, 1000, (4, batch, n_tokens), device=device)
    cos = randn(1, n_tokens, 12, device=device).expand(batch, n_tokens, 12)
    cases = [
        (positions[0], 1),
        (positions[0].int(), -1),
        (positions[:3], 2),
        (positions.int(), -1),
        (torch.arange(n_tokens, device=device).expand(batch, n_tokens), 1),
        (torch.rand(batch, n_tokens, device=device) > 0.5, 1),
        (randn(batch, n_tokens, 2, 3, device=device), 1),
        (randn(batch, 5, n_tokens, device=device).transpose(1, 2), 1),
        (randn(batch, n_tokens, 24, device=device, dtype=torch.bfloat16)[..., 3:19], 1),
        (cos, 1),
        (randn(2, batch, 3, n_tokens, 8, device=device), 3),
    ]
    for x, dim in cases:
        bits_equal(kernels.gather_tokens(x, index, dim=dim), reference.gather_tokens(x, index, dim=dim))


# -------------------------------------------------------------------------------------------- compact_sequence


def compact_inputs(device: str, dtype: torch.dtype, mask_dtype: torch.dtype | None, rope_rows: int):
    batch, n_tokens, kept, heads = 3, 23, 8, 2
    gen = torch.Generator().manual_seed(5)
    index = make_index(batch, n_tokens, kept, seed=4, device=device).sort(dim=1).values
    valid = torch.ones(batch, kept, dtype=torch.bool)
    valid[1, :3] = False  # sample 1 keeps fewer tokens: filler slots on the left
    valid[2, 0] = False
    mask = None
    if mask_dtype is not None:
        mask = torch.ones(batch, n_tokens)
        mask[2, :4] = 0  # left padding
        mask = mask.to(device=device, dtype=mask_dtype)
    shape = (batch, n_tokens) if rope_rows == 0 else (rope_rows, batch, n_tokens)
    positions = torch.randint(0, 500, shape, generator=gen).to(device)
    cache = []
    for layer in range(3):
        keys = randn(batch, heads, n_tokens, 16, dtype=dtype, device=device, seed=10 + layer)
        values = randn(batch, heads, n_tokens, 24, dtype=dtype, device=device, seed=20 + layer)
        cache.append((keys, values))
    # A layer stored (B, N, Hkv, Dh) and viewed transposed has other strides: it gets its own launch.
    cache.append((randn(batch, n_tokens, heads, 16, dtype=dtype, device=device).transpose(1, 2), cache[0][1]))
    hidden = randn(batch, n_tokens, 40, dtype=dtype, device=device, seed=3)
    return index, valid.to(device), dict(hidden_states=hidden, position_ids=positions, attention_mask=mask,
                                         cache=cache)


def assert_same_compaction(out, expected) -> None:
    for name in ("hidden_states", "position_ids", "attention_mask", "cu_seqlens"):
        got, want = getattr(out, name), getattr(expected, name)
        assert (got is None) == (want is None), name
        if want is not None:
            bits_equal(got, want)
    assert out.max_seqlen == expected.max_seqlen and type(out.max_seqlen) is type(expected.max_seqlen)
    assert len(out.cache) == len(expected.cache)
    for got, want in zip(out.cache, expected.cache, strict=True):
        bits_equal(got[0], want[0])
        bits_equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("varlen", [False, True])
def test_compact_sequence(device: str, dtype: torch.dtype, varlen: bool, triton_path: list) -> None:
    mask_dtype = {torch.float32: torch.long, torch.bfloat16: torch.bool, torch.float16: torch.float32}[dtype]
    index, valid, batch = compact_inputs(device, dtype, mask_dtype, rope_rows=3 if varlen else 0)
    out = kernels.compact_sequence(index, valid, varlen=varlen, **batch)
    assert triton_path, "the Triton path did not run"
    assert_same_compaction(out, reference.compact_sequence(index, valid, varlen=varlen, **batch))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("with_valid", "mask_dtype", "rope_rows"), [(False, None, 3), (True, None, 0),
                                                                     (False, torch.long, 4)])
def test_compact_sequence_mask_variants(device: str, with_valid: bool, mask_dtype, rope_rows: int,
                                        triton_path: list) -> None:
    index, valid, batch = compact_inputs(device, torch.bfloat16, mask_dtype, rope_rows)
    valid = valid if with_valid else None
    for varlen in (False, True):
        out = kernels.compact_sequence(index, valid, varlen=varlen, **batch)
        assert_same_compaction(out, reference.compact_sequence(index, valid, varlen=varlen, **batch))


@pytest.mark.parametrize("device", DEVICES)
def test_compact_sequence_cache_in_one_launch(device: str, triton_path: list, monkeypatch) -> None:
    launches: list[int] = []
    launch = triton_kernels._gather_launch

    def counted(sources, *args, **kwargs):
        launches.append(len(sources))
        return launch(sources, *args, **kwargs)

    monkeypatch.setattr(triton_kernels, "_gather_launch", counted)
    index = make_index(2, 19, 7, seed=6, device=device)
    cache = [tuple(randn(2, 3, 19, 8, dtype=torch.bfloat16, device=device, seed=2 * i + j) for j in range(2))
             for i in range(5)]
    out = kernels.compact_sequence(index, cache=cache)
    assert launches == [10]
    assert_same_compaction(out, reference.compact_sequence(index, cache=cache))


# ---------------------------------------------------------------------------------------------- attention_rows


def attention_inputs(device: str, dtype: torch.dtype, batch: int, heads: int, kv_heads: int, n_queries: int,
                     n_keys: int, head_dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    query = (torch.randn(batch, heads, n_queries, head_dim, generator=gen) * 2).to(device=device, dtype=dtype)
    # Keys stored (B, N, Hkv, Dh) and viewed as (B, Hkv, N, Dh), as the adapter's k_proj(...).transpose(1, 2) is.
    key = torch.randn(batch, n_keys, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    key = key.transpose(1, 2)
    positions = torch.randint(0, n_keys, (batch, n_queries), generator=gen)
    positions[:, 0] = n_keys - 1
    mask = torch.ones(batch, n_keys, dtype=torch.bool)
    mask[-1, :5] = False  # left padding of the last sample...
    if n_queries > 1:
        positions[-1, -1] = 2  # ...with a padding query that sees no key at all
    return query, key, positions.to(device), mask.to(device)


def assert_probs_close(out, expected, dtype: torch.dtype) -> None:
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    out = out if isinstance(out, tuple) else (out,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for got, want in zip(out, expected, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "n_queries", "n_keys", "head_dim"),
    [
        (2, 8, 4, 3, 77, 24),  # GQA, odd head dim, keys not a multiple of the key block, 2 kv heads per slice
        (1, 2, 2, 1, 200, 16),  # one query, several key splits and head slices
        (2, 3, 1, 70, 45, 32),  # MQA, more queries than one 64-row block, one head slice
    ],
)
def test_attention_rows(device, dtype, batch, heads, kv_heads, n_queries, n_keys, head_dim, triton_path) -> None:
    query, key, positions, mask = attention_inputs(device, dtype, batch, heads, kv_heads, n_queries, n_keys,
                                                   head_dim, seed=n_keys)
    scaling = head_dim**-0.5
    for reduce, key_mask in (("none", mask), ("mean_max", mask.long()), ("mean", None), ("max", mask.float())):
        triton_path.clear()
        out = kernels.attention_rows(query, key, positions, key_mask, scaling, reduce)
        assert triton_path, "the Triton path did not run"
        assert_probs_close(out, reference.attention_rows(query, key, positions, key_mask, scaling, reduce), dtype)
    if n_queries > 1:
        probs = kernels.attention_rows(query, key, positions, mask, scaling, "none")
        assert torch.all(probs[-1, :, -1] == 0), "a query that sees no key must get zeros"


@pytest.mark.parametrize("device", DEVICES)
def test_attention_rows_sums_to_one_on_long_rows(device: str, triton_path: list) -> None:
    query, key, positions, mask = attention_inputs(device, torch.bfloat16, 1, 2, 1, 2, 300, 16, seed=9)
    out = kernels.attention_rows(query, key, positions, None, 0.25, "none")
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 2, 2, device=device), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- dispatch, errors



# ----------------------------------------------------------------------------------------------- greedy_diverse


def unit_similarity(batch: int, n: int, device: str, seed: int, duplicates: bool = False) -> Tensor:
    x = torch.nn.functional.normalize(randn(batch, n, 16, seed=seed), dim=-1)
    if duplicates:
        # Repeated tokens give exactly equal similarities: the picks must break those ties like torch.argmin.
        x[:, 1::3] = x[:, 0:1]
    return (x @ x.transpose(1, 2)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["maxsum", "kcenter"])
@pytest.mark.parametrize(("batch", "n", "count", "duplicates"), [(1, 1, 1, False), (3, 37, 9, False),
                                                                 (2, 1100, 6, False), (2, 40, 30, True)])
def test_greedy_diverse(device: str, rule: str, batch: int, n: int, count: int, duplicates: bool,
                        triton_path: list) -> None:
    similarity = unit_similarity(batch, n, device, seed=n, duplicates=duplicates)
    first = torch.arange(batch, device=device) % n
    expected = reference.greedy_diverse(similarity, first, count, rule)
    got = kernels.greedy_diverse(similarity, first, count, rule)
    assert triton_path, "the Triton path did not run"
    assert torch.equal(got, expected)
    assert all(row.unique().numel() == count for row in got)
    assert torch.equal(got[:, 0], first)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_diverse_rejects_bad_inputs(device: str) -> None:
    similarity = unit_similarity(2, 5, device, seed=0)
    first = torch.zeros(2, dtype=torch.long, device=device)
    for module in (reference, triton_kernels):
        with pytest.raises(ValueError, match="rule"):
            module.greedy_diverse(similarity, first, 2, "dpp")
        with pytest.raises(ValueError, match="count"):
            module.greedy_diverse(similarity, first, 6, "maxsum")
        with pytest.raises(ValueError, match="float32"):
            module.greedy_diverse(similarity.double(), first, 2, "maxsum")
        with pytest.raises(ValueError, match=r"\(B, n, n\)"):
            module.greedy_diverse(similarity[:, :4], first, 2, "maxsum")
        with pytest.raises(ValueError, match="first"):
            module.greedy_diverse(similarity, first.int(), 2, "maxsum")

# --------------------------------------------------------------------------------------------------- dpp_greedy


def dpp_kernel(batch: int, n: int, rank: int, device: str, seed: int) -> Tensor:
    """(B, n, n) PSD kernel of rank <= ``rank`` with distinct diagonal entries (no near-tied residuals at first)."""
    x = randn(batch, n, rank, seed=seed)
    weights = torch.linspace(1.0, 2.0, n)[None, :, None]
    return ((x * weights) @ (x * weights).transpose(1, 2)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "n", "rank", "count"), [(1, 1, 1, 1), (3, 37, 16, 9), (2, 1100, 24, 6),
                                                           (2, 20, 4, 12)])
def test_dpp_greedy(device: str, batch: int, n: int, rank: int, count: int, triton_path: list,
                    monkeypatch) -> None:
    monkeypatch.delenv("VTPRUNE_TRITON_DPP", raising=False)  # the default: Triton where it can run
    kernel = dpp_kernel(batch, n, rank, device, seed=n)
    expected = reference.dpp_greedy(kernel, count)
    got = kernels.dpp_greedy(kernel, count)
    assert triton_path, "the Triton path did not run"
    # Rank 4 < 12 picks: after the 4 picks by determinant the rest go by index, in both paths.
    assert torch.equal(got, expected)
    assert all(row.unique().numel() == count for row in got)


@pytest.mark.parametrize("device", DEVICES)
def test_dpp_greedy_opts_out_and_rejects_bad_inputs(device: str, triton_path: list, monkeypatch) -> None:
    kernel = dpp_kernel(2, 6, 3, device, seed=0)
    monkeypatch.setenv("VTPRUNE_TRITON_DPP", "0")
    kernels.dpp_greedy(kernel, 2)
    assert not triton_path, "with VTPRUNE_TRITON_DPP=0 the reference must run"
    with pytest.raises(ValueError, match="count"):
        triton_kernels.dpp_greedy(kernel, 7)
    with pytest.raises(ValueError, match="float32"):
        triton_kernels.dpp_greedy(kernel.double(), 2)
    with pytest.raises(ValueError, match=r"\(B, n, n\)"):
        triton_kernels.dpp_greedy(kernel[:, :4], 2)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_falls_back_to_the_reference(device: str, monkeypatch) -> None:
    calls: list[str] = []
    allocate = triton_kernels._new_output

    def recorded(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        calls.append("triton")
        return allocate(shape, dtype, device)

    monkeypatch.setattr(triton_kernels, "_new_output", recorded)
    x = randn(2, 9, 4, device=device)
    index = make_index(2, 9, 3, seed=0, device=device)
    kernels.gather_tokens(x, index)
    if device == "cuda":
        assert calls == ["triton"], "CUDA tensors must take the Triton path"
        calls.clear()
        monkeypatch.setenv("VTPRUNE_DISABLE_TRITON", "1")
        kernels.gather_tokens(x, index)
        monkeypatch.delenv("VTPRUNE_DISABLE_TRITON")
    assert calls == [], "CPU tensors and VTPRUNE_DISABLE_TRITON=1 must take the reference"
    previous = kernels._force_triton(True)
    try:
        # Autograd needs the reference (the kernels record no graph), and fp64 logits are the reference's alone.
        out = kernels.gather_tokens(x.requires_grad_(), index)
        assert out.requires_grad and calls == []
        kernels.attention_rows(randn(1, 2, 1, 8, dtype=torch.float64, device=device),
                               randn(1, 2, 9, 8, dtype=torch.float64, device=device),
                               torch.zeros(1, 1, dtype=torch.long, device=device), None, 1.0)
        assert calls == []
    finally:
        kernels._force_triton(previous)


@pytest.mark.parametrize("device", DEVICES)
def test_launchers_reject_bad_inputs(device: str) -> None:
    x = randn(2, 9, 4, device=device)
    with pytest.raises(ValueError, match="2-D"):
        triton_kernels.gather_tokens(x, torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="batch size"):
        triton_kernels.compact_sequence(make_index(3, 9, 2, 0, device), hidden_states=x)
    with pytest.raises(ValueError, match="byte elements"):
        triton_kernels.gather_tokens(x.to(torch.complex128), make_index(2, 9, 2, 0, device))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        triton_kernels.attention_rows(randn(1, 2, 1, 8, device=device).double(),
                                      randn(1, 2, 9, 8, device=device).double(),
                                      torch.zeros(1, 1, dtype=torch.long, device=device), None, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        triton_kernels.attention_rows(randn(1, 3, 1, 8, device=device), randn(1, 2, 9, 8, device=device),
                                      torch.zeros(1, 1, dtype=torch.long, device=device), None, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_launcher_rejects_cpu_tensors() -> None:
    if INTERPRETED:
        pytest.skip("this process runs the kernels in the interpreter")
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_kernels.gather_tokens(torch.zeros(1, 3, 2), torch.zeros(1, 2, dtype=torch.long))


if HAVE_TRITON and not INTERPRETED:

    def test_cpu_cases_under_interpreter() -> None:
        """Where this process compiles for CUDA, run the CPU cases in a fresh interpreter-mode process."""
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu", str(Path(__file__))],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
