"""The speed benchmarks (``python -m vtprune.eval.benches.kernels`` / ``.prefill``, ``gpu_bench.sh`` for a lent
GPU), sharing the shapes, timing, report and model builders of ``harness``."""
