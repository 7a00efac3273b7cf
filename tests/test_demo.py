"""The demo's core (``vtprune.demo.app.compare``) on the reference checkpoints, without gradio: answers, the kept
tokens drawn over the image the model saw, the measurements, videos and clear errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
from vtprune.cli import load_model
from vtprune.eval import reference, synth

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO / "checkpoints"
SAMPLE = REPO / "eval" / "assets" / "sample.png"


def _load_app():
    # The demo runs from the repository (python demo/app.py) and is not installed: load it from its file.
    spec = importlib.util.spec_from_file_location("vtprune_demo_app", REPO / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


app = _load_app()


def test_demo_imports_neither_gradio_nor_decord() -> None:
    assert "gradio" not in sys.modules and "decord" not in sys.modules


def test_compare_on_an_image_draws_the_kept_tokens_over_the_image_the_model_saw() -> None:
    model, processor, _ = load_model(str(CHECKPOINTS / "llava"), "cpu", "float32", "sdpa")
    image = Image.open(SAMPLE).convert("RGB")
    result = app.compare(model, processor, "what colour is the cross ?", "uniform", 0.11, image=image, repeats=1,
                         max_new_tokens=2)
    assert not vtprune.is_wrapped(model)
    assert set(result.answers) == {"unpruned", "uniform"}
    assert result.answers["unpruned"] == "blue"  # the reference checkpoint reads the sample image right
    unpruned, pruned = result.rows
    assert unpruned["visual_in"] == pruned["visual_in"] == 576 and pruned["K_in"] == 63
    assert pruned["kv_bytes"] < unpruned["kv_bytes"]
    assert unpruned["decode_s"] > 0 and pruned["decode_s"] > 0 and unpruned["decode_speedup"] == 1.0
    assert "| uniform keep=0.11 (input) | 576 → 63 |" in result.table()
    # 63 of 24 x 24 cells keep their brightness; the rest are dimmed to DIMMED.
    seen = app.seen_image(processor, app.media_inputs(processor, "q", "cpu", image=image), image)
    assert result.overlay.size == seen.size == (336, 336)
    cells = torch.from_numpy(np.asarray(result.overlay.convert("L"), dtype=np.float32))
    original = torch.from_numpy(np.asarray(seen.convert("L"), dtype=np.float32))
    ratio = (cells.view(24, 14, 24, 14).sum((1, 3)) + 1) / (original.view(24, 14, 24, 14).sum((1, 3)) + 1)
    assert int((ratio > 0.9).sum()) == 63


def test_kept_overlay_dims_exactly_the_dropped_cells() -> None:
    image = Image.new("RGB", (40, 20), (200, 100, 40))
    out = app.kept_overlay(image, torch.tensor([0, 7]), (2, 4))
    assert out.getpixel((5, 5)) == (200, 100, 40)  # cell 0
    assert out.getpixel((35, 15)) == (200, 100, 40)  # cell 7
    dimmed = out.getpixel((15, 5))  # cell 1
    assert all(abs(d - round(c * app.DIMMED)) <= 1 for d, c in zip(dimmed, (200, 100, 40), strict=True))


def test_compare_on_a_video_of_the_qwen_reference_checkpoint() -> None:
    model, processor, _ = load_model(str(CHECKPOINTS / "qwen2_5_vl"), "cpu", "float32", "sdpa")
    spec = reference.get_family("qwen2_5_vl")
    (item,) = synth.split_items("test", "motion", 1)
    assert item.kind == "video"
    frames_tensor = synth.render(item.images, spec.video_size)
    frames = [Image.fromarray((f.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype("uint8")) for f in frames_tensor]
    result = app.compare(model, processor, "how many objects ?", "uniform", 0.25, frames=frames, repeats=1,
                         max_new_tokens=2)
    unpruned, pruned = result.rows
    assert pruned["K_in"] < unpruned["K_in"] and pruned["kv_bytes"] < unpruned["kv_bytes"]
    assert result.overlay is None and any("video" in note for note in result.notes)


def test_compare_refuses_a_wrapped_model_and_bad_media() -> None:
    model, processor, _ = load_model(str(CHECKPOINTS / "llava"), "cpu", "float32", "sdpa")
    image = Image.open(SAMPLE).convert("RGB")
    with pytest.raises(ValueError, match="either an image or"):
        app.compare(model, processor, "q", "uniform", 0.5)
    vtprune.wrap(model, "uniform", keep=0.5)
    with pytest.raises(ValueError, match="unwrapped"):
        app.compare(model, processor, "q", "uniform", 0.5, image=image)
    vtprune.unwrap(model)
    with pytest.raises(ValueError, match="no video token"):
        app.compare(model, processor, "q", "uniform", 0.5, frames=[image, image])
    with pytest.raises(ImportError, match="decord"):
        app.read_video("clip.mp4")


def test_the_page_needs_gradio_and_says_how_to_get_it() -> None:
    model, processor, note = load_model(str(CHECKPOINTS / "llava"), "cpu", "float32", "sdpa")
    try:
        import gradio  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'vtprune\[demo\]'"):
            app.build_ui(model, processor, note)
    else:
        page = app.build_ui(model, processor, note)
        assert page is not None


def test_measure_decode_times_the_steps_after_the_prefill() -> None:
    from vtprune.eval.measure import measure_decode

    model, processor, _ = load_model(str(CHECKPOINTS / "llava"), "cpu", "float32", "sdpa")
    inputs = app.media_inputs(processor, "what colour is the cross ?", "cpu", image=Image.open(SAMPLE).convert("RGB"))
    calls = []
    generate = model.generate

    def counted(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs["max_new_tokens"], out.shape[1] - inputs["input_ids"].shape[1],
                      len(kwargs["logits_processor"][0].stamps)))
        return out

    model.generate = counted
    per_token = measure_decode(model, inputs, new_tokens=4, repeats=2)
    # A warm-up and two timed runs, each of exactly 4 new tokens and 4 stamps (3 decode steps).
    assert calls == [(4, 4, 4)] * 3
    assert per_token > 0
    with pytest.raises(ValueError, match="at least 2"):
        measure_decode(model, inputs, new_tokens=1)
