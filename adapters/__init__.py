"""Model-family adapters: each file states one family's facts through ``vtprune.engine.Family`` and registers it by
``config.model_type``; adding a family = one file here + one import line + a tiny-model factory in
tests/conftest.py (docs/adding_a_model.md). The engine that runs them is ``vtprune.engine``."""

from vtprune.adapters import internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401
from vtprune.engine import Family, ImageLayout

__all__ = ["Family", "ImageLayout"]
