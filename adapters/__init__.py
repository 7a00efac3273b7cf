"""Model-family adapters. Each file registers one family by ``config.model_type``; adding a family = one file here
+ one import line + a tiny-model factory in tests/conftest.py."""

from vtprune.adapters import internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401
from vtprune.adapters.base import Adapter, ImageLayout

__all__ = ["Adapter", "ImageLayout"]
