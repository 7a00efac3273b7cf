"""``vtprune.train``: the tail loss is transformers' loss and stays aligned under pruning, a short run learns and
hands back a plain merged model, the curriculum runs in the order asked, bad input fails before the model is
touched, and the demonstration job runs end to end on the shipped LLaVA checkpoint."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FACTORIES, Prompt

import vtprune
from vtprune.training import TrainConfig, tail_length, tail_loss, visual_token_ids

LLAVA = FACTORIES["llava"]
REPO = Path(__file__).resolve().parent.parent
TAIL = 3  # supervised tokens at the end of every row (of the 4-token suffix after the image)
# Two rows whose text before the image differs in length, so that the batch is left-padded.
PROMPTS = [Prompt(images=1, prefix=3, suffix=4), Prompt(images=1, prefix=9, suffix=4)]


@pytest.fixture(autouse=True)
def _require_train_extra() -> None:
    missing = [name for name in ("peft", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"{missing} not installed: install the train extra: pip install -e '.[train]'")


def _labelled(model, prompts=PROMPTS, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = LLAVA.inputs(model, prompts, seed=seed)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -TAIL:] = batch["input_ids"][:, -TAIL:]
    return {**batch, "labels": labels}


def _vtprune_hooks(model) -> list[str]:
    """Hooks on any module whose function comes from vtprune's code."""
    found = []
    for name, module in model.named_modules():
        for table in (module._forward_pre_hooks, module._forward_hooks):
            found += [name for hook in table.values() if getattr(hook, "__module__", "").startswith("vtprune")]
    return found


def test_tail_loss_equals_transformers_loss_at_keep_one():
    model = LLAVA.build("sdpa")
    batch = _labelled(model)
    expected = model(**batch).loss
    vtprune.wrap(model, "uniform", keep=1.0, where="llm:1")
    got = tail_loss(model, batch)
    assert "labels" in batch, "tail_loss must not modify the caller's batch"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_tail_logits_stay_aligned_under_pruning_with_left_padding():
    model = LLAVA.build("sdpa")
    batch = _labelled(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert tail_length(batch["input_ids"], batch["labels"], visual_token_ids(model)) == TAIL
    vtprune.wrap(model, "uniform", keep=0.5, where="llm:1")
    with torch.no_grad():
        full = model(**inputs, logits_to_keep=0).logits
        tail = model(**inputs, logits_to_keep=TAIL + 1).logits
        assert full.shape[1] < inputs["input_ids"].shape[1], "keep=0.5 at llm:1 should shorten the sequence"
        torch.testing.assert_close(tail, full[:, -(TAIL + 1):])
        # Each row alone (no padding, no fillers) gives the same tail: padding and the fillers of the shorter
        # pruned row sit on the left, and the text after the image keeps its place counted from the end.
        for b in range(len(PROMPTS)):
            alone = model(**LLAVA.sample_inputs(inputs, PROMPTS, b), logits_to_keep=TAIL + 1).logits
            torch.testing.assert_close(tail[b], alone[0], rtol=1e-4, atol=1e-5)


def test_training_learns_and_returns_a_plain_merged_model():
    from peft import PeftModel

    model = LLAVA.build("sdpa")
    batch = _labelled(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    vtprune.wrap(model, "uniform", keep=0.5, where="llm:1")
    with torch.no_grad():
        first = float(tail_loss(model, batch))
    vtprune.unwrap(model)
    config = TrainConfig(keeps=(0.5,), steps=30, lr=5e-3, warmup_steps=3, lora_dropout=0.0, log_every=5)
    result = vtprune.train(model, "uniform", [batch], config=config, progress=False, where="llm:1")

    assert result.model is model and not isinstance(model, PeftModel)
    assert not vtprune.is_wrapped(model) and not _vtprune_hooks(model)
    assert not hasattr(model, "peft_config") and not any("lora" in name for name, _ in model.named_modules())
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.steps == 30 and [entry["step"] for entry in result.log] == [1, 5, 10, 15, 20, 25, 30]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.cpu(), before[name])}
    assert changed, "training changed no weight"
    assert all(name.startswith("model.language_model.layers.") for name in changed), sorted(changed)
    assert any(name.endswith("mlp.down_proj.weight") for name in changed)
    vision = [name for name in before if name.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert vision and not changed & set(vision)

    device = next(model.parameters()).device  # accelerate's device: CUDA where there is one
    vtprune.wrap(model, "uniform", keep=0.5, where="llm:1")
    with torch.no_grad():
        last = float(tail_loss(model, {k: v.to(device) for k, v in batch.items()}))
    # The tiny model's frozen random LM head bounds how low the loss can go on random tokens (about 2.7 from
    # 3.85); 30 steps reach about 0.72 of the first loss, while a run whose gradients did not reach LoRA stays at 1.
    assert last < 0.8 * first, (first, last, result.log)


def _keeps_seen(model, batch):
    """Data that records, at every batch it hands out, the keep the model is pruned at (None: not wrapped)."""
    seen = []

    def batches():
        while True:
            seen.append(model.vtprune.config.keep if vtprune.is_wrapped(model) else None)
            yield batch

    return batches, seen


@pytest.mark.parametrize("curriculum, order", [("reverse", [0.11, 0.22, 0.33]), ("forward", [0.33, 0.22, 0.11])])
def test_curriculum_order(curriculum, order):
    model = LLAVA.build("sdpa")
    batch = _labelled(model)
    data, seen = _keeps_seen(model, batch)
    config = TrainConfig(keeps=(0.22, 0.33, 0.11), curriculum=curriculum, steps=6, lr=1e-4, log_every=1)
    result = vtprune.train(model, "uniform", data, config=config, progress=False, where="llm:1")
    expected = [keep for keep in order for _ in range(2)]
    assert [entry["keep"] for entry in result.log] == expected
    # The first batch is drawn before training starts (to check it); each later one under its step's keep.
    assert seen[:6] == [None, *expected[1:]]


def test_schedule_splits_steps_and_mixed_is_seeded():
    assert TrainConfig(keeps=(0.5, 0.25, 1.0), steps=7).schedule() == [0.25] * 3 + [0.5] * 2 + [1.0] * 2
    assert TrainConfig(keeps=(0.5, 0.25), steps=7, curriculum="forward").schedule() == [0.5] * 4 + [0.25] * 3
    mixed = TrainConfig(keeps=(0.11, 0.22, 0.33), steps=40, curriculum="mixed", seed=3)
    assert mixed.schedule() == dataclasses.replace(mixed).schedule()
    assert set(mixed.schedule()) == {0.11, 0.22, 0.33}
    assert mixed.schedule() != TrainConfig(keeps=mixed.keeps, steps=40, curriculum="mixed", seed=4).schedule()
    config = TrainConfig(steps=100, warmup_steps=10)
    assert config.lr_scale(0) == pytest.approx(0.1) and config.lr_scale(10) == pytest.approx(1.0)
    assert config.lr_scale(99) < 0.01


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"keeps": (0.11, 0.0)}, "keeps"),
        ({"keeps": (1.5,)}, "keeps"),
        ({"keeps": ()}, "keeps"),
        ({"curriculum": "backward"}, "curriculum"),
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"budget": "mean"}, "budget"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ],
)
def test_config_rejects_bad_fields(fields, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**fields)


