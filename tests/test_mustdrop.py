"""MustDrop behaviour the registry matrix cannot see: the 3 x 3 window merge merges exactly the windows at or above
the threshold into their mean, the key set is ranked by CLS attention and always kept by the LLM stages, the code's
thresholds drop exactly the tokens under both, merges are per image (not the code's batch minimum) and stay exact
end to end, the layers scale with depth, both budgets are met, and bad options raise.

The random-weight test models give random images dissimilar windows (nothing merges in the matrix), so the
end-to-end tests here feed constant images, whose windows are near-identical."""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune.budget import layer_mean
from vtprune.pruners.mustdrop import (
    MustDropConfig,
    MustDropPruner,
    default_layers,
    grid_windows,
    key_count,
    merge_windows,
    nearest_target,
    window_similarity,
)
from vtprune.state import ImageTokens, PruneContext

from .conftest import FACTORIES, Prompt
from .test_equivalence import _greedy, _staged_reference

GRID = (7, 6)  # 2 x 2 complete windows, and a last row that belongs to none
WINDOW_SIMILARITY = (0.95, 0.81, 0.79, 0.2)  # windows in raster order: the first two are >= 0.8
CHANNELS = 64


def _window_members(grid: tuple[int, int]) -> list[list[int]]:
    rows, cols = grid
    return [[(3 * wr + r) * cols + 3 * wc + c for r in range(3) for c in range(3)]
            for wr in range(rows // 3) for wc in range(cols // 3)]


def vision_image(seed: int = 0) -> ImageTokens:
    """A 7 x 6 image whose 3 x 3 windows have the similarities WINDOW_SIMILARITY exactly: token t of window w is
    scale_t · (√s_w · u_w + √(1 − s_w) · e_t) with orthonormal u_w, e_t, so any two of its tokens have cosine s_w.
    The last row's tokens are all equal (cosine 1) but lie in no complete window. The CLS attention puts 0.5 on
    token 40 (last row), 0.4 on token 20 (window 2, not merged), 0.36 on the 8 tokens of window 0 after its anchor
    (merged: mean 0.32) and 0.9 on window 1's anchor alone (merged: mean 0.1); 0.001 elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    basis = torch.eye(CHANNELS)
    features = basis[-1].repeat(n, 1)  # the last row's tokens (and placeholders for the windows' ones)
    for w, members in enumerate(_window_members(GRID)):
        s = WINDOW_SIMILARITY[w]
        for t in members:
            features[t] = math.sqrt(s) * basis[n + w] + math.sqrt(1 - s) * basis[t]
    features = features * (0.5 + torch.rand(n, 1, generator=generator))  # norms differ: the mean is not renormalised
    cls = torch.full((n,), 0.001)
    cls[40], cls[20] = 0.5, 0.4
    cls[_window_members(GRID)[0][1:]] = 0.36
    cls[_window_members(GRID)[1][0]] = 0.9
    return ImageTokens(sample=0, index_in_sample=0, grid=GRID, original_indices=torch.arange(n), positions=None,
                       features=features, budget=n, cls_attention=cls)


def vision_context(*images: ImageTokens) -> PruneContext:
    return PruneContext(point="encoder", num_layers=32, images=list(images))


def pruner(**options) -> MustDropPruner:
    return MustDropPruner(MustDropConfig(keep=0.25, vision_point="encoder", **options))


def test_windows_tile_the_grid_from_the_top_left_and_skip_incomplete_ones() -> None:
    windows = grid_windows(GRID, torch.device("cpu"))
    assert windows.tolist() == _window_members(GRID)
    assert grid_windows((8, 2), torch.device("cpu")).shape == (0, 9)
    x = torch.randn(5, 9, 16)
    unit = torch.nn.functional.normalize(x, dim=-1)
    pairs = [(unit[:, a] * unit[:, b]).sum(-1) for a in range(9) for b in range(9) if a != b]
    torch.testing.assert_close(window_similarity(x), torch.stack(pairs).mean(0))


def test_merge_takes_exactly_the_windows_at_or_above_the_threshold_and_writes_their_mean() -> None:
    image = vision_image()
    similarity = window_similarity(image.features[grid_windows(GRID, torch.device("cpu"))])
    torch.testing.assert_close(similarity, torch.tensor(WINDOW_SIMILARITY), atol=1e-5, rtol=0)
    selection = pruner().select(vision_context(image))
    members = _window_members(GRID)
    gone = set(members[0][1:]) | set(members[1][1:])
    assert selection.keep[0].tolist() == [t for t in range(42) if t not in gone]
    values = dict(zip(selection.keep[0].tolist(), selection.values[0], strict=True))
    for t, value in values.items():
        merged = next((m for m in members[:2] if m[0] == t), None)
        expected = image.features[merged].mean(0) if merged else image.features[t]
        torch.testing.assert_close(value, expected)
    # A lower threshold takes window 2 (0.79) too; the last row, identical tokens, never merges: it has no window.
    lower = pruner(merge_threshold=0.75).select(vision_context(image)).keep[0]
    assert lower.numel() == 42 - 3 * 8 and set(range(36, 42)) <= set(lower.tolist())
    # Nothing above the threshold: every token goes on unchanged, no values written.
    none = pruner(merge_threshold=0.99).select(vision_context(image))
    assert none.keep[0].tolist() == list(range(42)) and none.values is None


def test_windows_with_a_token_no_longer_present_do_not_merge() -> None:
    image = vision_image()
    present = torch.tensor([t for t in range(42) if t != 7])  # window 0 loses a token
    image.original_indices, image.features = present, image.features[present]
    merged = merge_windows(image, 0.8)
    assert present[merged].tolist() == [_window_members(GRID)[1]]


def test_key_set_ranks_the_cls_attention_after_the_merge() -> None:
    method = pruner()
    method.select(vision_context(vision_image()))
    # 26 tokens after the merge: ceil(0.08 · 26) = 3 key tokens. A merged token scores its window's mean: window 0's
    # anchor 0.32 (its own 0.001), window 1's only 0.1 (its own 0.9).
    assert sorted(method.key_sets[(0, 0)].tolist()) == [0, 20, 40]
    assert key_count(0.08, 576) == 47 and key_count(0.08, 25) == 2 and key_count(0.0, 576) == 0


def test_key_set_falls_back_to_feature_norms_without_a_cls_row() -> None:
    image = vision_image()
    image.cls_attention = None
    image.features[33] *= 10.0  # window 3 (not merged), the largest norm by far
    method = pruner(key_share=0.01)
    method.select(vision_context(image))
    assert method.key_sets[(0, 0)].tolist() == [33]


PREFIX, SUFFIX = 4, 6


def llm_context(method: MustDropPruner, kept: torch.Tensor, budget: int, rows: torch.Tensor,
                layer: int = 3) -> PruneContext:
    """An LLM stage on one prompt [PREFIX text, the image's ``kept`` tokens, SUFFIX text] with the given (L, L)
    head-mean attention rows."""
    n = kept.numel()
    length = PREFIX + n + SUFFIX
    positions = torch.arange(PREFIX, PREFIX + n)
    image = ImageTokens(sample=0, index_in_sample=0, grid=GRID, original_indices=kept, positions=positions,
                        features=None, budget=budget)
    text = torch.ones(1, length, dtype=torch.bool)
    text[0, positions] = False
    return PruneContext(point=f"llm:{layer}", num_layers=32, images=[image],
                        attention_mask=torch.ones(1, length, dtype=torch.long), text_mask=text,
                        attention_rows=lambda queries: rows[None].expand(queries.shape[0], -1, -1).gather(
                            1, queries[..., None].expand(-1, -1, length)))


def _scored_rows(n: int, attention: torch.Tensor) -> torch.Tensor:
    """(L, L) rows: every text query after the image pays ``attention`` (SUFFIX, n) to the image's tokens; the text
    before the image pays them 1 (it must never count: it cannot see the image)."""
    length = PREFIX + n + SUFFIX
    rows = torch.zeros(length, length)
    rows[:PREFIX, PREFIX:PREFIX + n] = 1.0
    rows[PREFIX + n:, PREFIX:PREFIX + n] = attention
    return rows


def test_budget_stages_keep_the_key_set_then_the_largest_global_attention() -> None:
    method = pruner()
    kept = method.select(vision_context(vision_image())).keep[0]
    key = method.key_sets[(0, 0)]
    generator = torch.Generator().manual_seed(1)
    attention = torch.rand(SUFFIX, kept.numel(), generator=generator) + 0.1
    is_key = torch.isin(kept, key)
    attention[:, is_key] = 1e-6  # the key tokens get the least attention of all
    ctx = llm_context(method, kept, budget=8, rows=_scored_rows(kept.numel(), attention))
    chosen = method.select(ctx).keep[0]
    assert chosen.numel() == 8
    assert set(kept[chosen].tolist()) >= set(key.tolist())
    others = attention.sum(0).masked_fill(is_key, -1.0).topk(8 - key.numel()).indices
    assert set(chosen.tolist()) == set(others.tolist()) | set(is_key.nonzero().squeeze(1).tolist())
    # A budget below the key set keeps the key tokens of largest G.
    fewer = method.select(llm_context(method, kept, budget=2, rows=_scored_rows(kept.numel(), attention)))
    assert set(kept[fewer.keep[0]].tolist()) < set(key.tolist())


def test_text_queries_are_the_text_after_each_image_or_the_last_token() -> None:
    """[PREFIX text, image A, 2 text tokens, image B] with no text after B: A is rated by the 2 tokens between the
    images and the last token, B by the prompt's last token (B's own last) alone."""
    method = pruner()
    n = 9
    a, mid = torch.arange(PREFIX, PREFIX + n), torch.arange(PREFIX + n, PREFIX + n + 2)
    b = torch.arange(PREFIX + n + 2, PREFIX + 2 * n + 2)
    length = PREFIX + 2 * n + 2
    rows = torch.zeros(length, length)
    rows[:PREFIX, :] = 1.0  # text before the first image never rates
    rows[mid[:, None], a] = torch.arange(n, dtype=torch.float32)  # A: increasing with the index
    rows[mid[:, None], b] = 10 * torch.arange(n, dtype=torch.float32)  # not raters of B: they come before it
    rows[length - 1, b] = torch.tensor([1.0, 2, 3, 9, 8, 7, 4, 5, 6])  # B: the prompt's last token, a token of B
    text = torch.ones(1, length, dtype=torch.bool)
    text[0, a], text[0, b] = False, False
    images = [ImageTokens(sample=0, index_in_sample=j, grid=None, original_indices=torch.arange(n), positions=p,
                          features=None, budget=3) for j, p in enumerate((a, b))]
    method.key_sets = {(0, 0): torch.zeros(0, dtype=torch.long), (0, 1): torch.zeros(0, dtype=torch.long)}
    ctx = PruneContext(point="llm:3", num_layers=32, images=images,
                       attention_mask=torch.ones(1, length, dtype=torch.long), text_mask=text,
                       attention_rows=lambda queries: rows[queries])
    keep = method.select(ctx).keep
    assert sorted(keep[0].tolist()) == [6, 7, 8] and sorted(keep[1].tolist()) == [3, 4, 5]


def test_paper_counts_drop_exactly_the_tokens_under_both_thresholds() -> None:
    method = pruner(counts="paper", g=0.03, i=0.05)
    kept = method.select(vision_context(vision_image())).keep[0]
    key = method.key_sets[(0, 0)]
    n = kept.numel()
    generator = torch.Generator().manual_seed(2)
    # Low global and low individual attention for a third of the tokens and for the key set, one large value (M above
    # i, G below g·ΣG) for another third, moderate values everywhere (G above g·ΣG, every entry below i) for the rest.
    attention = torch.full((SUFFIX, n), 1e-4)
    kind = torch.arange(n) % 3
    kind[torch.isin(kept, key)] = 0
    peaks = kind == 1
    attention[torch.randint(SUFFIX, (n,), generator=generator)[peaks], peaks.nonzero().squeeze(1)] = 0.06
    attention[:, kind == 2] = 0.04
    method_rows = _scored_rows(n, attention)
    chosen = set(method.select(llm_context(method, kept, budget=n, rows=method_rows, layer=7)).keep[0].tolist())
    total = attention.sum()
    expected = set()
    for j in range(n):
        column = attention[:, j]
        dropped = column.sum() < 0.03 * total and column.max() < 0.05
        if not dropped or int(kept[j]) in key.tolist():
            expected.add(j)
    assert chosen == expected
    dropped = set(range(n)) - expected
    assert dropped and all(kind[j] == 0 for j in dropped)
    low_global = [j for j in expected if attention[:, j].sum() < 0.03 * total and kind[j] == 1]
    low_individual = [j for j in expected if attention[:, j].max() < 0.05 and kind[j] == 2]
    assert low_global and low_individual, "each threshold alone must keep some tokens"
    assert any(int(kept[j]) in key.tolist() and kind[j] == 0 for j in expected), "a key token under both is kept"


def test_paper_thresholds_follow_the_readme_table_for_the_nearest_target() -> None:
    assert [nearest_target(k) for k in (1 / 3, 2 / 9, 1 / 9, 0.05, 0.9)] == [192, 128, 64, 64, 192]
    assert MustDropPruner(MustDropConfig(keep=2 / 9, counts="paper")).thresholds() == (0.0012, 0.001)
    assert MustDropPruner(MustDropConfig(keep=1 / 9, counts="paper", i=0.2)).thresholds() == (0.011, 0.2)


def test_llm_stage_needs_the_vision_stage_of_the_same_prefill() -> None:
    method = pruner()
    kept = torch.arange(42)
    rows = _scored_rows(42, torch.rand(SUFFIX, 42))
    with pytest.raises(RuntimeError, match="no key set"):
        method.select(llm_context(method, kept, budget=8, rows=rows))
    method.select(vision_context(vision_image()))
    other = vision_image()
    other.sample = 1
    method.select(vision_context(other))  # a new prefill: the first one's key sets are gone
    assert list(method.key_sets) == [(1, 0)]


def test_layers_scale_with_depth() -> None:
    assert default_layers(32) == (3, 7, 11, 15)
    assert default_layers(28) == (3, 6, 10, 13)
    assert default_layers(4) == (1, 2)
    plan = pruner().plan(32)
    assert [str(stage.point) for stage in plan] == ["encoder", "llm:3", "llm:7", "llm:11", "llm:15"]
    assert plan[0].fraction == 1.0 and plan[0].adaptive
    assert [str(s.point) for s in pruner(layers=(2, 9)).plan(32)] == ["encoder", "llm:2", "llm:9"]
    with pytest.raises(ValueError, match="decoder layer 40"):
        pruner(layers=(2, 40)).plan(32)


@pytest.mark.parametrize("keep", [1 / 9, 2 / 9, 1 / 3])
def test_budget_schedule_meets_keep_under_both_budgets(keep) -> None:
    layers = default_layers(32)
    shares = [s.fraction for s in MustDropPruner(MustDropConfig(keep=keep, vision_point="encoder")).plan(32)[1:]]
    assert shares == pytest.approx([keep * 0.75**m for m in range(4)])
    config = MustDropConfig(keep=keep, budget="average", vision_point="encoder")
    stages = MustDropPruner(config).plan(32)[1:]
    assert not any(s.adaptive for s in stages)
    assert layer_mean([s.fraction for s in stages], layers, 32) == pytest.approx(keep, abs=1e-9)
    paper = MustDropPruner(MustDropConfig(keep=keep, counts="paper", vision_point="encoder")).plan(32)
    assert all(s.adaptive and s.fraction == 1.0 for s in paper)


def test_average_budget_below_the_first_stage_raises() -> None:
    with pytest.raises(ValueError, match="cannot be met with the first mustdrop stage at layer 3 of 32"):
        MustDropPruner(MustDropConfig(keep=0.09, budget="average", vision_point="encoder")).plan(32)


@pytest.mark.parametrize("options, message", [
    ({"merge_threshold": 0.0}, "merge_threshold=0.0 is outside"),
    ({"merge_threshold": 1.5}, "merge_threshold=1.5 is outside"),
    ({"key_share": 1.0}, "key_share=1.0 is outside"),
    ({"key_share": -0.1}, "key_share=-0.1 is outside"),
    ({"counts": "threshold"}, "counts='threshold' is not one of"),
    ({"decay": 0.0}, "decay=0.0 is outside"),
    ({"counts": "paper", "decay": 0.5}, "decay shapes the counts of counts='budget'"),
    ({"g": 0.001}, "g is a threshold of counts='paper'"),
    ({"i": 0.001}, "i is a threshold of counts='paper'"),
    ({"counts": "paper", "g": 2.0}, "g=2.0 is outside"),
    ({"layers": (0, 3)}, "every layer must be >= 1"),
    ({"layers": (5, 3)}, "strictly increasing"),
    ({"vision_point": "llm:2"}, "vision_point='llm:2' is not one of"),
])
def test_bad_options_raise(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        MustDropConfig(keep=0.25, **options)


def test_bad_types_and_unknown_options_raise() -> None:
    with pytest.raises(TypeError, match="merge_threshold must be a number"):
        MustDropConfig(merge_threshold="0.8")
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match="does not take the option 'threshold'.*Did you mean 'merge_threshold'"):
        vtprune.wrap(model, "mustdrop", keep=0.25, threshold=0.8)
    with pytest.raises(ValueError, match="vision_point is 'auto'"):
        MustDropPruner(MustDropConfig(keep=0.25)).plan(32)


def _constant_first_image(family: str, inputs: dict) -> dict:
    """The batch with its first image (LLaVA: one pixel tensor per image) made constant, so that its windows merge."""
    pixels = inputs["pixel_values"].clone()
    if family == "llava":
        pixels[0] = 0.5
    else:
        pixels[:] = 0.5
    return {**inputs, "pixel_values": pixels}


def test_merge_is_per_image_not_the_batch_minimum() -> None:
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    prompts = [Prompt(images=1, prefix=2), Prompt(images=1, prefix=5)]
    batch = _constant_first_image("llava", factory.inputs(model, prompts, seed=4))
    vtprune.wrap(model, "mustdrop", keep=0.5)
    with torch.no_grad():
        model(**batch)
        together = [sample["stages"][0]["kept"] for sample in model.vtprune.last_stats["samples"]]
        alone = []
        for b in range(len(prompts)):
            model(**factory.sample_inputs(batch, prompts, b))
            alone.append(model.vtprune.last_stats["samples"][0]["stages"][0]["kept"])
    n = factory.tokens_per_image(model)
    # The constant 8 x 8 image merges its 4 complete windows; the random one none, and it does not stop the other.
    assert [len(kept[0]) for kept in together] == [n - 4 * 8, n]
    assert together == alone


@pytest.mark.parametrize("family", ["llava", "internvl", "qwen2_vl"])
def test_merged_generation_equals_the_staged_reference(family) -> None:
    """With windows merged (encoder point: projected means; Qwen: projector point), greedy generation equals an
    eager model that hides the dropped keys from each stage's layer on and gets the written rows."""
    factory = FACTORIES[family]
    model, reference = factory.build("sdpa"), factory.build("eager")
    inputs = _constant_first_image(family, factory.inputs(model, [Prompt(images=1, prefix=2),
                                                                  Prompt(images=2, prefix=5)], seed=1))
    with torch.no_grad():
        vtprune.wrap(model, "mustdrop", keep=0.5)
        tokens, logits = _greedy(model, inputs)
        stats = model.vtprune.last_stats
        assert stats["samples"][0]["stages"][0]["wrote_values"] == [True]
        assert stats["samples"][0]["tokens_per_layer"][0] < sum(
            p.numel() for p in factory.image_positions(model, inputs)[0])
        handles = _staged_reference(reference, factory, inputs, model.vtprune)
        ref_tokens, ref_logits = _greedy(reference, inputs)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert model.vtprune.config.vision_point == ("projector" if family == "qwen2_vl" else "encoder")
