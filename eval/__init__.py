"""Evaluation: tiny built-in models, measurement, accuracy and speed benchmarks (installed as vtprune.eval)."""
