"""Prefill time of every method on a LLaVA-1.5-7B-shaped model, against the unpruned model and each method's ideal.

    python -m vtprune.eval.benches.prefill --out $OUT/bench_prefill.json      # on a GPU, a few minutes on an H100
    python -m vtprune.eval.benches.prefill --smoke                            # tiny shapes on CPU: a dry run

Sections (a failing case prints its traceback and the rest still run):

- ``methods``: B = 8 prompts (40 text + 576 image tokens, CLIP-L/336 + Llama-7B, random bf16 weights, sdpa),
  ``vtprune.wrap(model, method, keep=0.11, budget=...)`` for every registered method (``vtprune.list_methods()``:
  a new method is timed with no change here), as ``method/input`` and ``method/average`` where the two budgets plan
  differently, else once as ``method``; the methods in ``VARIANTS`` are timed once per option set instead
  (``uniform@projector``, ``uniform@llm:2``, ``todre/maxsum``, ``todre/kcenter``).
  Each is compared with the unpruned model and with its *own ideal*: a hand-written loop over the decoder layers
  that feeds every layer exactly the visual token count the method left there (read from ``last_stats``), with
  the kept rows fixed in advance: the same FLOPs with no selection, no hooks and no bookkeeping. HF's LLaVA forward
  waits for the vision tower before the LLM (it checks the image-token count against the features); the ideal does
  not, so a second ideal with that one wait (``ideal_hf_sync_ms``) shows how much of a gap the pruned path can
  close. The loop itself is checked against HF's forward on the unpruned model (``manual_unpruned``). The method,
  its ideals and the unpruned model are timed in ``--rounds`` interleaved rounds; the medians are reported, with
  every round's time.
- ``selection``: ToDRE's greedy max-sum / k-center loops alone at N = 576, 2,880 (AnyRes) and 6,300 (video), keep
  0.11, B = 1 and 8, D = 4096.
- ``syncs``: every call that makes the host wait for the GPU in one prefill per method (CUDA's sync debug mode),
  counted per source line of vtprune or the adapter ("transformers" where none is on the stack).
- ``profile``: ``torch.profiler`` over one pruned prefill of each case ``--cases`` selects (default: uniform at the
  projector) and its own ideal: GPU busy time, kernel launches, host syncs, the ops with the most host time and the
  kernels with the most device time, to explain the gap to the ideal.

Times are medians of ``triton.testing.do_bench`` on CUDA (CUDA events), wall clock on CPU (smoke only: never a
speed claim).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vtprune.config import BUDGETS
from vtprune.eval.benches.harness import (
    FULL,
    SMOKE,
    Report,
    Shapes,
    build_llava,
    default_out,
    llava_inputs,
    run_meta,
    timed,
)
from vtprune.eval.measure import cache_of, kv_cache_bytes
from vtprune.eval.methods import plans_differ

KEEP = 0.11
# Methods whose options change what there is to time: one case per option set (label suffix -> options) instead of
# the default case. Insertion point for uniform (before the LLM, inside it); ToDRE's two selection rules.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "uniform": {"@projector": {"where": "projector"}, "@llm:2": {"where": "llm:2"}},
    "todre": {"/maxsum": {}, "/kcenter": {"selection": "kcenter"}},
}


def method_cases(num_layers: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, options) of every registered method on an LLM of ``num_layers`` layers: the ``VARIANTS`` of
    a method that has them, else ``method/input`` and ``method/average`` where the budgets plan differently, else
    ``method``."""
    import vtprune

    cases = []
    for method in vtprune.list_methods():
        if method in VARIANTS:
            cases += [(method + suffix, method, options) for suffix, options in VARIANTS[method].items()]
        elif plans_differ(method, KEEP, num_layers):
            cases += [(f"{method}/{budget}", method, {"budget": budget}) for budget in BUDGETS]
        else:
            cases.append((method, method, {}))
    return cases


def infeasible(model: torch.nn.Module, method: str, options: dict[str, Any]) -> str | None:
    """Why ``vtprune.wrap(model, method, keep=KEEP, **options)`` refuses (its own ValueError, e.g. PyramidDrop's
    first stage at layer 8 spends a quarter of the average budget), or None where it wraps."""
    import vtprune

    try:
        vtprune.wrap(model, method, keep=KEEP, **options)
    except ValueError as error:
        return str(error)
    vtprune.unwrap(model)
    return None


