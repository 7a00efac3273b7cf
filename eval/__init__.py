"""Evaluation (installed as vtprune.eval): tiny built-in models, the synth sets and reference families, training
recipes, measurement and accuracy; the jobs that run them on a GPU in ``vtprune.eval.jobs`` and the speed
benchmarks in ``vtprune.eval.benches``."""
