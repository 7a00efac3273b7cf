#!/usr/bin/env bash
# The benchmark calls on the lent GPU (one H100/H200). The device tool stops a call after 600 s, so the work is two
# calls, each with per-section timeouts that sum to under 600 s (about 1.5x the measured section, plus model build):
#   call 1, timings:   bash eval/benches/gpu_bench.sh "$OUT" timings    (90 + 90 + 360 = 540 s)
#     benches.kernels (copy, probe, e2e: 33 s measured)                   90 s  -> bench_kernels.json
#     benches.prefill syncs, selection, profile (18 s measured)           90 s  -> bench_prefill_sections.json
#     benches.prefill methods (236-240 s measured, H200)                 360 s  -> bench_prefill.json
#   call 2, accuracy:  bash eval/benches/gpu_bench.sh "$OUT" accuracy   (540 s)
#     jobs.pruners; every method on all three families at --limit 300 took 450 s (eval/results/pruners.json): over
#     the limit with a margin, split it by family / method (README, "Accuracy of the methods") or lower LIMIT.
# Timings run in a call of their own, so the accuracy processes cannot disturb them. Run from the repository root
# after installing the project:
#   python3 -m pip install --no-build-isolation --no-deps -e . && bash eval/benches/gpu_bench.sh "$OUT" timings
set -uo pipefail
out="${1:?usage: gpu_bench.sh OUT_DIR [timings|accuracy]}"
part="${2:-timings}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
case "$part" in
  timings)
    timeout 90 python3 -m vtprune.eval.benches.kernels --sections copy,probe,e2e --out "$out/bench_kernels.json"
    timeout 90 python3 -m vtprune.eval.benches.prefill --sections syncs,selection,profile \
      --out "$out/bench_prefill_sections.json"
    timeout 360 python3 -m vtprune.eval.benches.prefill --sections methods --out "$out/bench_prefill.json"
    ;;
  accuracy)
    timeout "${ACCURACY_SECONDS:-540}" python3 -m vtprune.eval.jobs.pruners --limit "${LIMIT:-300}" --out "$out"
    ;;
  *)
    echo "unknown part '$part': use timings or accuracy" >&2
    exit 2
    ;;
esac
