"""ATP (training-free) behaviour the registry matrix cannot see: the spatial anchors are always kept, the
instance-wise thresholds keep different counts per image that average the stage's target, the module layers scale
with depth, and the calibration search space is valid."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vtprune
from vtprune.budget import kept_count, layer_mean, size_plan
from vtprune.pruners.atp import ATPConfig, ATPPruner, default_layers, spatial_anchors, stage_targets
from vtprune.state import ImageTokens, PruneContext

from .conftest import FACTORIES, Prompt

GRID = (24, 24)
PREFIX, SUFFIX = 3, 8


def synthetic_context(pruner: ATPPruner, samples: int, num_layers: int = 32, seed: int = 0) -> PruneContext:
    """The first ATP stage on ``samples`` prompts of [prefix text, one 24 x 24 image, text], with attention rows
    exp(u_key + 0.1 noise): each key token has its own log-normal salience u, shared by its raters."""
    generator = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    length = PREFIX + n + SUFFIX
    salience = torch.randn(samples, 1, length, generator=generator)
    rows = torch.exp(salience + 0.1 * torch.randn(samples, length, length, generator=generator))
    stage = size_plan(pruner, num_layers)[0]
    positions = torch.arange(PREFIX, PREFIX + n)
    images = [ImageTokens(sample=b, index_in_sample=0, grid=GRID, original_indices=torch.arange(n),
                          positions=positions, features=None, budget=kept_count(stage.fraction, n))
              for b in range(samples)]
    text = torch.ones(samples, length, dtype=torch.bool)
    text[:, positions] = False
    return PruneContext(
        point=stage.point, num_layers=num_layers, images=images, hidden_states=None,
        attention_mask=torch.ones(samples, length, dtype=torch.long), text_mask=text,
        attention_rows=lambda queries: torch.stack([rows[b, q] for b, q in enumerate(queries)]),
    )


def test_thresholds_keep_different_counts_that_average_the_target() -> None:
    pruner = ATPPruner(ATPConfig(keep=0.25))
    ctx = synthetic_context(pruner, samples=48)
    counts = torch.tensor([k.numel() for k in pruner.select(ctx).keep], dtype=torch.float32)
    n = GRID[0] * GRID[1]
    assert len(set(counts.tolist())) > 5, "instance-wise thresholds should keep different counts per image"
    assert counts.max() <= ctx.images[0].budget
    assert counts.mean() / n == pytest.approx(0.25, abs=0.01)


def test_shift_moves_the_average_the_way_it_says() -> None:
    base = ATPPruner(ATPConfig(keep=0.25))
    higher = ATPPruner(ATPConfig(keep=0.25, shift=0.5))
    kept = [sum(k.numel() for k in p.select(synthetic_context(p, samples=8)).keep) for p in (base, higher)]
    assert kept[1] < kept[0]


@pytest.mark.parametrize("counts", ["threshold", "fixed"])
def test_spatial_anchors_are_always_kept(counts) -> None:
    pruner = ATPPruner(ATPConfig(keep=0.2, counts=counts, anchors=0.4))
    ctx = synthetic_context(pruner, samples=4, seed=3)
    keep = pruner.select(ctx).keep
    _, ratio = pruner.targets(ctx.num_layers)[ctx.layer]
    wanted = [min(i.budget, round(ratio * i.num_tokens)) if counts == "threshold" else i.budget for i in ctx.images]
    anchor_counts = [round(0.4 * w) for w in wanted]
    anchors = spatial_anchors(ctx.images, anchor_counts, ctx.device)
    for kept, anchor, a in zip(keep, anchors, anchor_counts, strict=True):
        assert a > 0 and anchor.numel() == a
        assert set(anchor.tolist()) <= set(kept.tolist())
        assert len(set(kept.tolist())) == kept.numel()
    # The skeleton is a uniform lattice: its rows and columns spread over the whole grid.
    coords = dataclasses.replace(ctx.images[0]).grid_coords()[anchors[0]]
    assert coords[:, 0].min() < 4 and coords[:, 0].max() > 19 and coords[:, 1].min() < 4 and coords[:, 1].max() > 19
    if counts == "fixed":
        assert [k.numel() for k in keep] == wanted


def test_a_batch_keeps_different_counts_per_sample_on_a_model() -> None:
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=1, prefix=4), Prompt(images=2, prefix=1)], seed=5)
    with torch.no_grad():
        vtprune.wrap(model, "atp", keep=0.5)
        model(**inputs)
    samples = model.vtprune.last_stats["samples"]
    first = [len(k) for sample in samples for k in sample["stages"][0]["kept"]]
    assert len(set(first)) > 1


def test_layers_scale_with_depth() -> None:
    assert default_layers(32) == (2, 8, 16, 24)
    assert default_layers(4) == (1, 2, 3)
    assert default_layers(12) == (1, 3, 6, 9)
    assert default_layers(28) == (2, 7, 14, 21)
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        default_layers(1)
    with pytest.raises(ValueError, match="layers=.*decoder layer 5"):
        size_plan(ATPPruner(ATPConfig(keep=0.5, layers=(1, 5))), 4)


@pytest.mark.parametrize("budget", ["input", "average"])
def test_targets_meet_keep_under_both_budgets(budget) -> None:
    config = ATPConfig(keep=0.3, budget=budget)
    pruner = ATPPruner(config)
    layers = default_layers(32)
    targets = stage_targets(config.keep, budget, config.decay, layers, 32)
    if budget == "input":
        assert targets[0] == pytest.approx(0.3)
    else:
        assert layer_mean(targets, layers, 32) == pytest.approx(0.3)
    plan = size_plan(pruner, 32)
    assert all(s.adaptive for s in plan)
    assert [s.fraction for s in plan] == pytest.approx([min(1.0, 1.5 * t) for t in targets])
    assert not any(s.adaptive for s in size_plan(ATPPruner(ATPConfig(keep=1.0)), 32))


def test_average_budget_below_the_first_module_raises() -> None:
    with pytest.raises(ValueError, match="budget='average' cannot be met"):
        size_plan(ATPPruner(ATPConfig(keep=0.2, budget="average")), 4)


def test_search_space_names_valid_fields_and_ranges() -> None:
    space = ATPConfig.search_space
    fields = {f.name for f in dataclasses.fields(ATPConfig)}
    assert space and set(space) <= fields - {"keep", "budget", "positions"}
    for name, spec in space.items():
        kind, low, high = spec
        assert kind in ("float", "log", "int") and low < high
        for value in (low, high):
            assert getattr(ATPConfig(keep=0.5, **{name: value}), name) == value


@pytest.mark.parametrize("options, message", [
    ({"decay": 0.0}, "decay=0.0 is outside"),
    ({"decay": True}, "decay must be a number"),
    ({"counts": "rank"}, "counts='rank' is not one of"),
    ({"anchors": 1.5}, "anchors=1.5 is outside"),
    ({"headroom": 0.5}, "headroom=0.5 must be >= 1"),
    ({"counts": "fixed", "shift": 0.2}, "shift sets the instance-wise thresholds"),
    ({"layers": (0, 2)}, "every layer must be >= 1"),
])
def test_bad_options_raise(options, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        ATPConfig(keep=0.5, **options)


# ------------------------------------------------------------------------------------------ learned threshold heads
def _labelled_llava(model, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = FACTORIES["llava"].inputs(model, [Prompt(images=1, suffix=4), Prompt(images=1, prefix=6, suffix=4)],
                                      seed=seed)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -3:] = batch["input_ids"][:, -3:]
    return {**batch, "labels": labels}


def test_zero_heads_are_the_training_free_rule() -> None:
    from vtprune.pruners.atp import HEAD_SIZE

    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=1, prefix=4)], seed=2)
    kept = []
    for heads in (None, [[0.0] * HEAD_SIZE] * 3):
        with torch.no_grad():
            vtprune.wrap(model, "atp", keep=0.5, heads=heads)
            logits = model(**inputs).logits
            kept.append(([list(k) for s in model.vtprune.last_stats["samples"] for st in s["stages"]
                          for k in st["kept"]], logits))
            vtprune.unwrap(model)
    assert kept[0][0] == kept[1][0]
    torch.testing.assert_close(kept[0][1], kept[1][1])


def test_heads_config_is_checked() -> None:
    from vtprune.pruners.atp import HEAD_SIZE

    with pytest.raises(ValueError, match="finite numbers"):
        ATPConfig(keep=0.5, heads=[[0.0] * (HEAD_SIZE - 1)])
    with pytest.raises(ValueError, match="counts='threshold'"):
        ATPConfig(keep=0.5, counts="fixed", heads=[[0.0] * HEAD_SIZE])
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="learned threshold heads"):
        vtprune.wrap(model, "atp", keep=0.5, heads=[[0.0] * HEAD_SIZE])  # 1 head, 3 modules on 4 layers


def test_soft_masks_let_the_lm_loss_train_the_heads(tmp_path) -> None:
    from vtprune.engine.probe import make_probe
    from vtprune.pruners.atp import SoftATP, ThresholdHead
    from vtprune.training import TrainConfig, visual_token_ids

    model = FACTORIES["llava"].build("sdpa")
    batch = _labelled_llava(model)
    # With every head at zero and a very sharp mask, the soft forward equals the hard training-free drop's
    # survivors weighted 0/1, so its mean kept share is near the stage targets.
    heads = SoftATP.new_heads(model, ATPConfig(keep=0.5))
    soft = SoftATP(model, ATPConfig(keep=0.5), visual_token_ids(model), heads, temperature=50.0,
                   make_probe=make_probe)
    try:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        soft.remove()
    assert torch.isfinite(out.logits).all()
    targets = [share for share, _ in ATPPruner(ATPConfig(keep=0.5)).targets(4).values()]
    for kept, target in zip(soft.kept_shares(), targets, strict=True):
        assert abs(kept - target) < 0.2, (soft.kept_shares(), targets)

    # The LM loss alone (budget weight 0) moves the heads: the gradient reaches them through the attention bias.
    config = TrainConfig(keeps=(0.5,), steps=3, lr=1e-2, warmup_steps=0, budget_weight=0.0, log_every=1)
    result = vtprune.train(model, "atp", [batch], config=config, progress=False)
    assert result.model is model and not vtprune.is_wrapped(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not [name for name, m in model.named_modules() if m._forward_pre_hooks]
    trained = result.method_config
    assert trained is not None and trained.heads is not None and len(trained.heads) == 3
    assert any(any(v != 0.0 for v in ThresholdHead.from_flat(flat).out.weight.flatten().tolist())
               for flat in trained.heads), "no gradient reached the heads"
    assert {"lm_loss", "budget_loss", "kept"} <= set(result.log[0])

    path = tmp_path / "atp.json"
    trained.replace(keep=0.5).save(path)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        vtprune.wrap(model, str(path))
        model(**inputs)
    assert model.vtprune.pruner.config.heads == trained.heads
    vtprune.unwrap(model)


def test_kept_counts_job_smoke(tmp_path) -> None:
    import json

    from vtprune.eval.jobs import kept_counts
    from vtprune.pruners.atp import HEAD_SIZE

    config = tmp_path / "zero_heads.json"
    ATPConfig(keep=0.11, heads=[[0.0] * HEAD_SIZE] * 3).save(config)  # 3 modules on the 4-layer reference LLM
    out = tmp_path / "counts.json"
    assert kept_counts.main(["--heads-config", str(config), "--keeps", "0.22", "--per-category", "1",
                             "--out", str(out)]) == 0
    counts = json.loads(out.read_text())["counts"]
    # Zero heads are the training-free rule: the same counts with and without them.
    assert counts["zero_heads@0.22/tf"] == counts["zero_heads@0.22/trained"]
    assert 0 < counts["zero_heads@0.22/tf"]["K_avg_mean"] < 576
