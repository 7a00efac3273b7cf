"""Yardstick v2 (issue "Yardstick v2"): the deep reference configs fit the size budget and map every method's
32-layer schedule to distinct layers; checkpoints record their version; the prompt is laid out as the real families'
(BOS, image, question); the object oracles keep the right tokens; the gates never pass what was not measured; the
recipe trains, saves and resumes on CPU; the reference job measures every row of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtprune.eval import accuracy, reference, report, synth_v2
from vtprune.state import ImageTokens

FAMILIES = sorted(reference.FAMILIES_V2)
CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
# The methods' schedules in a 32-layer LLM: FastV / DART K=2; MustDrop 2/6/10/14; PyramidDrop 8/16/24; VFlowOpt
# L/3 and 2L/3; ToDRE 7L/8; CATP K=6.
SCHEDULES_32 = ((2,), (2, 6, 10, 14), (8, 16, 24), (32 / 3, 64 / 3), (28,), (6,))


def _build(family: str):
    import transformers

    spec = reference.get_family(family, 2)
    return getattr(transformers, spec.model_class)._from_config(reference.build_config(spec), dtype=torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_v2_config_is_deep_small_and_recorded(family, tmp_path):
    import transformers

    model = _build(family)
    config = model.config
    layers = config.text_config.num_hidden_layers
    assert layers >= 8
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())
    assert fp16_bytes <= 16 * 10**6, f"{family}: {fp16_bytes / 1e6:.1f} MB in fp16, over the 16 MB budget"
    for schedule in SCHEDULES_32:
        mapped = [min(layers - 1, round(k * layers / 32)) for k in schedule]
        assert len(set(mapped)) == len(mapped), f"{schedule} of 32 collapses to {mapped} on {layers} layers"
    config.save_pretrained(tmp_path)
    assert reference.spec_for(transformers.AutoConfig.from_pretrained(tmp_path)) == reference.get_family(family, 2)


def test_v2_checkpoints_fit_together():
    total = sum(2 * sum(p.numel() for p in _build(f).parameters()) for f in FAMILIES)
    assert total <= 45 * 10**6, f"{total / 1e6:.1f} MB together in fp16, over the 45 MB budget"


def test_v1_checkpoints_stay_version_one():
    from transformers import AutoConfig

    for family in reference.FAMILIES:
        config = AutoConfig.from_pretrained(CHECKPOINTS / family)
        assert reference.spec_for(config).version == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_v2_prompt_puts_bos_image_then_question(family):
    spec = reference.get_family(family, 2)
    item = synth_v2.make_item("val", "colour", 0)
    words = reference.prompt_words(spec, item)
    assert words[:3] == ["<s>", "USER:", "<V>"]
    assert words[3:-1] == item.question.split() and words[-1] == "ASSISTANT:"
    batch = reference.encode(spec, [item, synth_v2.make_item("val", "incontext", 0)])
    ids = reference.vocab(spec)
    for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):  # left-padded rows
        assert int(row[mask.bool()][0]) == ids["<s>"]


def test_v2_tiny_model_runs_every_category_in_one_batch():
    spec = reference.get_family("qwen2_5_vl", 2)
    model = _build("qwen2_5_vl").eval()
    items = [synth_v2.make_item("val", c, 0) for c in spec.categories]
    batch = reference.encode(spec, items, with_answers=True)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[0] == len(items)


def test_blind_answers_come_from_each_category_answer_set():
    spec = reference.get_family("llava", 2)
    model = _build("llava").eval()
    items = [synth_v2.make_item("val", c, 0) for c in spec.categories]
    guesses = accuracy.predict(model, spec, items, blind=True)
    assert all(g in spec.task.ANSWERS[it.category] for g, it in zip(guesses, items, strict=True))
    logits = torch.zeros(2, len(reference.vocab(spec)))
    kept = accuracy.restrict_to_answers(spec, items[:2], logits).isfinite().sum(-1)
    assert kept.tolist() == [len(spec.task.ANSWERS[it.category]) for it in items[:2]]


def _image(n: int, budget: int, grid=(6, 6)) -> ImageTokens:
    return ImageTokens(0, 0, grid, torch.arange(n), None, None, budget)


def test_object_oracle_keeps_objects_then_a_background_lattice():
    spec = reference.get_family("llava", 2)
    oracle = accuracy.ObjectOracle(accuracy.OracleConfig(keep=0.25), spec)
    on_object = torch.zeros(36)
    on_object[[7, 8, 20]] = torch.tensor([0.9, 0.3, 0.1])  # 0.1 is under the 0.2 threshold: background
    asked = torch.zeros(36)
    asked[20] = 0.1
    asked[8] = 0.3
    kept = oracle._pick(on_object, asked, _image(36, 9))
    assert kept.numel() == 9 and kept.unique().numel() == 9
    assert kept[:2].tolist() == [7, 8]
    aware = accuracy.ObjectOracle(accuracy.OracleConfig(keep=0.25, question_aware=True), spec)
    kept_aware = aware._pick(on_object, asked, _image(36, 9))
    assert kept_aware[:2].tolist() == [8, 7]
    # The background fill is spread over the grid, not the first free indices.
    rows = {int(i) // 6 for i in kept[2:]}
    assert len(rows) >= 3
    # More object tokens than the budget: the most covered ones.
    assert oracle._pick(on_object, asked, _image(36, 1)).tolist() == [7]


def test_token_coverage_finds_the_asked_object():
    spec = reference.get_family("llava", 2)
    item = synth_v2.make_item("test", "colour", 3)
    on_object, asked = accuracy.token_coverage(spec, item.images, accuracy.token_side(spec), "cpu")
    assert on_object.shape == asked.shape == (1, 576)
    assert 0 < int((asked >= 0.2).sum()) < int((on_object >= 0.2).sum())
    assert bool((asked <= on_object + 1e-6).all())


def _runs(values: dict[str, float], categories) -> dict[str, dict]:
    return {run: {c: {"accuracy": v, "n": 1000} for c in categories} for run, v in values.items()}


def test_gates_report_missing_runs_as_not_measured():
    spec = reference.get_family("llava", 2)
    gates = accuracy.gates(spec, _runs({"unpruned": 0.95}, spec.categories))
    by_name = {g.name: g for g in gates}
    assert by_name["unpruned image average"].passed is True
    assert by_name["oracle@0.11 / unpruned (image)"].passed is None
    assert by_name["top-11% CLS-attention tokens on objects"].passed is None
    assert by_name["blind: largest excess over chance"].passed is None


def test_gates_pass_and_miss_on_the_numbers():
    spec = reference.get_family("llava", 2)
    chance = synth_v2.CHANCE
    runs = _runs({"unpruned": 0.95, "oracle@0.11": 0.93, "uniform@0.11": 0.70}, spec.categories)
    runs["blind"] = {c: {"accuracy": chance[c] + 0.01, "n": 1000} for c in spec.categories}
    gates = {g.name: g for g in accuracy.gates(spec, runs, cls_share=0.5)}
    met = ("unpruned image average", "blind: largest excess over chance", "oracle@0.11 / unpruned (image)",
           "oracle@0.11 - uniform@0.11 (image)")
    assert all(gates[name].passed for name in met)
    assert gates["top-11% CLS-attention tokens on objects"].passed is False
    runs["uniform@0.11"] = _runs({"u": 0.85}, spec.categories)["u"]
    assert accuracy.gates(spec, runs)[-2].passed is False  # oracle - uniform = 8 points < 15


def test_report_renders_the_gate_table():
    gates = [{"name": "unpruned image average", "measured": 0.5, "threshold": 0.9, "kind": ">=", "passed": False},
             {"name": "top-11% CLS-attention tokens on objects", "measured": None, "threshold": 0.7, "kind": ">=",
              "passed": None}]
    table = report.gate_table("llava", gates)
    assert "| unpruned image average | >= 90 | 50.0 | **missed** |" in table
    assert "not measured" in table


def test_recipe_trains_saves_and_resumes_on_cpu(tmp_path):
    from vtprune.eval.train_reference import STATE_FILE, RecipeConfig, train

    small = dict(family="llava", batch=3, batch_dense=2, warmup_steps=2)
    notes = train(RecipeConfig(minutes=0.05, plan_minutes=1.0, **small), tmp_path / "part1")
    state = json.loads((tmp_path / "part1" / STATE_FILE).read_text())
    assert state["phase"] == "dense" and state["step"] == notes["steps"] >= 1
    # The second part has no dense time left in its plan: it moves to VQA and continues the step count.
    train(RecipeConfig(minutes=0.05, plan_minutes=1.0, dense_fraction=0.0, **small), tmp_path / "part2",
          resume=tmp_path / "part1")
    resumed = json.loads((tmp_path / "part2" / STATE_FILE).read_text())
    assert resumed["phase"] == "vqa" and resumed["step"] > state["step"] and resumed["parts"] == 2
    assert resumed["dense_end"]["gates_met"] is False
    from transformers import AutoConfig

    assert reference.spec_for(AutoConfig.from_pretrained(tmp_path / "part2")).version == 2


def test_caption_lists_objects_then_tags_in_reading_order():
    scene = synth_v2.Scene(objects=[synth_v2.Obj(shape=1, colour=2, x=0.8, y=0.8, r=0.05),
                                    synth_v2.Obj(shape=0, colour=0, x=0.7, y=0.2, r=0.05),
                                    synth_v2.Obj(shape=3, colour=1, x=0.2, y=0.3, r=0.05)],
                           tags=[synth_v2.Tag(colour=3, char=0, x=0.3, y=0.7)])
    item = synth_v2.caption_item(scene)
    c, s = synth_v2.COLOUR_NAMES, synth_v2.SHAPE_NAMES
    assert item.answer.split() == [c[1], s[3], "topleft", c[0], s[0], "topright", c[2], s[1], "bottomright",
                                   c[3], "tag", synth_v2.CHARS[0].lower()]
    assert item.category == synth_v2.CAPTION not in synth_v2.CATEGORIES  # training only, never measured
    assert set(item.answer.split() + item.question.split()) <= set(synth_v2.vocabulary())


def test_encode_supervises_every_word_of_a_long_answer_and_accuracy_counts_them():
    from vtprune.eval.train_reference import answer_accuracy

    spec = reference.get_family("llava", 2)
    ids = reference.vocab(spec)
    items = [synth_v2.make_item("val", "colour", 0), next(synth_v2.caption_stream(seed=1))]
    batch = reference.encode(spec, items, with_answers=True)
    labels = batch["labels"]
    for row, item in zip(labels, items, strict=True):
        supervised = row[row != -100].tolist()
        assert supervised == [ids[w] for w in item.answer.split()] + [ids["</s>"]]
    # Logits that predict every label but the caption's first word: 1.0 for the one-word answer, (n-1)/n after.
    logits = torch.zeros(*labels.shape, len(ids))
    logits[:, :-1].scatter_(-1, labels[:, 1:].clamp(min=0)[..., None], 1.0)
    first = int((labels[1] != -100).nonzero()[0])
    logits[1, first - 1] = 0
    words = len(items[1].answer.split())
    assert answer_accuracy(logits, labels, ids["</s>"]).tolist() == pytest.approx([1.0, (words - 1) / words])


def test_recipe_mixes_captions_and_ablation_fields_apply(tmp_path):
    from vtprune.eval.train_reference import RecipeConfig, _with_captions, train

    stream = _with_captions(synth_v2, synth_v2.train_stream(("colour",), seed=0), 0.5, seed=0)
    kinds = [next(stream).category for _ in range(200)]
    assert 70 < kinds.count(synth_v2.CAPTION) < 130 and set(kinds) == {"colour", synth_v2.CAPTION}
    with pytest.raises(ValueError, match="caption_share"):
        RecipeConfig(family="llava", caption_share=1.5)
    with pytest.raises(ValueError, match="text_layers"):
        RecipeConfig(family="llava", text_layers=0)
    notes = train(RecipeConfig(family="llava", minutes=0.02, dense_fraction=0.0, batch=2, text_layers=2,
                               categories=("count",), log_every=1), tmp_path / "x")
    assert notes["steps"] >= 1 and notes["log"][0]["phase"] == "vqa"
    assert json.loads((tmp_path / "x" / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="not llava's"):
        train(RecipeConfig(family="llava", minutes=0.0, categories=("motion",)), tmp_path / "y")


def test_curriculum_drop_keeps_objects_then_random_background_and_anneals_to_whole_images():
    from vtprune.eval.accuracy import OracleConfig, token_coverage, token_side
    from vtprune.eval.train_reference import CurriculumDrop, RecipeConfig

    config = RecipeConfig(family="llava", drop_keep=0.2, drop_fraction=0.5)
    assert config.curriculum_keep(0.0) == pytest.approx(0.2)
    assert config.curriculum_keep(0.25) == pytest.approx(0.6)
    assert config.curriculum_keep(0.5) == 1.0 == RecipeConfig(family="llava").curriculum_keep(0.0)
    with pytest.raises(ValueError, match="drop_keep"):
        RecipeConfig(family="llava", drop_keep=0.0)
    spec = reference.get_family("llava", 2)
    item = synth_v2.make_item("val", "colour", 3)
    on_object, _ = token_coverage(spec, item.images, token_side(spec), "cpu")
    objects = set((on_object[0] >= 0.2).nonzero().squeeze(1).tolist())
    drop = CurriculumDrop(OracleConfig(keep=0.2), spec)

    class Image:
        budget = 100
        grid = (24, 24)

    picks = [drop._pick(on_object[0], torch.zeros(576), Image()) for _ in range(2)]
    for pick in picks:
        assert pick.numel() == 100 == len(set(pick.tolist())) and objects <= set(pick.tolist())
    assert picks[0].tolist() != picks[1].tolist()  # the background is drawn at random


def test_recipe_vqa_step_under_the_curriculum_trains_the_vision_side():
    import transformers

    from vtprune.eval import train_reference as tr

    spec = reference.get_family("llava", 2)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration._from_config(reference.build_config(spec))
    heads = torch.nn.ModuleDict({"dense": tr.DenseHeads(spec.task, 192), "global": tr.GlobalHead(spec.task, 192)})
    items = [synth_v2.make_item("val", c, 1) for c in ("colour", "count")]
    config = tr.RecipeConfig(family="llava", global_weight_vqa=0.0)
    full, _ = tr._vqa_step(config, spec, model, heads, items, "cpu", keep=1.0)
    assert float(full) == pytest.approx(float(model(**reference.encode(spec, items, with_answers=True)).loss))
    pruned, metrics = tr._vqa_step(config, spec, model, heads, items, "cpu", keep=0.2)
    assert float(pruned) != pytest.approx(float(full)) and set(metrics) == {"acc_colour", "acc_count"}
    pruned.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_question_first_ablation_puts_the_question_before_the_image():
    import dataclasses

    spec = reference.get_family("llava", 2)
    item = synth_v2.make_item("val", "colour", 0)
    words = reference.prompt_words(dataclasses.replace(spec, question_first=True), item)
    assert words.index("<V>") == len(words) - 2 and words[:2] == ["<s>", "USER:"]
    assert reference.prompt_words(spec, item).index("<V>") == 2


def test_recipe_refuses_a_checkpoint_of_another_family(tmp_path):
    from vtprune.eval.train_reference import RecipeConfig, train

    train(RecipeConfig(family="llava", minutes=0.0, batch=2, batch_dense=2), tmp_path / "llava")
    with pytest.raises(ValueError, match="not a version-2 internvl checkpoint"):
        train(RecipeConfig(family="internvl", minutes=0.0), tmp_path / "x", resume=tmp_path / "llava")


def test_jobs_reference_measures_every_row_of_a_checkpoint(tmp_path):
    from vtprune.eval.jobs import reference as job
    from vtprune.eval.train_reference import RecipeConfig, train

    train(RecipeConfig(family="llava", minutes=0.0), tmp_path / "llava")
    # Two categories keep it short on CPU (a 12-layer LLM over 577-token images); every row and both splits run.
    result = job.evaluate_family("llava", tmp_path / "llava", limit=1, keeps=(0.11,), batch_size=8,
                                 categories=("shape", "count"))
    expected = {"unpruned", "blind", "oracle@0.11", "oracle-q@0.11", "cls@0.11", "random@0.11", "uniform@0.11"}
    for split in ("test", "test_shift"):
        rows = {k for k in result[split] if not k.endswith(".seconds")}
        assert rows == expected
        errors = {k: v["error"] for k, v in result[split].items() if isinstance(v, dict) and "error" in v}
        assert not errors, errors
    assert 0 <= result["cls_share"] <= 1
    gates = {g["name"]: g for g in result["gates"]}
    assert gates["unpruned in-context"]["measured"] is None  # left out: not measured, never passed
    assert gates["unpruned count"]["measured"] is not None


def test_jobs_reference_deadline_marks_rows_not_run_and_report_says_so():
    from vtprune.eval.jobs import reference as job

    spec = reference.get_family("llava", 2)
    # A deadline already passed: no row starts, so no model is needed, and each row says why it is missing.
    rows = job.measure_split(None, spec, "test", 1, (0.11,), 8, deadline=0.0)
    assert rows and all("deadline" in v["error"] for k, v in rows.items() if not k.endswith(".seconds"))
    table = report.family_table("llava", rows, 2, "test")
    assert "unpruned row was not measured" in table and "deadline" in table


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_sincos_position_init_encodes_rows_and_columns(family):
    from vtprune.eval.train_reference import SINCOS_SCALE, RecipeConfig, init_sincos_positions, sincos_2d

    code = sincos_2d(4, 8)
    assert code.shape == (16, 8)
    # Row code (first half) equal along a row, column code (second half) equal down a column, all positions apart.
    assert torch.equal(code[0, :4], code[3, :4]) and torch.equal(code[0, 4:], code[12, 4:])
    assert torch.cdist(code, code).add(torch.eye(16)).min() > 0.1
    model = _build(family)
    init_sincos_positions(family, model)
    embeddings = model.model.vision_tower.embeddings
    table = embeddings.position_embeddings[0] if family == "internvl" else embeddings.position_embedding.weight
    side = int((table.shape[0] - 1) ** 0.5)
    assert torch.equal(table[0], torch.zeros_like(table[0]))
    torch.testing.assert_close(table[1:], SINCOS_SCALE * sincos_2d(side, table.shape[1]))
    with pytest.raises(ValueError, match="position_init"):
        RecipeConfig(family=family, position_init="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 6)


def test_internvl_merged_dense_labels_follow_the_pixel_shuffle(tmp_path):
    from vtprune.eval.train_reference import RecipeConfig, merge_order, train

    model = _build("internvl")
    order = merge_order(model, 32)
    assert order.shape == (256, 4) and sorted(order.reshape(-1).tolist()) == list(range(1024))
    rows, cols = order // 32, order % 32
    # Every merged token holds one 2 x 2 block of patches.
    assert bool(((rows.max(1).values - rows.min(1).values) == 1).all())
    assert bool(((cols.max(1).values - cols.min(1).values) == 1).all())
    notes = train(RecipeConfig(family="internvl", minutes=0.05, batch_dense=2, warmup_steps=2, dense_point="merged"),
                  tmp_path / "merged")
    assert notes["steps"] >= 1
    with pytest.raises(ValueError, match="InternVL's option"):
        RecipeConfig(family="llava", dense_point="merged")


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_local_attention_init_makes_a_fresh_tower_attend_nearby(family):
    """A fresh tower attends uniformly (mean distance ~ the grid's); with the local init head 0 attends within a few
    patches and the lowest-frequency head stays broad."""
    from vtprune.eval.train_reference import RecipeConfig, init_local_attention, init_sincos_positions

    def mean_distance(gain):
        torch.manual_seed(0)
        model = _build(family)
        model.config.vision_config._attn_implementation = "eager"
        init_sincos_positions(family, model)
        if gain:
            init_local_attention(family, model, gain)
        size = model.config.vision_config.image_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        side = size // model.config.vision_config.patch_size if family == "llava" else size // 14
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values=0.5 * torch.randn(1, 3, size, size), output_attentions=True)
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
        dist = torch.cdist(grid.reshape(-1, 2).float(), grid.reshape(-1, 2).float())
        first = out.attentions[0][0, :, 1:, 1:]
        return (first / first.sum(-1, keepdim=True) * dist).sum(-1).mean(-1), dist.mean()

    fresh, uniform = mean_distance(0.0)
    local, _ = mean_distance(1.0)
    assert fresh.min() > 0.9 * uniform
    assert local[0] < 0.3 * uniform and local[-1] > local[0] + 3
    with pytest.raises(ValueError, match="local_attention_gain"):
        RecipeConfig(family=family, local_attention_gain=1.0, position_init="default")


def test_token_dropout_mask_hides_only_visual_keys_and_never_a_whole_row():
    from vtprune.eval import train_reference as tr

    visual = torch.tensor([9])
    ids = torch.tensor([[0, 0, 1, 9, 9, 9, 9, 2, 9, 9, 9, 3], [1, 9, 9, 9, 9, 9, 9, 2, 3, 4, 5, 6]])
    attention = (ids != 0).long()
    none, hidden = tr.dropout_attention_mask(ids, attention, visual, share=0.0, min_keep=0.05)
    assert not hidden.any() and none.shape == (2, 1, 12, 12)
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    expected = (causal[None] & attention.bool()[:, None, :]) | torch.eye(12, dtype=torch.bool)[None]
    assert torch.equal(none[:, 0], expected)
    generator = torch.Generator().manual_seed(0)
    mask, hidden = tr.dropout_attention_mask(ids, attention, visual, share=1.0, min_keep=0.05, generator=generator)
    assert hidden.any() and not (hidden & (ids != 9)).any()
    eye = torch.eye(12, dtype=torch.bool)
    assert not (mask[:, 0] & ~eye & hidden[:, None, :]).any()  # a hidden key is seen by no other row
    assert mask[:, 0].any(-1).all()  # no fully masked row (left padding included)
    kept = mask[:, 0] & ~eye
    assert torch.equal(kept & ~hidden[:, None, :], kept) and torch.equal(kept, expected & ~eye & ~hidden[:, None, :])


def test_token_dropout_step_ignores_hidden_tokens_and_equals_the_full_step_when_nothing_is_hidden():
    import transformers

    from vtprune.eval import train_reference as tr

    spec = reference.get_family("llava", 2)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration._from_config(reference.build_config(spec))
    heads = torch.nn.ModuleDict({"dense": tr.DenseHeads(spec.task, 192)})
    items = [synth_v2.make_item("val", c, 1) for c in ("colour", "incontext")]  # different lengths: left padding
    full, _ = tr._vqa_step(tr.RecipeConfig(family="llava", global_weight_vqa=0.0), spec, model, heads, items, "cpu")
    nothing = tr.RecipeConfig(family="llava", global_weight_vqa=0.0, token_dropout=1.0, dropout_min_keep=1.0)
    assert float(tr._vqa_step(nothing, spec, model, heads, items, "cpu")[0]) == pytest.approx(float(full), rel=1e-5)

    config = tr.RecipeConfig(family="llava", global_weight_vqa=0.0, token_dropout=1.0, dropout_min_keep=0.05)
    torch.manual_seed(1)
    dropped, _ = tr._vqa_step(config, spec, model, heads, items, "cpu")
    assert abs(float(dropped) - float(full)) > 1e-4  # the hidden tokens changed what the answer reads
    torch.manual_seed(1)  # the same draw, for the hidden tokens of this batch
    batch = reference.encode(spec, items, with_answers=True)
    _, hidden = tr.dropout_attention_mask(batch["input_ids"], batch["attention_mask"],
                                          accuracy.visual_token_ids(model), 1.0, 0.05)
    rows = hidden[torch.isin(batch["input_ids"], accuracy.visual_token_ids(model))]  # projector rows, in order

    def noise(module, args, out):
        out = out.clone()
        out.reshape(-1, out.shape[-1])[rows] += 10 * torch.randn(int(rows.sum()), out.shape[-1])
        return out

    handle = model.model.multi_modal_projector.register_forward_hook(noise)
    try:
        torch.manual_seed(1)
        noisy, _ = tr._vqa_step(config, spec, model, heads, items, "cpu")
    finally:
        handle.remove()
    assert float(noisy) == pytest.approx(float(dropped), rel=1e-5)
    enriched = tr.RecipeConfig(family="llava", global_weight_vqa=0.0, token_dropout=1.0, dropout_enriched=1.0)
    assert torch.isfinite(tr._vqa_step(enriched, spec, model, heads, items, "cpu")[0])
    with pytest.raises(ValueError, match="token_dropout"):
        tr.RecipeConfig(family="llava", token_dropout=1.5)
    with pytest.raises(ValueError, match="dropout_min_keep"):
        tr.RecipeConfig(family="llava", dropout_min_keep=0.0)
    with pytest.raises(ValueError, match="dropout_enriched"):
        tr.RecipeConfig(family="llava", dropout_enriched=-0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_object_tokens_follow_the_oracle_coverage_and_enriched_dropout_keeps_them(family):
    from vtprune.eval import train_reference as tr

    spec = reference.get_family(family, 2)
    model = _build(family)
    categories = [c for c in ("count", "incontext", "motion") if c in spec.categories]
    items = [synth_v2.make_item("val", c, 2) for c in categories]
    batch = reference.encode(spec, items)
    visual = accuracy.visual_token_ids(model)
    on = tr.object_tokens(spec, items, batch["input_ids"], visual)
    assert on.any() and not (on & ~torch.isin(batch["input_ids"], visual)).any()
    first = accuracy.token_coverage(spec, items[0].images, accuracy.token_side(spec), "cpu")[0].flatten() >= 0.2
    assert torch.equal(on[0][torch.isin(batch["input_ids"][0], visual)], first)
    generator = torch.Generator().manual_seed(0)
    _, hidden = tr.dropout_attention_mask(batch["input_ids"], batch["attention_mask"], visual, 1.0, 0.05,
                                          generator=generator, protected=on, enriched=1.0)
    assert hidden.any() and not (hidden & on).any()
