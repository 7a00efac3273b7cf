"""Benchmark of vtprune's token kernels on a GPU: checks every Triton kernel against the PyTorch reference, times it
against plain PyTorch, and times an end-to-end prefill of a LLaVA-1.5-7B-shaped random-weight model.

    python -m vtprune.eval.benches.kernels --out $OUT/bench_kernels.json     # on a GPU, about 3 minutes on an H100
    TRITON_INTERPRET=1 python -m vtprune.eval.benches.kernels --smoke        # tiny shapes on CPU: a dry run

Sections (a failing section or case prints its traceback and the rest still run):

- ``copy``: device-to-device copy bandwidth of a 1 GiB buffer (bytes read + written over time), the yardstick.
- ``compaction``: LLaVA-1.5-7B shapes (B = 1 and 8, N = 616 -> 104 kept, D = 4096, KV cache 32 layers x 32 heads
  x 128, bf16) and a 32-frame video (B = 1, N = 6300 -> 718 kept): hidden states, position ids, the whole cache
  in one launch, a full ``compact_sequence`` and its varlen packing; achieved bandwidth as a fraction of the copy,
  speed-up over PyTorch advanced indexing and over the reference (``torch.gather``), bit-exact checks.
- ``probe``: ``attention_rows`` for Q = 1, 8, 32 query rows at N = 616, B = 8 (and long sequences), alone and as
  the adapter's whole probe (q projection of the query rows + RoPE + rows; the keys come from the KV cache), as a
  fraction of one ``LlamaDecoderLayer`` forward (7B shapes, bf16, sdpa) at the same N and B.
- ``e2e``: prefill of B = 8 prompts (616 tokens, 576 image tokens) through a LLaVA-1.5-7B-shaped model (CLIP-L/336
  tower, Llama-7B, random bf16 weights), unpruned, ``vtprune.wrap(model, "uniform", keep=0.11)`` at the projector
  point and at ``llm:2``, and the ideal: vision + projector + the LLM fed only the 40 + 63 kept tokens.

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); p20 / p80 go to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vtprune.eval.benches.harness import (
    FULL,
    SMOKE,
    Report,
    Shapes,
    build_llava,
    default_out,
    graph_ms,
    llama_config,
    llava_inputs,
    run_meta,
    timed,
)

# ------------------------------------------------------------------------------------------------------ helpers


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(raw), b.contiguous().view(raw))


def same_cache(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    if len(a) != len(b):
        return False
    return all(same_bits(x, y) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------- sections


def bench_copy(report: Report, shapes: Shapes, device: torch.device) -> None:
    src = torch.randn(shapes.copy_bytes // 2, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), shapes.warmup_ms, shapes.rep_ms)
    gbps = 2 * nbytes(src) / (t["ms"] * 1e-3) / 1e9
    report.put("copy", "result", {**t, "bytes": 2 * nbytes(src), "GBps": gbps})
    report.row(f"copy {nbytes(src) / 2**20:.0f} MiB (read+write)", f"{gbps:,.0f} GB/s", f"{t['ms']:.3f} ms")


def make_index(batch: int, n_tokens: int, kept: int, device: torch.device) -> torch.Tensor:
    """(B, M) sorted kept positions: different per sample, like a pruner's output."""
    rows = [torch.randperm(n_tokens, device=device)[:kept].sort().values for _ in range(batch)]
    return torch.stack(rows)


