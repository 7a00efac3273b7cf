#!/usr/bin/env bash
# The benchmark call on the lent GPU (one H100/H200): kernels, per-method prefill, then accuracy of every method on
# the reference checkpoints. Run from the repository root after installing the project:
#   python3 -m pip install --no-build-isolation --no-deps -e . && bash eval/gpu_bench.sh "$OUT"
# Timings run first and alone, so the accuracy processes cannot disturb them.
set -uo pipefail
out="${1:?usage: gpu_bench.sh OUT_DIR}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 150 python3 -m vtprune.eval.bench_kernels --sections copy,probe,e2e --out "$out/bench_kernels.json"
timeout 200 python3 -m vtprune.eval.bench_prefill --out "$out/bench_prefill.json"
timeout "${ACCURACY_SECONDS:-200}" python3 -m vtprune.eval.pruner_job --limit "${LIMIT:-300}" --out "$out"
