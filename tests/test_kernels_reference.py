"""Tests of the pure-PyTorch token kernels against Python-loop oracles and a real transformers attention layer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor

from vtprune.kernels import CompactedSequence, attention_rows, compact_sequence, gather_tokens

B, N, M = 3, 17, 5


def loop_gather(x: Tensor, index: Tensor, dim: int) -> Tensor:
    """Oracle for gather_tokens: one Python-level select per kept token."""
    per_sample = []
    for b in range(index.shape[0]):
        x_b = x.select(dim - 1, b)
        per_sample.append(torch.stack([x_b.select(dim - 1, int(i)) for i in index[b]], dim=dim - 1))
    return torch.stack(per_sample, dim=dim - 1)


def random_index(batch: int = B, n_tokens: int = N, kept: int = M, seed: int = 0) -> Tensor:
    """(batch, kept) long index: unsorted, with a repeat, different per sample."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(n_tokens, generator=gen)[:kept] for _ in range(batch)])
    index[0, -1] = index[0, 0]
    return index


# ----------------------------------------------------------------------------------------------- gather_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_tokens_hidden_matches_loop(dtype: torch.dtype) -> None:
    x = torch.randn(B, N, 7).to(dtype)
    index = random_index()
    out = gather_tokens(x, index)
    assert out.shape == (B, M, 7) and out.dtype == dtype
    torch.testing.assert_close(out, loop_gather(x, index, 1), rtol=0, atol=0)


def test_gather_tokens_extra_trailing_dims() -> None:
    x = torch.randn(B, N, 2, 3)
    index = random_index()
    torch.testing.assert_close(gather_tokens(x, index), loop_gather(x, index, 1), rtol=0, atol=0)


def test_gather_tokens_plain_positions() -> None:
    x = torch.arange(B * N).view(B, N)
    index = random_index()
    out = gather_tokens(x, index, dim=1)
    assert out.shape == (B, M)
    assert torch.equal(out, loop_gather(x, index, 1))
    assert torch.equal(gather_tokens(x, index, dim=-1), out)


@pytest.mark.parametrize("rows", [3, 4])
def test_gather_tokens_multi_axis_positions(rows: int) -> None:
    x = torch.randint(0, 100, (rows, B, N))
    index = random_index()
    out = gather_tokens(x, index, dim=2)
    assert out.shape == (rows, B, M)
    assert torch.equal(out, loop_gather(x, index, 2))


