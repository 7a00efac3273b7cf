"""Evaluation: tiny built-in models, accuracy and speed benchmarks, the lmms-eval bridge (installed as vtprune.eval)."""
