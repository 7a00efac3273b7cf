"""Measure one prompt: prefill time, peak memory, KV-cache bytes, the answer. Used by the CLI and the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of every layer of a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_prefill(model: Any, inputs: dict[str, torch.Tensor], repeats: int = 3) -> dict[str, float | int | None]:
    """Median wall time of a prefill forward (image encoding included), its peak memory (CUDA only) and KV bytes."""
    device = next(model.parameters()).device
    model(**inputs, use_cache=True)  # warm-up: lazy inits, kernel selection
    times = []
    peak = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        started = time.perf_counter()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        _sync(device)
        times.append(time.perf_counter() - started)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    return {"prefill_s": statistics.median(times), "peak_bytes": peak, "kv_bytes": kv_cache_bytes(cache_of(out))}


class _StepClock:
    """A logits processor that only timestamps: ``generate`` calls it once per new token, after that token's
    forward, so consecutive stamps are one decode step apart (the first follows the prefill)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def measure_decode(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int = 8, repeats: int = 3) -> float:
    """Median seconds per generated token after the first: the time between consecutive tokens of greedy
    ``generate`` runs of ``new_tokens`` tokens (end-of-sequence suppressed, so every run makes the same steps).
    Timing each step, not a difference of two runs, keeps the result positive however noisy the machine is."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: decode time needs at least 2 new tokens.")
    device = next(model.parameters()).device
    steps: list[float] = []
    for run in range(repeats + 1):
        clock = _StepClock(device)
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
        if run > 0:  # the first run warms up
            steps += [later - earlier for earlier, later in zip(clock.stamps[:-1], clock.stamps[1:], strict=True)]
    return statistics.median(steps)


def measure_setting(model: Any, processor: Any, inputs: dict[str, torch.Tensor], repeats: int = 3,
                    max_new_tokens: int = 16) -> dict[str, Any]:
    """Everything ``vtprune compare`` and the demo show for one setting (the model as it is, wrapped or not):
    ``measure_prefill``'s fields, ``decode_s`` per token and the greedy ``answer``."""
    return {**measure_prefill(model, inputs, repeats), "decode_s": measure_decode(model, inputs, repeats=repeats),
            "answer": answer(model, processor, inputs, max_new_tokens)}


@torch.no_grad()
def answer(model: Any, processor: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int = 16) -> str:
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned, under either transformers name."""
    # transformers 5.24 renamed the output field past_key_values -> cache (the old name still works, with a warning).
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