def test_gather_tokens_int32_index() -> None:
    x = torch.randn(B, N, 4)
    index = random_index()
    torch.testing.assert_close(gather_tokens(x, index.int()), gather_tokens(x, index), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("x_shape", "index", "dim", "match"),
    [
        ((B, N, 4), torch.zeros(M, dtype=torch.long), 1, "2-D"),
        ((B, N, 4), torch.zeros(B + 1, M, dtype=torch.long), 1, "batch size"),
        ((3, B, N), torch.zeros(B + 1, M, dtype=torch.long), 2, "batch size"),
        ((B, N, 4), torch.zeros(B, M), 1, "dtype"),
        ((B, N, 4), torch.zeros(B, M, dtype=torch.long), 0, "no batch dim"),
        ((B, N, 4), torch.zeros(B, M, dtype=torch.long), 3, "out of range"),
        ((N,), torch.zeros(B, M, dtype=torch.long), 0, "batch dim and a token dim"),
    ],
)
def test_gather_tokens_rejects_bad_inputs(x_shape: tuple[int, ...], index: Tensor, dim: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gather_tokens(torch.zeros(x_shape), index, dim=dim)


def test_gather_tokens_rejects_other_device() -> None:
    with pytest.raises(ValueError, match="device|on meta"):
        gather_tokens(torch.zeros(B, N, 4), torch.zeros(B, M, dtype=torch.long, device="meta"))


def test_gather_tokens_out_of_range_raises() -> None:
    index = torch.full((B, M), N)
    with pytest.raises((IndexError, RuntimeError)):
        gather_tokens(torch.zeros(B, N, 4), index)


# -------------------------------------------------------------------------------------------- compact_sequence


def make_batch(n_tokens: int = N, layers: int = 2) -> dict[str, object]:
    """Per-token tensors of a left-padded batch: hidden, 3-row M-RoPE positions, mask, a 2-layer cache."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(B, n_tokens, dtype=torch.long)
    mask[1, :4] = 0
    cache = [
        (torch.randn(B, 2, n_tokens, 4, generator=gen), torch.randn(B, 2, n_tokens, 6, generator=gen))
        for _ in range(layers)
    ]
    return {
        "hidden_states": torch.randn(B, n_tokens, 8, generator=gen),
        "position_ids": torch.randint(0, 50, (3, B, n_tokens), generator=gen),
        "attention_mask": mask,
        "cache": cache,
    }


def make_valid() -> Tensor:
    """(B, M) valid flags: sample 0 keeps all slots, sample 1 three, sample 2 one."""
    valid = torch.ones(B, M, dtype=torch.bool)
    valid[1, 3:] = False
    valid[2, 1:] = False
    return valid


def test_compact_sequence_padded_matches_gathers() -> None:
    batch = make_batch()
    index, valid = random_index(), make_valid()
    out = compact_sequence(index, valid, **batch)
    assert isinstance(out, CompactedSequence)
    torch.testing.assert_close(out.hidden_states, gather_tokens(batch["hidden_states"], index), rtol=0, atol=0)
    assert torch.equal(out.position_ids, gather_tokens(batch["position_ids"], index, dim=2))
    expected_mask = gather_tokens(batch["attention_mask"], index) * valid.long()
    assert out.attention_mask.dtype == torch.long
    assert torch.equal(out.attention_mask, expected_mask)
    assert len(out.cache) == 2
    for (keys, values), (ref_keys, ref_values) in zip(out.cache, batch["cache"], strict=True):
        assert keys.shape == (B, 2, M, 4) and values.shape == (B, 2, M, 6)
        torch.testing.assert_close(keys, loop_gather(ref_keys.transpose(1, 2), index, 1).transpose(1, 2))
        torch.testing.assert_close(values, loop_gather(ref_values.transpose(1, 2), index, 1).transpose(1, 2))
    assert out.cu_seqlens is None and out.max_seqlen is None


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int32])
def test_compact_sequence_keeps_mask_dtype(dtype: torch.dtype) -> None:
    mask = torch.ones(B, N, dtype=dtype)
    index, valid = random_index(), make_valid()
    out = compact_sequence(index, valid, attention_mask=mask)
    assert out.attention_mask.dtype == dtype
    assert torch.equal(out.attention_mask.bool(), valid)


def test_compact_sequence_mask_from_valid_alone() -> None:
    valid = make_valid()
    out = compact_sequence(random_index(), valid, hidden_states=torch.randn(B, N, 8))
    assert out.attention_mask.dtype == torch.long
    assert torch.equal(out.attention_mask, valid.long())
    assert compact_sequence(random_index(), hidden_states=torch.randn(B, N, 8)).attention_mask is None


def test_compact_sequence_plain_positions() -> None:
    positions = torch.arange(N).expand(B, N)
    index = random_index()
    out = compact_sequence(index, position_ids=positions)
    assert torch.equal(out.position_ids, index)


def test_compact_sequence_varlen_packs_valid_rows() -> None:
    batch = make_batch()
    del batch["attention_mask"]
    index, valid = random_index(), make_valid()
    out = compact_sequence(index, valid, varlen=True, **batch)
    rows = [index[b, valid[b]] for b in range(B)]
    expected_hidden = torch.cat([batch["hidden_states"][b, rows[b]] for b in range(B)])
    expected_pos = torch.cat([batch["position_ids"][:, b, rows[b]] for b in range(B)], dim=1).unsqueeze(1)
    torch.testing.assert_close(out.hidden_states, expected_hidden, rtol=0, atol=0)
    assert out.hidden_states.shape == (M + 3 + 1, 8)
    assert torch.equal(out.position_ids, expected_pos)
    assert out.cu_seqlens.dtype == torch.int32
    assert out.cu_seqlens.tolist() == [0, M, M + 3, M + 4]
    assert out.max_seqlen == M and isinstance(out.max_seqlen, int)
    assert out.attention_mask is None
    assert out.cache[0][0].shape == (B, 2, M, 4)


def test_compact_sequence_varlen_plain_positions() -> None:
    positions = torch.arange(N).expand(B, N)
    index, valid = random_index(), make_valid()
    out = compact_sequence(index, valid, position_ids=positions, varlen=True)
    assert out.position_ids.shape == (1, int(valid.sum()))
    assert torch.equal(out.position_ids[0], index[valid])


def test_compact_sequence_varlen_drops_rows_masked_out() -> None:
    batch = make_batch()
    index = random_index()
    index[1, 0] = 0  # sample 1 is left-padded, so this slot points at padding even though it is "valid"
    valid = make_valid()
    out = compact_sequence(index, valid, varlen=True, **batch)
    padded = compact_sequence(index, valid, **batch)
    keep = padded.attention_mask.bool()
    assert not keep[1, 0]
    torch.testing.assert_close(out.hidden_states, padded.hidden_states[keep], rtol=0, atol=0)
    assert out.cu_seqlens[1:].tolist() == keep.sum(1).cumsum(0).tolist()


def test_compact_sequence_varlen_without_masks_keeps_everything() -> None:
    hidden = torch.randn(B, N, 8)
    index = random_index()
    out = compact_sequence(index, hidden_states=hidden, position_ids=torch.arange(N).expand(3, B, N), varlen=True)
    torch.testing.assert_close(out.hidden_states, gather_tokens(hidden, index).flatten(0, 1), rtol=0, atol=0)
    assert out.position_ids.shape == (3, 1, B * M)
    assert out.cu_seqlens.tolist() == [0, M, 2 * M, 3 * M]
    assert out.max_seqlen == M


def test_compact_sequence_rejects_cache_longer_than_prompt() -> None:
    batch = make_batch()
    keys, values = batch["cache"][1]
    batch["cache"][1] = (torch.cat([keys, keys[:, :, :2]], dim=2), torch.cat([values, values[:, :, :2]], dim=2))
    with pytest.raises(ValueError, match="only compacts the prompt"):
        compact_sequence(random_index(), **batch)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"valid": torch.ones(B, M + 1, dtype=torch.bool)}, "one valid flag"),
        ({"valid": torch.ones(B, M, dtype=torch.long)}, "bool"),
        ({"attention_mask": torch.ones(B, N + 1)}, "same token count"),
        ({"attention_mask": torch.ones(B, 1, N, N)}, "2-D"),
        ({"attention_mask": torch.ones(B + 1, N)}, "batch size"),
        ({"position_ids": torch.zeros(3, B, N), "position_dim": 0}, "no batch dim"),
        ({"cache": [(torch.zeros(B, 2, N - 1, 4), torch.zeros(B, 2, N - 1, 4))]}, "same token count"),
        ({"cache": [(torch.zeros(B, N, 4), torch.zeros(B, N, 4))]}, "Hkv"),
        ({"cache": [(torch.zeros(B, 2, N, 4),)]}, "pair"),
    ],
)
def test_compact_sequence_rejects_bad_inputs(kwargs: dict[str, object], match: str) -> None:
    kwargs = {"hidden_states": torch.zeros(B, N, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        compact_sequence(random_index(), **kwargs)


# -------------------------------------------------------------------------------------------- attention_rows


def full_attention(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float, groups: int) -> Tensor:
    """Oracle: (B, H, N, N) causal attention over the full sequence, with repeat_kv-style head sharing."""
    key = key.float().repeat_interleave(groups, dim=1)
    n_tokens = key.shape[2]
    logits = query.float() @ key.transpose(-1, -2) * scaling
    allowed = torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril()[None, None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


def rows_of(full: Tensor, positions: Tensor) -> Tensor:
    """Pick rows ``positions`` (B, Q) from a (B, H, N, N) attention map -> (B, H, Q, N)."""
    index = positions[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3])
    return full.gather(2, index)


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (4, 1)])
def test_attention_rows_matches_full_attention(heads: int, kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(2)
    all_queries = torch.randn(2, heads, N, 8, generator=gen)
    key = torch.randn(2, kv_heads, N, 8, generator=gen)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :5] = 0
    positions = torch.tensor([[N - 1, 7, 9], [N - 1, 5, 12]])
    query = all_queries.gather(2, positions[:, None, :, None].expand(-1, heads, -1, 8))
    expected = rows_of(full_attention(all_queries, key, mask, 8**-0.5, heads // kv_heads), positions)

    probs = attention_rows(query, key, positions, mask, 8**-0.5, reduce="none")
    assert probs.shape == (2, heads, 3, N) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_rows(query, key, positions, mask, 8**-0.5), expected.mean(1))
    torch.testing.assert_close(attention_rows(query, key, positions, mask, 8**-0.5, "max"), expected.amax(1))
    mean, peak = attention_rows(query, key, positions, mask, 8**-0.5, reduce="mean_max")
    torch.testing.assert_close(mean, expected.mean(1))
    torch.testing.assert_close(peak, expected.amax(1))
    assert torch.all(probs[1, :, :, :5] == 0)
    assert torch.all(probs[0, :, 1, 8:] == 0)


def test_attention_rows_gqa_uses_consecutive_heads() -> None:
    # Two very different kv heads: a tiled (h % Hkv) mapping would give visibly different probabilities.
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 1, 8, generator=gen)
    key = torch.stack([torch.randn(N, 8, generator=gen) * 3, -torch.randn(N, 8, generator=gen) * 3])[None]
    positions = torch.tensor([[N - 1]])
    probs = attention_rows(query, key, positions, None, 1.0, reduce="none")
    for head in range(4):
        alone = attention_rows(
            query[:, head : head + 1], key[:, head // 2 : head // 2 + 1], positions, None, 1.0, "none"
        )
        torch.testing.assert_close(probs[:, head], alone[:, 0])
    tiled = attention_rows(query[:, 1:2], key[:, 1:2], positions, None, 1.0, "none")
    assert not torch.allclose(probs[:, 1], tiled[:, 0], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_rows_low_precision_inputs_give_fp32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(2, 4, 3, 8, generator=gen).to(dtype)
    key = torch.randn(2, 2, N, 8, generator=gen).to(dtype)
    positions = torch.tensor([[3, 9, N - 1], [0, 1, 2]])
    out = attention_rows(query, key, positions, None, 8**-0.5)
    assert out.dtype == torch.float32
    expected = attention_rows(query.float(), key.float(), positions, None, 8**-0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))


def test_attention_rows_padding_query_gives_zeros() -> None:
    mask = torch.ones(1, N, dtype=torch.bool)
    mask[0, :4] = False
    out = attention_rows(torch.randn(1, 2, 2, 8), torch.randn(1, 2, N, 8), torch.tensor([[2, 6]]), mask, 1.0)
    assert torch.all(out[0, 0] == 0)
    torch.testing.assert_close(out[0, 1].sum(), torch.tensor(1.0))
    assert not out.isnan().any()


@pytest.mark.parametrize(
    ("query_shape", "key_shape", "positions", "mask", "reduce", "match"),
    [
        ((2, 4, 3, 8), (2, 2, N, 8), torch.zeros(2, 3, dtype=torch.long), None, "sum", "reduce"),
        ((4, 3, 8), (2, 2, N, 8), torch.zeros(2, 3, dtype=torch.long), None, "mean", r"\(B, H, Q, Dh\)"),
        ((2, 4, 3, 8), (2, 3, N, 8), torch.zeros(2, 3, dtype=torch.long), None, "mean", "multiple"),
        ((2, 4, 3, 8), (1, 2, N, 8), torch.zeros(2, 3, dtype=torch.long), None, "mean", "batch size"),
        ((2, 4, 3, 8), (2, 2, N, 16), torch.zeros(2, 3, dtype=torch.long), None, "mean", "head dim"),
        ((2, 4, 3, 8), (2, 2, N, 8), torch.zeros(2, 4, dtype=torch.long), None, "mean", "query_positions"),
        ((2, 4, 3, 8), (2, 2, N, 8), torch.zeros(2, 3), None, "mean", "dtype"),
        ((2, 4, 3, 8), (2, 2, N, 8), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, N + 1), "mean", "padding"),
    ],
)
def test_attention_rows_rejects_bad_inputs(
    query_shape: tuple[int, ...],
    key_shape: tuple[int, ...],
    positions: Tensor,
    mask: Tensor | None,
    reduce: str,
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        attention_rows(torch.zeros(query_shape), torch.zeros(key_shape), positions, mask, 1.0, reduce=reduce)


def test_attention_rows_rejects_integer_states() -> None:
    with pytest.raises(ValueError, match="floating point"):
        attention_rows(
            torch.zeros(1, 2, 1, 8, dtype=torch.long), torch.zeros(1, 2, N, 8), torch.zeros(1, 1).long(), None, 1.0
        )


def test_attention_rows_matches_transformers_eager_llama() -> None:
    """Probe: recompute rows of layer 1's eager attention map of a tiny Llama from its hook inputs and KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float32

    length = 11
    input_ids = torch.randint(0, 64, (2, length))
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, :3] = 0
    self_attn = model.model.layers[1].self_attn
    captured: dict[str, object] = {}

    def capture(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        captured["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["position_embeddings"] = kwargs["position_embeddings"]

    handle = self_attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=True)
    finally:
        handle.remove()

    with torch.no_grad():
        hidden = captured["hidden_states"]
        query = self_attn.q_proj(hidden).view(2, length, -1, self_attn.head_dim).transpose(1, 2)
        cos, sin = captured["position_embeddings"]
        query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    # transformers 5.24 renamed the output field past_key_values -> cache; 5.17 has only the old name.
    cache = out.cache if "cache" in out else out.past_key_values
    keys = cache.layers[1].keys
    assert keys.shape == (2, 2, length, self_attn.head_dim)

    positions = torch.tensor([[length - 1, 4, 1], [length - 1, 6, 1]])
    row_query = query.gather(2, positions[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))
    mean, peak = attention_rows(row_query, keys, positions, attention_mask, self_attn.scaling, reduce="mean_max")
    reference = rows_of(out.attentions[1], positions)

    real = attention_mask.gather(1, positions).bool()
    assert real.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(mean[real], reference.mean(1)[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(peak[real], reference.amax(1)[real], rtol=0, atol=1e-5)
    # Eager adds finfo.min to masked logits, so masked keys get exactly zero probability there as well.
    assert torch.all(reference[1, :, :2, :3] == 0)
    # A padding query sees no key: eager returns a uniform row, attention_rows returns zeros.
    torch.testing.assert_close(reference[1, :, 2], torch.full((4, length), 1 / length))
    assert torch.all(mean[1, 2] == 0)


# ------------------------------------------------------------------------------------------------------ import


def test_import_does_not_load_triton_or_cuda() -> None:
    code = (
        "import sys, torch\n"
        "before = {name for name in sys.modules if name.split('.')[0] == 'triton'}\n"
        "import vtprune.kernels\n"
        "after = {name for name in sys.modules if name.split('.')[0] == 'triton'}\n"
        "assert after == before, sorted(after - before)\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
