"""The shipped reference checkpoints: they load offline through the real transformers path, their processors
produce exactly what the trainer saw, and their accuracy on a fixed test slice stays above the CI floors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.eval import accuracy, reference, synth

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"

# Accuracy of each checkpoint on its fixed slice (accuracy.slice_limit items per category of the test split),
# measured on CPU in fp32 with `python -m pytest tests/test_reference.py` (see eval/results/TRAINING.md).
# The floor is 3 points under it.
MEASURED_SLICE_ACCURACY = {"llava": 0.6127, "qwen2_5_vl": 0.3720, "internvl": 0.5882}


def load(family: str):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINTS / family, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("family", sorted(reference.FAMILIES))
def test_checkpoint_is_small_and_loads_offline(family, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = CHECKPOINTS / family / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20, f"{weights} is over the 10 MB budget"
    model = load(family)
    assert type(model).__name__ == reference.FAMILIES[family].model_class
    assert model.config.model_type == family


def test_checkpoints_fit_the_repository_budget():
    total = sum(p.stat().st_size for p in CHECKPOINTS.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"checkpoints/ holds {total / 2**20:.1f} MiB, over the 30 MiB budget"


@pytest.mark.parametrize("family", sorted(reference.FAMILIES))
def test_processor_matches_the_training_encoder(family, monkeypatch):
    """AutoProcessor on PIL images gives the token ids the trainer built, and pixels equal to 8-bit rounding."""
    from PIL import Image
    from transformers import AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        processor = AutoProcessor.from_pretrained(CHECKPOINTS / family)
    except ImportError as error:
        pytest.fail(f"{error}\nThe Qwen and InternVL processors need torchvision; `make test` installs it.")
    spec = reference.FAMILIES[family]
    for category in ("colour", "incontext"):
        item = synth.make_item("test", category, 0)
        images = synth.render(item.images, spec.image_size)
        pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
        got = processor(images=pil, text=[reference.prompt_text(spec, item)], return_tensors="pt")
        expected = reference.encode(spec, [item])
        assert torch.equal(got["input_ids"], expected["input_ids"])
        # One 8-bit step divided by the smallest normalisation std.
        assert (got["pixel_values"] - expected["pixel_values"]).abs().max() < 0.02
        for key in ("image_grid_thw", "mm_token_type_ids"):
            if key in expected:
                assert torch.equal(got[key], expected[key])


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(reference.FAMILIES))
def test_accuracy_floor_on_the_fixed_slice(family):
    spec = reference.FAMILIES[family]
    model = load(family)
    results = accuracy.evaluate(model, spec, list(spec.categories), limit=accuracy.slice_limit(spec),
                                batch_size=16, progress=False)
    measured = accuracy.overall(results)
    floor = MEASURED_SLICE_ACCURACY[family] - 0.03
    per_category = {c: round(r["accuracy"], 3) for c, r in results.items()}
    assert measured >= floor, f"{family}: slice accuracy {measured:.4f} < floor {floor:.4f}; {per_category}"


@pytest.mark.parametrize("family", sorted(set(reference.FAMILIES) & set(vtprune.list_models())))
def test_keep_one_gives_identical_answers(family):
    spec = reference.FAMILIES[family]
    model = load(family)
    items = [synth.make_item("test", c, i) for c in spec.categories for i in range(2)]
    before = accuracy.predict(model, spec, items)
    vtprune.wrap(model, "uniform", keep=1.0)
    assert accuracy.predict(model, spec, items) == before
