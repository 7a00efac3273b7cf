"""The GPU benchmarks' dry runs on CPU: they must run end to end and write the fields README's tables read, so a
paid GPU call never discovers a broken script (CPU times are never a speed claim)."""

from __future__ import annotations

import json

from vtprune.eval import bench_prefill


def test_bench_prefill_smoke_writes_times_ratios_and_kv(tmp_path) -> None:
    out = tmp_path / "bench_prefill.json"
    code = bench_prefill.main(["--smoke", "--sections", "methods,selection,syncs", "--rounds", "1",
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