def bench_compaction(report: Report, shapes: Shapes, device: torch.device) -> None:
    from vtprune.kernels import reference, triton_kernels

    copy_gbps = report.data["sections"].get("copy", {}).get("result", {}).get("GBps")
    dtype = torch.bfloat16
    for name, batch, n_tokens, kept in shapes.compaction:

        def case(name=name, batch=batch, n_tokens=n_tokens, kept=kept) -> None:
            index = make_index(batch, n_tokens, kept, device)
            hidden = torch.randn(batch, n_tokens, shapes.hidden, device=device, dtype=dtype)
            positions = torch.arange(n_tokens, device=device).repeat(batch, 1)
            mask = torch.ones(batch, n_tokens, dtype=torch.long, device=device)
            cache = [
                tuple(torch.randn(batch, shapes.kv_heads, n_tokens, shapes.head_dim, device=device, dtype=dtype)
                      for _ in range(2))
                for _ in range(shapes.layers)
            ]
            rows_b = torch.arange(batch, device=device)
            heads = torch.arange(shapes.kv_heads, device=device)
            results: dict[str, Any] = {"B": batch, "N": n_tokens, "M": kept}

            def record(label: str, fast: Callable, baselines: dict[str, Callable], moved: int, exact: bool,
                       graphable: bool = True) -> None:
                """Time the Triton call and its baselines, launches included (do_bench) and GPU alone (graph)."""
                entry: dict[str, Any] = {"bytes": moved, "bit_exact_vs_reference": exact}
                notes = []
                for base, fn in {"triton": fast, **baselines}.items():
                    entry[base] = {**timed(fn, shapes.warmup_ms, shapes.rep_ms),
                                   "graph_ms": graph_ms(fn) if graphable else None}
                    if base != "triton":
                        entry[f"speedup_vs_{base}"] = entry[base]["ms"] / entry["triton"]["ms"]
                        notes.append(f"x{entry[f'speedup_vs_{base}']:.1f} vs {base}")
                        if entry[base]["graph_ms"] and entry["triton"]["graph_ms"]:
                            entry[f"gpu_speedup_vs_{base}"] = entry[base]["graph_ms"] / entry["triton"]["graph_ms"]
                gpu_ms = entry["triton"]["graph_ms"] or entry["triton"]["ms"]
                entry["GBps"] = moved / (gpu_ms * 1e-3) / 1e9
                entry["fraction_of_copy"] = entry["GBps"] / copy_gbps if copy_gbps else None
                results[label] = entry
                frac = f"{entry['fraction_of_copy']:.0%} of copy" if copy_gbps else f"{entry['GBps']:,.0f} GB/s"
                graph = entry["triton"]["graph_ms"]
                graph_note = f"GPU {graph * 1e3:,.1f} us, " if graph else ""
                report.row(f"{name} {label}", f"{entry['triton']['ms'] * 1e3:,.1f} us",
                           f"{graph_note}{frac}; {'; '.join(notes)}; exact={exact}")

            # Hidden states (B, N, D) -> (B, M, D).
            flat_index = (index + rows_b[:, None] * n_tokens).flatten()
            out = triton_kernels.gather_tokens(hidden, index)
            exact = same_bits(out, reference.gather_tokens(hidden, index))
            record("hidden", lambda: triton_kernels.gather_tokens(hidden, index),
                   {"adv_index": lambda: hidden[rows_b[:, None], index],
                    "index_select": lambda: hidden.flatten(0, 1).index_select(0, flat_index).view(out.shape),
                    "reference": lambda: reference.gather_tokens(hidden, index)},
                   2 * nbytes(out), exact)

            # Position ids (B, N) int64.
            out = triton_kernels.gather_tokens(positions, index)
            exact = same_bits(out, reference.gather_tokens(positions, index))
            record("position_ids", lambda: triton_kernels.gather_tokens(positions, index),
                   {"adv_index": lambda: positions[rows_b[:, None], index],
                    "reference": lambda: reference.gather_tokens(positions, index)},
                   2 * nbytes(out), exact)

            # The whole KV cache: one launch for all layers' keys and values.
            packed = triton_kernels.compact_sequence(index, cache=cache)
            expected = reference.compact_sequence(index, cache=cache)
            exact = same_cache(packed.cache, expected.cache)
            moved = 2 * sum(nbytes(*layer) for layer in packed.cache)

            def adv_cache() -> list:
                picks = (rows_b[:, None, None], heads[None, :, None], index[:, None, :])
                return [(k[picks], v[picks]) for k, v in cache]

            baselines = {"adv_index": adv_cache, "reference": lambda: reference.compact_sequence(index, cache=cache)}
            if batch == 1:
                baselines["index_select"] = lambda: [(k.index_select(2, index[0]), v.index_select(2, index[0]))
                                                     for k, v in cache]
            record(f"kv_cache_{shapes.layers}x2", lambda: triton_kernels.compact_sequence(index, cache=cache),
                   baselines, moved, exact)

            # Everything a prefill drop touches: hidden, positions, mask and cache.
            def full(module):
                return module.compact_sequence(index, hidden_states=hidden, position_ids=positions,
                                               attention_mask=mask, cache=cache)

            got, want = full(triton_kernels), full(reference)
            fields = ("hidden_states", "position_ids", "attention_mask")
            exact = all(same_bits(getattr(got, f), getattr(want, f)) for f in fields)
            exact = exact and same_cache(got.cache, want.cache)
            moved = 2 * (nbytes(got.hidden_states, got.position_ids, got.attention_mask)
                         + sum(nbytes(*layer) for layer in got.cache))
            record("compact_sequence_all", lambda: full(triton_kernels), {"reference": lambda: full(reference)},
                   moved, exact)

            # Varlen packing with fillers (about 1 in 8 slots) and one host sync.
            valid = torch.rand(batch, kept, device=device) > 0.125

            def varlen(module):
                return module.compact_sequence(index, valid, hidden_states=hidden, position_ids=positions,
                                               attention_mask=mask, varlen=True)

            got, want = varlen(triton_kernels), varlen(reference)
            exact = (same_bits(got.hidden_states, want.hidden_states)
                     and same_bits(got.position_ids, want.position_ids)
                     and torch.equal(got.cu_seqlens, want.cu_seqlens) and got.max_seqlen == want.max_seqlen)
            # Packing syncs with the host once (T sizes the output), so it cannot be captured in a graph.
            record("varlen_pack", lambda: varlen(triton_kernels), {"reference": lambda: varlen(reference)},
                   2 * nbytes(got.hidden_states, got.position_ids), exact, graphable=False)
            report.put("compaction", name, results)

        report.guard(f"compaction/{name}", case)