def selected(label: str, cases: tuple[str, ...] | None) -> bool:
    return cases is None or any(label.startswith(prefix) for prefix in cases)


class Bench:
    """The 7B-shaped model, its inputs, and the hand-written ideal prefill for any per-layer visual schedule."""

    def __init__(self, shapes: Shapes, device: torch.device) -> None:
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = build_llava(shapes, device, self.dtype)
        self.image_tokens = (shapes.vision["image_size"] // shapes.vision["patch_size"]) ** 2
        self.batch, self.text = shapes.e2e_batch, shapes.text_tokens
        self.length = self.image_tokens + self.text
        self.inputs = llava_inputs(self.model, shapes, device, self.dtype)
        lm = self.model.model.language_model
        params = inspect.signature(type(lm.layers[0]).forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def prefill(self):
        with torch.no_grad():
            return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def ideal(self, counts: list[int], hf_sync: bool = False):
        """A prefill whose decoder layer i sees ``counts[i]`` visual tokens (an even stride of the image, fixed in
        advance) and every text token; returns the function to time. ``hf_sync`` waits for the vision tower before
        the LLM, as HF's LLaVA forward does when it checks the image-token count against the features."""
        from transformers import DynamicCache

        model, lm = self.model, self.model.model.language_model
        config = model.config
        text_ids = torch.cat((self.inputs["input_ids"][:, :2], self.inputs["input_ids"][:, 2 + self.image_tokens:]), 1)
        # Per change of count: the rows of the current sequence to keep (visual rows by an even stride).
        plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        present = torch.arange(self.image_tokens)
        positions = torch.arange(self.length)
        for layer, count in enumerate(counts):
            if count != present.numel() or layer == 0:
                pick = ((torch.arange(count) + 0.5) * present.numel() / count).long()
                rows = torch.cat((torch.arange(2), 2 + pick, torch.arange(2 + present.numel(),
                                                                           2 + present.numel() + self.text - 2)))
                positions = positions[rows]
                present = present[pick]
                plan[layer] = (rows.to(self.device), positions.to(self.device))

        def run():
            with torch.no_grad():
                features = model.model.get_image_features(
                    pixel_values=self.inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy,
                )
                pooled = getattr(features, "pooler_output", features)
                pooled = torch.stack(list(pooled)) if isinstance(pooled, list | tuple) else pooled
                if hf_sync and pooled.is_cuda:
                    torch.cuda.current_stream().synchronize()
                text = model.get_input_embeddings()(text_ids)
                hidden = torch.cat((text[:, :2], pooled.reshape(self.batch, self.image_tokens, -1).to(text.dtype),
                                    text[:, 2:]), dim=1)
                cache = DynamicCache(config=lm.config)
                position_embeddings = None
                for i, layer in enumerate(lm.layers):
                    if i in plan:
                        rows, pos = plan[i]
                        hidden = hidden.index_select(1, rows)
                        pos = pos[None].expand(self.batch, -1)
                        position_embeddings = lm.rotary_emb(hidden, pos)
                    out = layer(hidden, attention_mask=None, position_ids=pos, use_cache=True,
                                position_embeddings=position_embeddings, **{self.cache_kwarg: cache})
                    hidden = out[0] if isinstance(out, tuple) else out
                return model.lm_head(lm.norm(hidden[:, -1:]))

        return run


def cache_mib(output: Any, batch: int) -> float:
    """MiB of K/V one prompt holds after the prefill: every layer's cache tensors as the model returned them."""
    return kv_cache_bytes(cache_of(output)) / batch / 2**20


def bench_methods(report: Report, bench: Bench, shapes: Shapes, rounds: int, cases: tuple[str, ...] | None) -> None:
    import vtprune

    num_layers = len(bench.model.model.language_model.layers)
    results: dict[str, Any] = {"B": bench.batch, "N": bench.length, "image_tokens": bench.image_tokens, "keep": KEEP}
    report.put("methods", "result", results)  # filled case by case: every save holds what was measured so far
    warm, rep = shapes.e2e_warmup_ms, shapes.e2e_rep_ms

    def measure(fn) -> dict[str, float]:
        if bench.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(bench.device)
        t = timed(fn, warm, rep)
        if bench.device.type == "cuda":
            t["peak_GiB"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
        return t

    base = results["unpruned"] = measure(bench.prefill)
    base["kv_MiB_per_prompt"] = cache_mib(bench.prefill(), bench.batch)
    report.row(f"prefill unpruned B={bench.batch} N={bench.length}", f"{base['ms']:,.2f} ms", "")
    loop = bench.ideal([bench.image_tokens] * num_layers)
    # The loop must compute what HF's forward computes, or its times say nothing about the ideal.
    expected, got = bench.prefill().logits[:, -1].float(), loop()[:, -1].float()
    results["manual_rel_error"] = float((got - expected).norm() / expected.norm())
    if results["manual_rel_error"] > (2e-2 if bench.dtype == torch.bfloat16 else 1e-4):
        raise RuntimeError(f"the hand-written loop differs from HF's forward: {results['manual_rel_error']:.2e}")
    manual = results["manual_unpruned"] = measure(loop)
    report.row("hand-written loop, unpruned", f"{manual['ms']:,.2f} ms",
               f"{manual['ms'] / base['ms']:.3f} of HF's forward, rel err {results['manual_rel_error']:.1e}")

    def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
        ordered = sorted(runs, key=lambda t: t["ms"])
        return {**ordered[len(ordered) // 2], "rounds_ms": [round(t["ms"], 3) for t in runs]}

    for label, method, options in method_cases(num_layers):
        if not selected(label, cases):
            continue
        why = infeasible(bench.model, method, options)
        if why is not None:
            report.put("methods", f"infeasible/{label}", why)
            report.row(f"{label} keep={KEEP}", "infeasible", why[:90])
            continue

        def case(label=label, method=method, options=options) -> None:
            vtprune.wrap(bench.model, method, keep=KEEP, **options)
            try:
                kv_mib = cache_mib(bench.prefill(), bench.batch)
                stats = bench.model.vtprune.last_stats
            finally:
                vtprune.unwrap(bench.model)
            per_layer = [sample["tokens_per_layer"] for sample in stats["samples"]]
            counts = per_layer[0]
            ideal_fn, ideal_hf_fn = bench.ideal(counts), bench.ideal(counts, hf_sync=True)
            # The lent GPU drifts between cases (the ideal of one schedule measured 36-56 ms in one run), so the
            # method, its ideal and the unpruned model are timed in interleaved rounds and compared by medians.
            pruned_runs, ideal_runs, ideal_hf_runs, base_runs = [], [], [], []
            for _ in range(rounds):
                vtprune.wrap(bench.model, method, keep=KEEP, **options)
                try:
                    pruned_runs.append(measure(bench.prefill))
                finally:
                    vtprune.unwrap(bench.model)
                ideal_runs.append(measure(ideal_fn))
                ideal_hf_runs.append(measure(ideal_hf_fn))
                base_runs.append(measure(bench.prefill))
            t, ideal, unpruned = median_of(pruned_runs), median_of(ideal_runs), median_of(base_runs)
            ideal_hf = median_of(ideal_hf_runs)
            t.update({
                "ideal_ms": ideal["ms"], "ideal_rounds_ms": ideal["rounds_ms"], "unpruned_ms": unpruned["ms"],
                "ideal_hf_sync_ms": ideal_hf["ms"], "vs_ideal_hf_sync": t["ms"] / ideal_hf["ms"],
                "unpruned_rounds_ms": unpruned["rounds_ms"], "vs_unpruned": t["ms"] / unpruned["ms"],
                "vs_ideal": t["ms"] / ideal["ms"], "kv_MiB_per_prompt": kv_mib,
                "kv_vs_unpruned": kv_mib / base["kv_MiB_per_prompt"],
                "K_in": stats["samples"][0]["K_in"], "K_avg": stats["samples"][0]["K_avg"],
                "tokens_per_layer": counts, "samples_differ": any(c != counts for c in per_layer),
                "select_host_ms": [round(s["seconds"] * 1e3, 3) for s in stats["samples"][0]["stages"]],
            })
            results[label] = t
            report.row(f"{label} keep={KEEP}", f"{t['ms']:,.2f} ms",
                       f"{t['vs_unpruned']:.3f} of unpruned ({unpruned['ms']:,.1f} ms); ideal {ideal['ms']:,.2f} ms "
                       f"-> {t['vs_ideal']:.2f}x (with HF's sync {ideal_hf['ms']:,.2f} ms: "
                       f"{t['vs_ideal_hf_sync']:.2f}x); "
                       f"K_in={t['K_in']}, K_avg={t['K_avg']:.1f}")

        report.guard(f"methods/{label}", case)
    report.put("methods", "result", results)


def bench_selection(report: Report, shapes: Shapes, device: torch.device) -> None:
    import torch.nn.functional as F

    from vtprune.pruners.todre import k_center, max_sum_diversify, nearest_to_mean

    sizes = (576, 2880, 6300) if shapes is FULL else (40, 90)
    results = {}
    for batch in (1, 8) if shapes is FULL else (1, 2):
        for n in sizes:
            def case(batch=batch, n=n) -> None:
                count = round(KEEP * n)
                x = F.normalize(torch.randn(batch, n, shapes.hidden, device=device), dim=-1)
                pivot = nearest_to_mean(x)
                entry = {}
                for name, fn in (("maxsum", max_sum_diversify), ("kcenter", k_center)):
                    entry[name] = timed(lambda fn=fn: fn(x, count, pivot), shapes.warmup_ms, shapes.rep_ms)
                results[f"B{batch}_N{n}"] = {"k": count, **entry}
                report.row(f"todre selection B={batch} N={n} k={count}", f"{entry['maxsum']['ms']:,.2f} ms",
                           f"max-sum; k-center {entry['kcenter']['ms']:,.2f} ms")

            report.guard(f"selection/B{batch}_N{n}", case)
    report.put("selection", "result", results)


def bench_profile(report: Report, bench: Bench, cases: tuple[str, ...] | None = None) -> None:
    """``torch.profiler`` over one pruned prefill of each selected case (default: ``uniform@projector``) and over
    its own ideal: GPU busy time, host syncs, the ops with the most host time and the GPU kernels with the most device
    time, so the gap to the ideal can be attributed to what the method launches."""
    import vtprune

    if bench.device.type != "cuda":
        report.row("profile", "skipped", "needs a GPU")
        return
    from torch.profiler import ProfilerActivity, profile

    num_layers = len(bench.model.model.language_model.layers)
    results: dict[str, Any] = {}
    report.put("profile", "result", results)

    def profiled(fn) -> dict[str, Any]:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - started) * 1e3
        events = prof.key_averages()

        def device_us(e) -> float:
            return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))

        syncs = {e.key: e.count for e in events
                 if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                              "aten::item", "cudaMemcpyAsync", "aten::nonzero")}
        host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        kernels = sorted((e for e in events if device_us(e) > 0), key=device_us, reverse=True)[:15]
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                              "cudaLaunchKernelExC"))
        return {
            "wall_ms_profiled": round(wall, 2),
            "device_busy_ms": round(sum(device_us(e) for e in events) / 1e3, 2),
            "kernel_launches": launches,
            "host_syncs": syncs,
            "top_host_ops": [{"op": e.key, "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)}
                             for e in host],
            "top_device_ops": [{"op": e.key, "count": e.count, "self_device_ms": round(device_us(e) / 1e3, 3)}
                               for e in kernels],
        }

    for label, method, options in method_cases(num_layers):
        if not selected(label, cases or ("uniform@projector",)):
            continue
        if infeasible(bench.model, method, options) is not None:
            continue

        def case(label=label, method=method, options=options) -> None:
            vtprune.wrap(bench.model, method, keep=KEEP, **options)
            try:
                bench.prefill()
                counts = bench.model.vtprune.last_stats["samples"][0]["tokens_per_layer"]
                pruned = profiled(bench.prefill)
            finally:
                vtprune.unwrap(bench.model)
            ideal = profiled(bench.ideal(counts))
            results[label] = {"pruned": pruned, "ideal": ideal}
            report.row(f"profile {label}", f"{pruned['device_busy_ms']:,.2f} ms GPU",
                       f"ideal {ideal['device_busy_ms']:,.2f} ms GPU; launches {pruned['kernel_launches']} vs "
                       f"{ideal['kernel_launches']}; wall {pruned['wall_ms_profiled']:,.1f} vs "
                       f"{ideal['wall_ms_profiled']:,.1f} ms (profiled); syncs {pruned['host_syncs']}")

        report.guard(f"profile/{label}", case)
    report.put("profile", "result", results)


def bench_syncs(report: Report, bench: Bench, cases: tuple[str, ...] | None = None) -> None:
    """Where each method makes the host wait for the GPU: every synchronising call of one prefill (CUDA's sync debug
    mode), grouped by the innermost vtprune / adapter source line that made it."""
    import traceback
    import warnings

    import vtprune

    if bench.device.type != "cuda":
        report.row("syncs", "skipped", "needs a GPU")
        return
    ours = ("/vtprune/", "/adapters/", "/kernels/", "/pruners/")
    benches = os.path.dirname(os.path.abspath(__file__))  # this bench and its harness are not the code measured
    num_layers = len(bench.model.model.language_model.layers)
    results: dict[str, Any] = {}
    report.put("syncs", "result", results)
    for label, method, options in (("unpruned", None, {}), *method_cases(num_layers)):
        if method is not None and (not selected(label, cases) or infeasible(bench.model, method, options)):
            continue
        sites: dict[str, int] = {}

        def record(message, category, filename, lineno, file=None, line=None, sites=sites):
            stack = [f for f in traceback.extract_stack()[:-1] if any(part in f.filename for part in ours)
                     and not f.filename.startswith(benches)]
            where = " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                for f in stack[::-1][:3]) or "transformers"
            sites[where] = sites.get(where, 0) + 1

        if method is not None:
            vtprune.wrap(bench.model, method, keep=KEEP, **options)
        try:
            bench.prefill()
            torch.cuda.synchronize()
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    bench.prefill()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        finally:
            if vtprune.is_wrapped(bench.model):
                vtprune.unwrap(bench.model)
        results[label] = dict(sorted(sites.items(), key=lambda item: -item[1]))
        report.row(f"syncs {label}", f"{sum(sites.values())}", "; ".join(f"{n}x {w}" for w, n in
                                                                       list(results[label].items())[:4]))
    report.put("syncs", "result", results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out("bench_prefill.json"),
                        help="JSON path (default $OUT/bench_prefill.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a dry run on CPU")
    parser.add_argument("--sections", default="methods,selection,profile,syncs",
                        help="comma-separated subset of methods,selection,profile,syncs")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of (method, its ideal, unpruned) per case; medians are reported")
    parser.add_argument("--cases", help="comma-separated prefixes of the method cases to time, count syncs of and "
                        "profile (default: all; profile: uniform@projector), e.g. 'todre,uniform@projector'")
    args = parser.parse_args(argv)
    cases = tuple(c.strip() for c in args.cases.split(",")) if args.cases else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("without a GPU only --smoke makes sense (CPU times are no speed claim)")
    shapes = SMOKE if args.smoke else FULL
    env = "".join(f"{k}={v} " for k, v in sorted(os.environ.items()) if k.startswith("VTPRUNE_"))
    command = env + "python -m vtprune.eval.benches.prefill " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = run_meta(device, args.smoke, date=time.strftime("%Y-%m-%d"), command=command)
    report = Report(args.out, meta)
    print(json.dumps(meta), flush=True)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {"methods", "selection", "profile", "syncs"})
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from methods, selection, profile, syncs")
    total = time.perf_counter()
    bench = Bench(shapes, device) if {"methods", "profile", "syncs"} & set(wanted) else None
    for name in wanted:
        if name == "methods":
            report.run(name, lambda: bench_methods(report, bench, shapes, args.rounds, cases))
        elif name == "selection":
            report.run(name, lambda: bench_selection(report, shapes, device))
        elif name == "syncs":
            report.run(name, lambda: bench_syncs(report, bench, cases))
        else:
            report.run(name, lambda: bench_profile(report, bench, cases))
    report.put("total", "seconds", round(time.perf_counter() - total, 1))
    report.save()
    report.table()
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
