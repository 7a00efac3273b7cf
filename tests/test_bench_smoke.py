"""The GPU benchmarks' dry runs on CPU: they must run end to end and write the fields README's tables read, so a
paid GPU call never discovers a broken script (CPU times are never a speed claim)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from vtprune.eval.benches import prefill


def test_prefill_bench_smoke_writes_times_ratios_and_kv(tmp_path) -> None:
    out = tmp_path / "bench_prefill.json"
    code = prefill.main(["--smoke", "--sections", "methods,selection,syncs", "--rounds", "1",
                         "--cases", "uniform@projector,adsc/input", "--out", str(out)])
    data = json.loads(out.read_text())
    assert code == 0 and not data["errors"]
    methods = data["sections"]["methods"]["result"]
    assert set(methods) >= {"unpruned", "uniform@projector", "adsc/input"}
    assert "todre/maxsum" not in methods  # --cases filters
    base = methods["unpruned"]["kv_MiB_per_prompt"]
    for label in ("uniform@projector", "adsc/input"):
        entry = methods[label]
        for key in ("ms", "ideal_ms", "ideal_hf_sync_ms", "vs_ideal", "vs_unpruned", "rounds_ms"):
            assert key in entry
        # The cache holds exactly the rows each layer processed.
        text = methods["N"] - methods["image_tokens"]
        layers = len(entry["tokens_per_layer"])
        expected = sum(count + text for count in entry["tokens_per_layer"]) / (methods["N"] * layers)
        assert abs(entry["kv_MiB_per_prompt"] / base - expected) < 1e-9
    assert data["sections"]["selection"]["result"]


def test_prefill_cases_come_from_the_registry(monkeypatch) -> None:
    from dataclasses import dataclass

    from vtprune import registry
    from vtprune.config import PrunerConfig, WhereConfig
    from vtprune.pruners.base import Pruner
    from vtprune.state import Stage

    registry._load_builtins()
    monkeypatch.setattr(registry, "PRUNERS", dict(registry.PRUNERS))  # a private copy: the matrix never sees these

    @dataclass(frozen=True)
    class OnceConfig(WhereConfig):
        method = "bench-once"

    @dataclass(frozen=True)
    class DeepConfig(PrunerConfig):
        method = "bench-deep"

    @registry.register_pruner
    class Once(Pruner):
        config_cls = OnceConfig
        points = ("projector", "llm:K")

        def select(self, ctx):
            raise NotImplementedError

    @registry.register_pruner
    class Deep(Pruner):
        config_cls = DeepConfig
        points = ("llm:K",)

        def plan(self, num_layers):
            return [Stage("llm:2")]

        def select(self, ctx):
            raise NotImplementedError

    cases = {label: (method, options) for label, method, options in prefill.method_cases(32)}
    # A new method is a case with no change to the bench: once where the budgets plan alike (a drop before the
    # LLM), once per budget where they differ (a drop inside it).
    assert cases["bench-once"] == ("bench-once", {})
    assert cases["bench-deep/input"] == ("bench-deep", {"budget": "input"})
    assert cases["bench-deep/average"] == ("bench-deep", {"budget": "average"})
    assert {"uniform@projector", "uniform@llm:2", "todre/maxsum", "todre/kcenter", "apet/input", "adsc/average",
            "random"} <= set(cases)
    assert set(prefill.VARIANTS) <= set(registry.list_methods())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the kernel bench needs triton")
def test_kernels_bench_runs_as_a_module(tmp_path) -> None:
    # A process of its own: the CPU dry run sends every kernel through Triton's interpreter for the whole process.
    out = tmp_path / "bench_kernels.json"
    result = subprocess.run([sys.executable, "-m", "vtprune.eval.benches.kernels", "--smoke", "--sections", "copy",
                             "--out", str(out)], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not data["errors"] and data["meta"]["smoke"] and "triton" in data["meta"]
    assert data["sections"]["copy"]["result"]["GBps"] > 0