def bench_probe(report: Report, shapes: Shapes, device: torch.device) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding, rotate_half

    from vtprune.kernels import reference, triton_kernels

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = llama_config(shapes)
    with torch.device(device):
        layer = LlamaDecoderLayer(config, layer_idx=0).to(dtype).eval()
        rotary = LlamaRotaryEmbedding(config=config)
    attn = layer.self_attn
    heads, head_dim, scaling = config.num_attention_heads, shapes.head_dim, shapes.head_dim**-0.5

    def inputs(batch: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = torch.randn(batch, n_tokens, shapes.hidden, device=device, dtype=dtype)
        position_ids = torch.arange(n_tokens, device=device).expand(batch, n_tokens)
        cos, sin = rotary(hidden, position_ids)
        return hidden, position_ids, cos, sin

    batch, n_tokens = shapes.probe_batch, shapes.probe_tokens
    hidden, position_ids, cos, sin = inputs(batch, n_tokens)
    with torch.no_grad():
        layer_t = timed(lambda: layer(hidden, attention_mask=None, position_ids=position_ids,
                                      position_embeddings=(cos, sin)), shapes.warmup_ms, shapes.rep_ms)
    report.put("probe", "decoder_layer", {"B": batch, "N": n_tokens, **layer_t})
    report.row(f"LlamaDecoderLayer fwd B={batch} N={n_tokens}", f"{layer_t['ms'] * 1e3:,.1f} us", "sdpa, 7B shapes")

    def probe(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, mask, rows):
        """The adapter's probe: q for the query rows, k for every token, the model's RoPE, then the rows."""
        batch, n_tokens, _ = hidden.shape
        n_queries = positions.shape[1]
        with torch.no_grad():
            k = attn.k_proj(hidden).view(batch, n_tokens, -1, head_dim).transpose(1, 2)
            k = k * cos[:, None] + rotate_half(k) * sin[:, None]
            picked = [torch.gather(t, 1, positions[..., None].expand(-1, -1, t.shape[-1])) for t in (hidden, cos, sin)]
            q = attn.q_proj(picked[0]).view(batch, n_queries, heads, head_dim).transpose(1, 2)
            q = q * picked[1][:, None] + rotate_half(q) * picked[2][:, None]
            return q, k if rows is None else rows(q, k, positions, mask, scaling, "mean")

    def case(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_queries: int, of_layer: bool) -> None:
        batch, n_tokens, _ = hidden.shape
        # The text query rows sit at the end of the prompt, where the pruners ask for them.
        positions = (torch.arange(n_queries, device=device) + n_tokens - n_queries).expand(batch, n_queries)
        mask = torch.ones(batch, n_tokens, dtype=torch.long, device=device)
        q, k = probe(hidden, cos, sin, positions, mask, None)
        out = triton_kernels.attention_rows(q, k, positions, mask, scaling, "mean")
        ref = reference.attention_rows(q, k, positions, mask, scaling, "mean")
        fast, slow = (
            {**timed(fn, shapes.warmup_ms, shapes.rep_ms), "graph_ms": graph_ms(fn)}
            for fn in (lambda: triton_kernels.attention_rows(q, k, positions, mask, scaling, "mean"),
                       lambda: reference.attention_rows(q, k, positions, mask, scaling, "mean"))
        )
        entry: dict[str, Any] = {"B": batch, "N": n_tokens, "Q": n_queries, "triton": fast, "reference": slow,
                                 "speedup_vs_reference": slow["ms"] / fast["ms"], "rel_error": rel_error(out, ref),
                                 "max_abs_error": float((out - ref).abs().max())}
        note = f"x{entry['speedup_vs_reference']:.1f} vs reference; rel err {entry['rel_error']:.1e}"
        if fast["graph_ms"]:
            note = f"GPU {fast['graph_ms'] * 1e3:,.1f} us; " + note
        if of_layer:
            # The adapter reads layer K-1's keys (RoPE applied) from the KV cache: the probe adds q for the query
            # rows, their RoPE and the rows.
            def cached_probe() -> torch.Tensor:
                with torch.no_grad():
                    picked = [torch.gather(t, 1, positions[..., None].expand(-1, -1, t.shape[-1]))
                              for t in (hidden, cos, sin)]
                    q = attn.q_proj(picked[0]).view(batch, n_queries, heads, head_dim).transpose(1, 2)
                    q = q * picked[1][:, None] + rotate_half(q) * picked[2][:, None]
                    return triton_kernels.attention_rows(q, k, positions, mask, scaling, "mean")

            whole = timed(cached_probe, shapes.warmup_ms, shapes.rep_ms)
            entry["whole_probe"] = whole
            entry["rows_fraction_of_layer"] = fast["ms"] / layer_t["ms"]
            entry["whole_probe_fraction_of_layer"] = whole["ms"] / layer_t["ms"]
            note += (f"; rows {entry['rows_fraction_of_layer']:.1%}, whole probe "
                     f"{entry['whole_probe_fraction_of_layer']:.1%} of a layer")
        report.put("probe", f"rows_B{batch}_N{n_tokens}_Q{n_queries}", entry)
        report.row(f"attention_rows B={batch} N={n_tokens} Q={n_queries}", f"{fast['ms'] * 1e3:,.1f} us", note)

    for n_queries in shapes.probe_queries:
        report.guard(f"probe/Q{n_queries}", lambda n=n_queries: case(hidden, cos, sin, n, True))
    for long_batch, long_n in shapes.probe_long:

        def long_case(b: int = long_batch, n: int = long_n) -> None:
            long_hidden, _, long_cos, long_sin = inputs(b, n)
            case(long_hidden, long_cos, long_sin, max(shapes.probe_queries), False)

        report.guard(f"probe/B{long_batch}_N{long_n}", long_case)


def bench_e2e(report: Report, shapes: Shapes, device: torch.device) -> None:
    import vtprune

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    model = build_llava(shapes, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    report.row("e2e model build", f"{time.perf_counter() - started:.1f} s", f"{params / 1e9:.2f} B params, {dtype}")
    config = model.config
    image_tokens = (shapes.vision["image_size"] // shapes.vision["patch_size"]) ** 2
    batch, text = shapes.e2e_batch, shapes.text_tokens
    length = image_tokens + text
    inputs = llava_inputs(model, shapes, device, dtype)
    keep = 0.11
    # What the uniform pruner keeps at the projector point (checked against its K_in below).
    kept_image = max(1, round(keep * image_tokens))
    results: dict[str, Any] = {"B": batch, "N": length, "image_tokens": image_tokens, "kept_image": kept_image}

    def prefill():
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    def measure(label: str) -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = timed(prefill, shapes.e2e_warmup_ms, shapes.e2e_rep_ms)
        if device.type == "cuda":
            t["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        results[label] = t
        return t

    base = measure("unpruned")
    report.row(f"e2e prefill unpruned B={batch} N={length}", f"{base['ms']:,.2f} ms", "")

    # The ideal: the same vision tower and projector, then the LLM fed only the kept tokens from the start.
    keep_idx = ((torch.arange(kept_image) + 0.5) * image_tokens / kept_image).long().to(device)
    text_ids = torch.cat((inputs["input_ids"][:, :2], inputs["input_ids"][:, 2 + image_tokens :]), dim=1)
    short_mask = torch.ones(batch, text + kept_image, dtype=torch.long, device=device)
    embed = model.get_input_embeddings()

    def ideal():
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
            pooled = getattr(features, "pooler_output", features)
            pooled = torch.stack(list(pooled)) if isinstance(pooled, list | tuple) else pooled
            pooled = pooled.reshape(batch, image_tokens, -1)[:, keep_idx]
            text_embeds = embed(text_ids)
            embeds = torch.cat((text_embeds[:, :2], pooled.to(text_embeds.dtype), text_embeds[:, 2:]), dim=1)
            out = model.model.language_model(inputs_embeds=embeds, attention_mask=short_mask, use_cache=True)
            return model.lm_head(out.last_hidden_state[:, -1:])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results["ideal"] = timed(ideal, shapes.e2e_warmup_ms, shapes.e2e_rep_ms)
    ideal_ms = results["ideal"]["ms"]
    report.row(f"e2e prefill ideal ({text}+{kept_image} tokens)", f"{ideal_ms:,.2f} ms",
               f"{ideal_ms / base['ms']:.3f} of unpruned")

    variants = [("projector", {"where": "projector"}, None), ("llm:2", {"where": "llm:2"}, None),
                ("projector+ref", {"where": "projector"}, "1")]
    for label, options, disable in variants:

        def variant(label=label, options=options, disable=disable) -> None:
            previous = os.environ.get("VTPRUNE_DISABLE_TRITON")
            if disable is not None:
                os.environ["VTPRUNE_DISABLE_TRITON"] = disable
            vtprune.wrap(model, "uniform", keep=keep, **options)
            try:
                prefill()
                stats = model.vtprune.last_stats["samples"][0]
                t = measure(label)
            finally:
                vtprune.unwrap(model)
                if disable is not None:
                    if previous is None:
                        os.environ.pop("VTPRUNE_DISABLE_TRITON")
                    else:
                        os.environ["VTPRUNE_DISABLE_TRITON"] = previous
            t["K_in"], t["K_avg"] = stats["K_in"], stats["K_avg"]
            if label.startswith("projector") and stats["K_in"] != kept_image:
                raise RuntimeError(f"the pruned model kept {stats['K_in']} image tokens, the ideal {kept_image}")
            t["vs_unpruned"] = t["ms"] / base["ms"]
            t["vs_ideal"] = t["ms"] / ideal_ms
            report.row(f"e2e prefill uniform {keep} @{label}", f"{t['ms']:,.2f} ms",
                       f"{t['vs_unpruned']:.3f} of unpruned, {t['vs_ideal']:.2f}x ideal, "
                       f"visual K_in={stats['K_in']}, K_avg={stats['K_avg']:.1f}")

        report.guard(f"e2e/{label}", variant)
    report.put("e2e", "result", results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out("bench_kernels.json"),
                        help="JSON path (default $OUT/bench_kernels.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, for a dry run on CPU (set TRITON_INTERPRET=1 there)")
    parser.add_argument("--sections", default="copy,compaction,probe,e2e",
                        help="comma-separated subset of copy,compaction,probe,e2e")
    args = parser.parse_args(argv)

    shapes = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("without a GPU the kernels only run in Triton's interpreter: set TRITON_INTERPRET=1")
        if not args.smoke:
            parser.error("without a GPU only --smoke makes sense")
        import vtprune.kernels

        # The end-to-end section goes through the public API; send its CPU tensors through the interpreter too.
        vtprune.kernels._force_triton(True)
    import triton

    meta = run_meta(device, args.smoke, triton=triton.__version__, shapes=shapes.__dict__)
    report = Report(args.out, meta)
    print(json.dumps({k: v for k, v in meta.items() if k != "shapes"}), flush=True)
    torch.manual_seed(0)
    sections = {"copy": bench_copy, "compaction": bench_compaction, "probe": bench_probe, "e2e": bench_e2e}
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(sections))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(sections)}")
    total = time.perf_counter()
    for name in wanted:
        report.run(name, lambda fn=sections[name]: fn(report, shapes, device))
    report.put("total", "seconds", round(time.perf_counter() - total, 1))
    report.save()
    report.table()
    print(f"total {time.perf_counter() - total:.1f} s")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
