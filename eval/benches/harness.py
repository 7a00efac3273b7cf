"""What the speed benchmarks share: the shapes of the GPU run and of the CPU smoke run, the timing helpers, the
report that collects results and rewrites the JSON after every section, the run's metadata, and the
LLaVA-1.5-7B-shaped random-weight model with its prompts.

Used by ``vtprune.eval.benches.kernels`` and ``vtprune.eval.benches.prefill``; times are medians of
``triton.testing.do_bench`` on CUDA (CUDA events), a few wall-clock runs on CPU (smoke only: never a speed claim).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Shapes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    copy_bytes: int
    compaction: tuple[tuple[str, int, int, int], ...]  # (name, B, N, M)
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    probe_batch: int
    probe_tokens: int
    probe_queries: tuple[int, ...]
    probe_long: tuple[tuple[int, int], ...]  # (B, N) extra cases at Q = 32
    e2e_batch: int
    vision: dict[str, int]
    text_tokens: int
    warmup_ms: int
    rep_ms: int
    e2e_warmup_ms: int
    e2e_rep_ms: int


FULL = Shapes(
    copy_bytes=1 << 30,
    compaction=(("llava15_b1", 1, 616, 104), ("llava15_b8", 8, 616, 104), ("video32f_b1", 1, 6300, 718)),
    hidden=4096,
    layers=32,
    kv_heads=32,
    head_dim=128,
    intermediate=11008,
    vocab=32064,
    probe_batch=8,
    probe_tokens=616,
    probe_queries=(1, 8, 32),
    probe_long=((1, 6300), (1, 32768)),
    e2e_batch=8,
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14),
    text_tokens=40,
    warmup_ms=25,
    rep_ms=100,
    e2e_warmup_ms=300,
    e2e_rep_ms=1500,
)
SMOKE = Shapes(
    copy_bytes=1 << 20,
    compaction=(("tiny_b1", 1, 40, 9), ("tiny_b2", 2, 40, 9)),
    hidden=64,
    layers=3,
    kv_heads=4,
    head_dim=16,
    intermediate=128,
    vocab=96,
    probe_batch=2,
    probe_tokens=40,
    probe_queries=(1, 8),
    probe_long=((1, 150),),
    e2e_batch=2,
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=48,
                patch_size=6),
    text_tokens=10,
    warmup_ms=1,
    rep_ms=1,
    e2e_warmup_ms=1,
    e2e_rep_ms=1,
)


# ------------------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any], warmup_ms: int, rep_ms: int) -> dict[str, float]:
    """Median (and p20 / p80) milliseconds of ``fn``: do_bench on CUDA, a few wall-clock runs on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": median, "p20_ms": p20, "p80_ms": p80}
    fn()
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - started) * 1e3)
    runs.sort()
    return {"ms": runs[1], "p20_ms": runs[0], "p80_ms": runs[2]}


def graph_ms(fn: Callable[[], Any]) -> float | None:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: the GPU time alone, without launch overhead. None
    on CPU, or where ``fn`` cannot be captured (a host sync, as in varlen packing)."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception:  # noqa: BLE001 - capture refuses syncs; that only means there is no graph time
        torch.cuda.synchronize()
        return None


# ------------------------------------------------------------------------------------------------------ report


class Report:
    """Collects results per section, keeps going after a failure, rewrites the JSON after every section."""

    def __init__(self, out: Path | None, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {"meta": meta, "sections": {}, "errors": {}}
        self.rows: list[tuple[str, str, str]] = []

    def run(self, name: str, fn: Callable[[], None]) -> None:
        print(f"\n=== {name}", flush=True)
        started = time.perf_counter()
        self.guard(name, fn)
        self.data["sections"].setdefault(name, {})["seconds"] = round(time.perf_counter() - started, 2)
        self.save()

    def guard(self, key: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - a benchmark section must not take the others down with it
            text = traceback.format_exc()
            print(text, flush=True)
            self.data["errors"][key] = text
            self.rows.append((key, "FAILED", text.strip().splitlines()[-1][:90]))
        finally:
            self.save()  # after every case: a call stopped by its time limit still leaves what it measured
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def put(self, section: str, key: str, value: Any) -> None:
        self.data["sections"].setdefault(section, {})[key] = value

    def row(self, name: str, value: str, note: str = "") -> None:
        self.rows.append((name, value, note))
        print(f"  {name:<46} {value:>18}  {note}", flush=True)

    def save(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.data, indent=2))

    def table(self) -> None:
        print("\n" + "=" * 118)
        print(f"{'case':<46} {'value':>18}  note")
        print("-" * 118)
        for name, value, note in self.rows:
            print(f"{name:<46} {value:>18}  {note}")
        print("=" * 118)
        if self.data["errors"]:
            print(f"FAILED sections/cases: {sorted(self.data['errors'])}")
        if self.out is not None:
            print(f"JSON: {self.out}")


def default_out(name: str) -> Path | None:
    """``$OUT/<name>`` when the device machine's ``OUT`` is set (the default ``--out`` of every benchmark), else
    None (no JSON)."""
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None


def run_meta(device: torch.device, smoke: bool, **extra: Any) -> dict[str, Any]:
    """The JSON's ``meta``: the card (or CPU), library versions, whether it was the smoke run, and ``extra``."""
    import transformers

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
        "smoke": smoke, **extra,
    }


# ------------------------------------------------------------------------------------------------------ models


def llama_config(shapes: Shapes):
    """The Llama-shaped text config of ``shapes`` (Llama-7B for ``FULL``), sdpa attention."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.layers, num_attention_heads=shapes.kv_heads, num_key_value_heads=shapes.kv_heads,
        max_position_embeddings=max(4096, 2 * max(n for _, _, n, _ in shapes.compaction)), rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return config


def build_llava(shapes: Shapes, device: torch.device, dtype: torch.dtype):
    """A LLaVA-1.5-shaped model (CLIP-L/336 tower + Llama-7B for ``FULL``) with seeded random weights, in eval
    mode."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = llama_config(shapes)
    vision = CLIPVisionConfig(**shapes.vision, projection_dim=shapes.vision["hidden_size"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=shapes.vocab - 64,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def llava_inputs(model: Any, shapes: Shapes, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``shapes.e2e_batch`` prompts of ``shapes.text_tokens`` text tokens around one image each (seeded): BOS, one
    text token, the image tokens, the rest of the text."""
    image_tokens = (shapes.vision["image_size"] // shapes.vision["patch_size"]) ** 2
    batch, length = shapes.e2e_batch, image_tokens + shapes.text_tokens
    image_token_id = model.config.image_token_id
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, image_token_id, (batch, length), generator=gen)
    ids[:, 0] = 1
    ids[:, 2 : 2 + image_tokens] = image_token_id
    size = shapes.vision["image_size"]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
        "pixel_values": torch.randn(batch, 3, size, size, generator=gen).to(device, dtype),
    }
