"""ApET and ToDRE: their algorithms on synthetic features, their bad arguments, and the stages the default matrix
(tests/test_equivalence.py) does not reach: ApET's step inside the LLM and its encoder point, ToDRE's relevance
stage actually removing every visual token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FACTORIES, Prompt
from test_equivalence import _dropped, _kept_llm_inputs, _llm_inputs, _written_rows, assert_equals_staged_reference

import vtprune
from vtprune.budget import size_plan
from vtprune.pruners.apet import (
    LLAVA_CODE,
    ApETConfig,
    ApETPruner,
    compress,
    farthest_point_sampling,
    reconstruction_errors,
)
from vtprune.pruners.todre import (
    ToDREConfig,
    ToDREPruner,
    k_center,
    max_sum_diversify,
    nearest_to_mean,
    relevance_ratios,
)
from vtprune.state import ImageTokens, PruneContext

PROJECTING = ["llava", "llava_next", "llava_onevision", "internvl"]  # families whose projector is token-wise


# ------------------------------------------------------------------------------------------------------------- ApET
def test_farthest_point_sampling_picks_the_farthest_point_each_step():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 7.0], [5.0, 5.0]])
    # Squared distances from {0}: 1, 100, 49, 50 -> 2; then min to {0, 2}: 1, 49, 50 -> 4; then 1, 29 -> 3.
    picks = farthest_point_sampling(points[None], 4, torch.tensor([0]))
    assert picks.tolist() == [[0, 2, 4, 3]]
    # Batched rows are independent: the same points, permuted, give the permuted picks.
    perm = torch.tensor([3, 0, 4, 1, 2])
    batch = torch.stack((points, points[perm]))
    picks = farthest_point_sampling(batch, 4, torch.tensor([0, 1]))
    assert picks[1].tolist() == [int((perm == i).nonzero()) for i in (0, 2, 4, 3)]


def test_ridge_error_is_zero_in_the_basis_span_and_the_residual_outside():
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(1, 3, 16, generator=gen)
    inside = torch.randn(1, 5, 3, generator=gen) @ basis
    outside = torch.randn(1, 4, 16, generator=gen)
    errors = reconstruction_errors(torch.cat((inside, outside), 1), basis, 1e-5)
    assert errors.dtype == torch.float32
    assert errors[0, :5].abs().max() < 1e-3
    q, _ = torch.linalg.qr(basis[0].T)
    residual = (outside[0] - outside[0] @ q @ q.T).norm(dim=-1)
    torch.testing.assert_close(errors[0, 5:], residual, atol=1e-4, rtol=1e-4)
    # No basis (b = 0): the error is the norm.
    torch.testing.assert_close(reconstruction_errors(outside, basis[:, :0], 1e-5), outside.norm(dim=-1))


def test_compress_by_hand():
    # basis_size=1, keep=3 -> b = 1; the FPS start (largest norm) is token 0, whose span is the x axis, so the
    # errors are the y components: token 2 (2.0), token 1 (1.0), token 3 (0.1) are kept, token 0 is dropped.
    x = torch.tensor([[[10.0, 0.0], [0.5, 1.0], [0.0, 2.0], [1.0, 0.1]]])
    start = x.norm(dim=-1).argmax(1)
    order, values = compress(x, 3, 1, 1e-5, start, "overwrite")
    assert order.tolist() == [[2, 1, 3]]
    expected = torch.tensor([[0.0, 2.0], [5.25, 0.5], [10.0, 0.0]])
    # Token 2 stays; token 0 (cosine 0.45 with token 1, 0 with token 2) merges into token 1: mean of the two; the
    # lowest-error survivor, token 3, receives the basis vector.
    torch.testing.assert_close(values[0], expected, atol=1e-5, rtol=0)
    _, averaged = compress(x, 3, 1, 1e-5, start, "average")
    torch.testing.assert_close(averaged[0, 2], 0.5 * x[0, 0] + 0.5 * x[0, 3])
    torch.testing.assert_close(averaged[0, :2], expected[:2], atol=1e-5, rtol=0)


def _naive_apet(x, keep, basis_size, lam, start, blend, slot_order):
    """Token-by-token float64 version of the official per-image code."""
    x = x.double()
    n = x.shape[0]
    b = min(basis_size, keep - 1)
    picks = [start]
    for _ in range(b - 1):
        dist = torch.stack([((x - x[p]) ** 2).sum(-1) for p in picks]).min(0).values
        picks.append(int(dist.argmax()))
    basis = x[picks[:b]]
    gram = basis @ basis.T + lam * torch.eye(b, dtype=x.dtype)
    errors = torch.stack([(xi - basis.T @ torch.linalg.solve(gram, basis @ xi)).norm() for xi in x])
    order = sorted(range(n), key=lambda i: -float(errors[i]))[:keep]
    values = {i: x[i].clone() for i in order}
    slots = order[keep - b:]
    if slot_order == "index":
        slots = sorted(slots)
    for vector, slot in zip(basis, slots, strict=True):
        values[slot] = vector if blend == "overwrite" else 0.5 * vector + 0.5 * x[slot]
    targets = order[: keep - b]
    sums = {t: x[t].clone() for t in targets}
    counts = dict.fromkeys(targets, 1)
    for d in range(n):
        if d in order:
            continue
        best = max(targets, key=lambda t: float(F.cosine_similarity(x[d], x[t], dim=0)))
        sums[best] += x[d]
        counts[best] += 1
    for t in targets:
        values[t] = sums[t] / counts[t]
    return order, torch.stack([values[i] for i in order])


@pytest.mark.parametrize("blend", ["overwrite", "average"])
@pytest.mark.parametrize("slot_order", ["index", "error"])
@pytest.mark.parametrize("keep", [1, 5, 20, 38])  # at most n - basis_size: basis tokens tie at error ~0
def test_compress_matches_a_token_by_token_reference(keep, blend, slot_order):
    gen = torch.Generator().manual_seed(keep)
    x = torch.randn(3, 48, 24, generator=gen) * torch.rand(3, 48, 1, generator=gen)
    start = torch.tensor([0, 7, 31])
    order, values = compress(x, keep, 10, 1e-5, start, blend, slot_order)
    assert order.shape == (3, keep) and values.shape == (3, keep, 24) and values.dtype == x.dtype
    for row in range(3):
        ref_order, ref_values = _naive_apet(x[row], keep, 10, 1e-5, int(start[row]), blend, slot_order)
        assert order[row].tolist() == ref_order
        torch.testing.assert_close(values[row].double(), ref_values, atol=1e-4, rtol=1e-4)


def _image(n: int, budget: int, features=None, sample: int = 0, positions=None, index: int = 0) -> ImageTokens:
    return ImageTokens(sample, index, None, torch.arange(n), positions, features, budget)


def test_apet_select_keeps_everything_unchanged_when_nothing_is_dropped():
    x = torch.randn(12, 8)
    pruner = ApETPruner(ApETConfig(**LLAVA_CODE))
    selection = pruner.select(PruneContext("projector", 4, [_image(12, 12, x), _image(12, 12, x, index=1)]))
    assert [k.tolist() for k in selection.keep] == [list(range(12))] * 2
    assert selection.values is None


def test_apet_select_batches_images_and_seeds_the_start():
    gen = torch.Generator().manual_seed(1)
    images = [_image(30, 12, torch.randn(30, 32, generator=gen), index=i) for i in range(2)]
    images.append(_image(20, 6, torch.randn(20, 32, generator=gen), index=2))
    ctx = PruneContext("projector", 4, images)
    selection = ApETPruner(ApETConfig(**LLAVA_CODE)).select(ctx)
    for image, kept, values in zip(images, selection.keep, selection.values, strict=True):
        x = image.features[None]
        order, expected = compress(x, image.budget, 10, 1e-5, x.norm(dim=-1).argmax(1))
        assert kept.tolist() == order[0].tolist()
        torch.testing.assert_close(values, expected[0])
    seeded = ApETPruner(ApETConfig(seed=3, **LLAVA_CODE))
    assert [k.tolist() for k in seeded.select(ctx).keep] == [k.tolist() for k in seeded.select(ctx).keep]


def test_apet_plan_follows_the_official_split():
    # 32 layers: keep 64/576 on average -> 96 before the LLM, 32 from layer 16 (the released 96/32 scripts).
    stages = size_plan(ApETPruner(ApETConfig(keep=64 / 576, budget="average", stage1_point="projector")), 32)
    assert [str(s.point) for s in stages] == ["projector", "llm:16"]
    assert [round(s.fraction * 576) for s in stages] == [96, 32]
    stages = size_plan(ApETPruner(ApETConfig(keep=192 / 576, budget="average", stage1_point="encoder")), 32)
    assert [(str(s.point), round(s.fraction * 576)) for s in stages] == [("encoder", 288), ("llm:16", 96)]
    # K1 capped at n: the second step takes the rest of the mean.
    first, second = size_plan(ApETPruner(ApETConfig(keep=0.75, budget="average", stage1_point="projector")), 4)
    assert (first.fraction, second.layer, second.fraction) == (1.0, 2, 0.5)
    single = size_plan(ApETPruner(ApETConfig(keep=0.3, stage1_point="projector")), 32)
    assert [(str(s.point), s.fraction) for s in single] == [("projector", 0.3)]


def test_apet_config_round_trip():
    config = ApETConfig(keep=0.2, budget="average", llm_lambda=0.1, blend="average", seed=4, llm_layer=3)
    assert ApETConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"keep": 0.0}, ValueError),
        ({"keep": 1.5}, ValueError),
        ({"basis_size": 0}, ValueError),
        ({"basis_size": 2.5}, TypeError),
        ({"stage1_lambda": 0.0}, ValueError),
        ({"llm_layer": 0}, ValueError),
        ({"stage1_point": "llm:2"}, ValueError),
        ({"blend": "sum"}, ValueError),
        ({"seed": "x"}, TypeError),
        ({"budget": "mean"}, ValueError),
    ],
)
def test_apet_bad_arguments_raise(options, error):
    with pytest.raises(error):
        ApETConfig(**options)


@pytest.mark.parametrize("llm_layer", [4, 9])
def test_apet_llm_layer_beyond_the_model_raises_at_wrap(llm_layer):
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="llm_layer"):
        vtprune.wrap(model, "apet", keep=0.25, budget="average", llm_layer=llm_layer)
    assert not vtprune.is_wrapped(model)


# ------------------------------------------------------------------------------------------------------------ ToDRE
def _unit(angles_deg) -> torch.Tensor:
    angles = torch.tensor(angles_deg, dtype=torch.float32) * torch.pi / 180
    return torch.stack((angles.cos(), angles.sin()), -1)


def test_k_center_picks_the_farthest_token():
    x = _unit([0, 10, 90, 180, 170])[None]
    # From 0°: farthest is 180°; then the token farthest from both, 90°; then 10° and 170° tie at cos 10°.
    assert k_center(x, 3, torch.tensor([0])).tolist() == [[0, 3, 2]]


def test_max_sum_picks_one_token_per_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3]
    x = F.normalize(centres.repeat_interleave(5, 0) + 0.05 * torch.randn(15, 4, generator=gen), dim=-1)[None]
    picks = max_sum_diversify(x, 3, torch.tensor([7]))
    assert picks[0, 0] == 7
    assert sorted(int(p) // 5 for p in picks[0]) == [0, 1, 2]


def test_max_sum_matches_the_greedy_definition():
    gen = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(2, 40, 6, generator=gen), dim=-1)
    pivot = nearest_to_mean(x)
    picks = max_sum_diversify(x, 9, pivot)
    for row in range(2):
        chosen = [int(pivot[row])]
        sim = x[row] @ x[row].T
        for _ in range(8):
            score = sim[:, chosen].sum(1)
            score[chosen] = float("inf")
            chosen.append(int(score.argmin()))
        assert picks[row].tolist() == chosen
        mean = x[row].mean(0)
        assert int(pivot[row]) == int((x[row] @ mean).argmax())


def test_todre_stage_one_keeps_the_diverse_tokens_per_image():
    gen = torch.Generator().manual_seed(3)
    images = [_image(20, 5, torch.randn(20, 8, generator=gen), index=i) for i in range(2)]
    for selection in ("maxsum", "kcenter"):
        config = ToDREConfig(selection=selection, pivot="center")
        kept = ToDREPruner(config).select(PruneContext("projector", 4, images)).keep
        pick = max_sum_diversify if selection == "maxsum" else k_center
        for image, k in zip(images, kept, strict=True):
            x = F.normalize(image.features, dim=-1)[None]
            assert k.tolist() == pick(x, 5, nearest_to_mean(x))[0].tolist()


def _relevance_context(layouts, text_to_visual, visual_to_text):
    """A mocked llm-stage context. ``layouts``: per sample a string, one char per position: "s" text, "v" visual.
    Text queries after the first visual token put ``text_to_visual[b]`` of their attention on the visual keys they
    see; visual queries put ``visual_to_text[b]`` on the text after the first visual token they see; the rest goes
    to position 0."""
    length = len(layouts[0])
    images, text_mask, asked = [], [], []
    for b, layout in enumerate(layouts):
        visual = torch.tensor([i for i, c in enumerate(layout) if c == "v"])
        images.append(_image(len(visual), len(visual), sample=b, positions=visual))
        text_mask.append(torch.tensor([c == "s" for c in layout]))

    def rows(query_positions):
        asked.append(query_positions)
        out = torch.zeros(*query_positions.shape, length)
        for b, layout in enumerate(layouts):
            first = layout.index("v")
            for q, p in enumerate(query_positions[b].tolist()):
                seen = range(p + 1)
                if layout[p] == "s" and p > first:
                    targets, mass = [j for j in seen if layout[j] == "v"], text_to_visual[b]
                elif layout[p] == "v":
                    targets, mass = [j for j in seen if layout[j] == "s" and j > first], visual_to_text[b]
                else:
                    targets, mass = [], 0.0
                out[b, q, 0] = 1.0
                if targets:
                    out[b, q, 0] = 1.0 - mass
                    out[b, q, targets] += mass / len(targets)
        return out

    ctx = PruneContext(
        "llm:3", 4, images, attention_mask=torch.ones(len(layouts), length), text_mask=torch.stack(text_mask),
        attention_rows=rows,
    )
    return ctx, asked


def test_relevance_stage_drops_every_visual_token_of_an_inattentive_sample():
    ctx, asked = _relevance_context(["ssvvvvss", "ssvvvvss"], text_to_visual=[0.05, 0.3], visual_to_text=[0, 0])
    selection = ToDREPruner(ToDREConfig(keep=0.5)).select(ctx)
    assert [k.tolist() for k in selection.keep] == [[], [0, 1, 2, 3]]
    # Queries: the visual tokens and the text after the image, not the text before it; the probe gets one row per
    # position (no sync to size it), the rest padded with position 0, which is text before the image here.
    (queries,) = asked
    assert queries.shape == (2, 8)
    assert sorted(q for q in queries[0].tolist() if q != 0) == [2, 3, 4, 5, 6, 7]


def test_relevance_stage_respects_tau_and_the_visual_to_text_ratio():
    # Interleaved: the second image's visual queries see the text between the images, 40% of their attention.
    layout = "svvsvvss"
    ctx, _ = _relevance_context([layout], text_to_visual=[0.05], visual_to_text=[0.4])
    assert ToDREPruner(ToDREConfig(keep=0.5)).select(ctx).keep[0].numel() == 4
    ctx, _ = _relevance_context([layout], text_to_visual=[0.05], visual_to_text=[0.0])
    assert ToDREPruner(ToDREConfig(keep=0.5)).select(ctx).keep[0].numel() == 0
    ctx, _ = _relevance_context([layout], text_to_visual=[0.05], visual_to_text=[0.0])
    assert ToDREPruner(ToDREConfig(keep=0.5, tau=0.04)).select(ctx).keep[0].numel() == 4


def test_relevance_ratios_formula():
    rows = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.2, 0.2, 0.2, 0.4], [0.0, 0.0, 0.0, 0.0]]])
    key_visual = torch.tensor([[False, True, True, False]])
    key_text = torch.tensor([[False, False, False, True]])
    query_text = torch.tensor([[True, False, False]])
    query_visual = torch.tensor([[False, True, False]])
    alpha_tv, alpha_vt = relevance_ratios(rows, query_text, query_visual, key_text, key_visual)
    torch.testing.assert_close(alpha_tv, torch.tensor([0.5]))
    torch.testing.assert_close(alpha_vt, torch.tensor([0.4]))


def test_todre_plan():
    assert [(str(s.point), s.fraction, s.adaptive) for s in size_plan(ToDREPruner(ToDREConfig(keep=0.1)), 32)] == [
        ("projector", 0.1, False), ("llm:29", 1.0, True)
    ]
    assert ToDREPruner(ToDREConfig(keep=0.1)).plan(4)[1].layer == 3
    assert ToDREPruner(ToDREConfig(keep=0.1)).plan(28)[1].layer == 25
    # keep=1 is the engine's identity: no stage drops and the relevance stage is no longer adaptive.
    assert [(s.fraction, s.adaptive) for s in size_plan(ToDREPruner(ToDREConfig(keep=1.0)), 32)] == [
        (1.0, False), (1.0, False)
    ]
    assert len(ToDREPruner(ToDREConfig(keep=0.1, tau=0.0)).plan(32)) == 1
    assert ToDREConfig.from_dict(ToDREConfig(keep=0.3, selection="kcenter").to_dict()) == ToDREConfig(
        keep=0.3, selection="kcenter"
    )


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"keep": -0.1}, ValueError),
        ({"keep": 1.01}, ValueError),
        ({"selection": "dpp"}, ValueError),
        ({"tau": 1.5}, ValueError),
        ({"tau": "0.1"}, TypeError),
        ({"relevance_layer": -1}, ValueError),
    ],
)
def test_todre_bad_arguments_raise(options, error):
    with pytest.raises(error):
        ToDREConfig(**options)


@pytest.mark.parametrize("relevance_layer", [3, 7])
def test_todre_relevance_layer_beyond_the_model_raises_at_wrap(relevance_layer):
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="relevance_layer"):
        vtprune.wrap(model, "todre", keep=0.25, relevance_layer=relevance_layer)


def test_unknown_method_suggests_apet():
    with pytest.raises(ValueError, match="Did you mean 'apet'"):
        vtprune.wrap(FACTORIES["llava"].build("sdpa"), "apte")


# ------------------------------------------------------------------------------ stages beyond the default matrix
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_apet_llm_stage_equals_masked_reference_with_written_rows(family, attn):
    # On LLaVA-style families the default positions="renumber" renumbers the first stage's survivors too.
    stats = assert_equals_staged_reference(family, attn, "apet", budget="average", blend="average", llm_lambda=0.1,
                                           stage1_point="projector")
    for sample in stats["samples"]:
        assert [(s["point"], s["layer"]) for s in sample["stages"]] == [("projector", 0), ("llm", 2)]
        assert all(all(s["wrote_values"]) for s in sample["stages"])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_todre_relevance_stage_equals_masking_every_visual_key(family, attn):
    # tau=1: every sample's visual tokens are gone from layer 3 on.
    stats = assert_equals_staged_reference(family, attn, "todre", tau=1.0)
    for sample in stats["samples"]:
        assert sample["stages"][-1]["layer"] == 3 and all(k == [] for k in sample["stages"][-1]["kept"])
        assert sample["tokens_per_layer"][3] == 0 and sample["tokens_per_layer"][2] > 0


@pytest.mark.parametrize("family", PROJECTING)
def test_apet_encoder_point_equals_feeding_the_projected_rows(family):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=2, videos=1)], seed=3)
    with torch.no_grad():
        llm_inputs = _llm_inputs(model, inputs)
        vtprune.wrap(model, "apet", keep=0.25, stage1_point="encoder")
        pruned = model(**inputs).logits
        stats = model.vtprune.last_stats
        assert stats["samples"][0]["stages"][0]["point"] == "encoder"
        assert all(stats["samples"][0]["stages"][0]["wrote_values"])
        embeds = _written_rows(factory, model, inputs, model.vtprune, llm_inputs["inputs_embeds"], 0)
        keep = ~_dropped(factory, model, inputs, stats, 0)[0]
        renumber = model.vtprune.config.positions == "renumber"  # the LLaVA code's default, resolved by wrap
        assert renumber
        vtprune.unwrap(model)
        kept_inputs = _kept_llm_inputs({**llm_inputs, "inputs_embeds": embeds}, keep, renumber)
        hidden = model.model.language_model(**kept_inputs)
        torch.testing.assert_close(pruned, model.lm_head(hidden.last_hidden_state), atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_apet_encoder_point_is_refused_where_the_projector_merges(family):
    factory = FACTORIES[family]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1)], seed=0)
    vtprune.wrap(model, "apet", keep=0.25, stage1_point="encoder")
    with pytest.raises(ValueError, match="projector"), torch.no_grad():
        model(**inputs)


def test_stats_stay_json_friendly_with_written_values():
    import json

    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=2)], seed=0)
    with torch.no_grad():
        vtprune.wrap(model, "apet", keep=0.25)
        model(**inputs)
    stats = model.vtprune.last_stats
    json.dumps(stats)
    raw = model.vtprune.engine.last_stats
    values = raw.written_values(0)
    kept = stats["samples"][0]["stages"][0]["kept"]
    assert [tuple(v.shape) for v in values] == [(len(k), model.config.text_config.hidden_size) for k in kept]


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_apet_defaults_follow_the_official_code_of_the_family(family):
    """LLaVA code: encoder point, overwrite, renumbered positions, λ 1e-5; Qwen code: projector, 0.5/0.5 blend,
    original (M-RoPE) positions, λ 0.1. Each is switchable, and an explicit value is never overridden."""
    model = FACTORIES[family].build("sdpa")
    vtprune.wrap(model, "apet", keep=0.25)
    config = model.vtprune.config
    qwen = family.startswith("qwen")
    expected = ("projector", "average", "original", 0.1) if qwen else ("encoder", "overwrite", "renumber", 1e-5)
    assert (config.stage1_point, config.blend, config.positions, config.llm_lambda) == expected
    vtprune.unwrap(model)
    vtprune.wrap(model, "apet", keep=0.25, blend="overwrite" if qwen else "average", positions="original")
    assert model.vtprune.config.blend == ("overwrite" if qwen else "average")
    assert model.vtprune.config.positions == "original"


def test_apet_unresolved_defaults_raise_a_clear_error_outside_wrap():
    x = torch.randn(12, 8)
    ctx = PruneContext("projector", 4, [_image(12, 4, x)])
    with pytest.raises(ValueError, match="left to the official code"):
        ApETPruner(ApETConfig()).select(ctx)
    pruner = ApETPruner(ApETConfig())
    pruner.resolve("qwen2_5_vl")
    assert pruner.config.blend == "average" and len(pruner.select(ctx).keep[0]) == 4