def _untouched(model) -> bool:
    return not vtprune.is_wrapped(model) and not any("lora" in name for name, _ in model.named_modules())


def test_bad_inputs_raise_before_the_model_is_touched(monkeypatch):
    model = LLAVA.build("sdpa")
    batch = _labelled(model)
    config = TrainConfig(keeps=(0.5,), steps=1)

    with pytest.raises(ValueError, match="Did you mean 'uniform'"):
        vtprune.train(model, "unifrom", [batch], config=config, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        vtprune.train(model, "uniform", [], config=config, progress=False)
    with pytest.raises(TypeError, match=r"\[batch\]"):
        vtprune.train(model, "uniform", batch, config=config, progress=False)
    with pytest.raises(ValueError, match="keeps"):
        vtprune.train(model, "uniform", [batch], config=config, progress=False, keep=0.5)
    with pytest.raises(ValueError, match="where"):
        vtprune.train(model, "uniform", [batch], config=config, progress=False, where="llm:99")

    early = dict(batch, labels=batch["labels"].clone())
    early["labels"][1, 2] = early["input_ids"][1, 2]  # a supervised text token before the image
    with pytest.raises(ValueError, match="Row 1 .* last image/video token"):
        vtprune.train(model, "uniform", [early], config=config, progress=False)
    # Right after the last image token is not enough: the logit that predicts it sits on a droppable token.
    last_visual = int((batch["input_ids"][0] == model.config.image_token_id).nonzero().max())
    adjacent = dict(batch, labels=batch["labels"].clone())
    adjacent["labels"][0, last_visual + 1] = adjacent["input_ids"][0, last_visual + 1]
    with pytest.raises(ValueError, match="Row 0"):
        vtprune.train(model, "uniform", [adjacent], config=config, progress=False)
    blank = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="no supervised tokens"):
        vtprune.train(model, "uniform", [blank], config=config, progress=False)

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'vtprune\[train\]'"):
        vtprune.train(model, "uniform", [batch], config=config, progress=False)
    assert _untouched(model)


def test_a_failing_run_leaves_the_model_unwrapped_without_lora():
    model = LLAVA.build("sdpa")
    batch = _labelled(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def data():
        yield batch
        yield {**batch, "labels": torch.full_like(batch["labels"], -100)}

    with pytest.raises(ValueError, match="no supervised tokens"):
        vtprune.train(model, "uniform", data, config=TrainConfig(keeps=(0.5,), steps=3), progress=False)
    assert _untouched(model) and not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p.cpu(), before[name]) for name, p in model.named_parameters())


def test_one_shot_data_that_runs_out_says_what_to_pass():
    model = LLAVA.build("sdpa")
    batch = _labelled(model)
    with pytest.raises(ValueError, match="ran out after 1 batches"):
        vtprune.train(model, "uniform", iter([batch]), config=TrainConfig(keeps=(0.5,), steps=2), progress=False)
    assert _untouched(model)


def test_demonstration_job_smoke(tmp_path):
    """The job on the shipped LLaVA checkpoint with tiny settings (about 10 s on an idle CPU)."""
    out = tmp_path / "finetune.json"
    cmd = [
        sys.executable, "-m", "vtprune.eval.train_adsc", "--checkpoint", str(REPO / "checkpoints" / "llava"),
        "--method", "uniform", "--steps", "2", "--limit", "2", "--batch", "2", "--categories", "colour",
        "--keeps", "0.22", "--option", "where=llm:1", "--out", str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["before"]) == set(record["after"]) == {"unpruned", "uniform@0.22"}
    assert record["options"] == {"where": "llm:1"} and record["config"]["steps"] == 2
    assert record["before"]["uniform@0.22"]["categories"]["colour"]["n"] == 2
    assert record["log"] and record["log"][-1]["step"] == 2
    assert "uniform@0.22" in done.stdout


def test_import_vtprune_does_not_load_peft_or_accelerate():
    code = "import sys, vtprune; print(sorted(m for m in ('peft', 'accelerate') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
