"""Yardstick version 2 (``vtprune.eval.synth_v2``): determinism, splits, answer balance, the distribution shift, the
distractors of every category, the layout, label maps, coverage, the training stream and render speed."""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import math
import random
import time

import pytest
import torch

from vtprune.eval import accuracy, reference, synth, synth_v2
from vtprune.eval.synth_v2 import COLOUR_NAMES, SHAPE_NAMES

EPS = 1e-9
CARRIES_PAIR = ("colour", "shape", "exist", "position", "motion")  # the asked object has a colour and a shape


@functools.cache
def items(split: str, category: str, count: int) -> tuple[synth_v2.Item, ...]:
    return tuple(synth_v2.make_item(split, category, i) for i in range(count))



def _coverage(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """(object, asked) coverage per token of a 24 x 24 grid, as the oracles compute it."""
    return accuracy.token_coverage(reference.get_family("llava", 2), scenes, 24, "cpu")

def asked_pair(item: synth_v2.Item) -> tuple[int, int]:
    """(colour, shape) the question and the answer name together."""
    words = item.question.split() + [item.answer]
    return (next(COLOUR_NAMES.index(w) for w in words if w in COLOUR_NAMES),
            next(SHAPE_NAMES.index(w) for w in words if w in SHAPE_NAMES))


def discs(scene: synth_v2.Scene) -> list[tuple[float, float, float]]:
    return [(o.x, o.y, o.r) for o in scene.objects] + [(t.x, t.y, synth_v2.TAG_RADIUS) for t in scene.tags]


def background_of(scene: synth_v2.Scene) -> synth_v2.Scene:
    """The scene without its objects and tags."""
    return synth_v2.Scene(family=scene.family, background=scene.background, texture=scene.texture,
                          specks=scene.specks, checker=scene.checker)


def quadrant(x: float, y: float) -> int:
    return int(x > 0.5) + 2 * int(y > 0.5)


# ---------------------------------------------------------------------------------------------- items and splits
@pytest.mark.parametrize("category", synth_v2.CATEGORIES)
def test_items_are_deterministic(category):
    a, b = synth_v2.make_item("test", category, 7), synth_v2.make_item("test", category, 7)
    assert a == b
    assert a != synth_v2.make_item("test", category, 8)
    assert a != synth_v2.make_item("val", category, 7)
    assert torch.equal(synth_v2.render(a.images, 48), synth_v2.render(b.images, 48))


def test_test_items_are_frozen():
    """The yardstick must not drift: a change to the generator changes this digest (update it only on purpose)."""
    digest = hashlib.sha256()
    for category in synth_v2.CATEGORIES:
        for split in ("test", "test_shift"):
            digest.update(repr(items(split, category, 3)).encode())
    assert digest.hexdigest()[:16] == "9bbf4c389cfcbee0", digest.hexdigest()[:16]


def test_bad_arguments_name_the_valid_values():
    with pytest.raises(ValueError, match="Unknown split 'dev'.*test_shift"):
        synth_v2.make_item("dev", "colour", 0)
    with pytest.raises(ValueError, match="Unknown category 'colours'.*incontext"):
        synth_v2.make_item("val", "colours", 0)
    with pytest.raises(ValueError, match="shots"):
        synth_v2.make_item("val", "incontext", 0, shots=0)
    with pytest.raises(ValueError, match="train_stream"):
        synth_v2.split_items("train", "colour")
    with pytest.raises(ValueError, match="Unknown or no categories"):
        synth_v2.train_stream(("colour", "nope"))
    with pytest.raises(ValueError, match="weights"):
        synth_v2.train_stream(("colour", "shape"), weights=(1.0,))


def test_split_items_sizes():
    assert synth_v2.SPLIT_SIZES == {"val": 200, "test": 1000, "test_shift": 1000}
    assert len(synth_v2.split_items("val", "count")) == 200
    assert synth_v2.split_items("test_shift", "count", limit=5) == [
        synth_v2.make_item("test_shift", "count", i) for i in range(5)]


@pytest.mark.parametrize("category", synth_v2.CATEGORIES)
def test_answers_are_balanced(category):
    answers = [it.answer for it in items("test", category, 300)]
    assert set(answers) <= set(synth_v2.ANSWERS[category])
    # In-context answers are balanced within the rule's values (colour words, shape words).
    groups = (COLOUR_NAMES, SHAPE_NAMES) if category == "incontext" else (synth_v2.ANSWERS[category],)
    for group in groups:
        counts = collections.Counter(a for a in answers if a in group)
        assert set(counts) == set(group)
        assert max(counts.values()) / min(counts.values()) <= 2.5, counts


def test_chance_matches_the_answers():
    assert synth_v2.CHANCE["count"] == 1 / 7 and synth_v2.CHANCE["exist"] == 1 / 2
    assert synth_v2.CHANCE["incontext"] == pytest.approx((1 / 6 + 1 / 4) / 2)
    assert set(synth_v2.CHANCE) == set(synth_v2.CATEGORIES)


# ------------------------------------------------------------------------------------------------ the shift split
@pytest.mark.parametrize("split", ("train", "val", "test"))
def test_held_out_pairs_never_outside_the_shift_split(split):
    for category in synth_v2.CATEGORIES:
        for item in items(split, category, 150):
            for scene in item.images:
                assert not {(o.colour, o.shape) for o in scene.objects} & set(synth_v2.HELD_OUT_PAIRS), item
            if category in CARRIES_PAIR:
                assert asked_pair(item) not in synth_v2.HELD_OUT_PAIRS


def test_held_out_pairs_are_asked_in_the_shift_split():
    assert len({c for c, _ in synth_v2.HELD_OUT_PAIRS}) == len({s for _, s in synth_v2.HELD_OUT_PAIRS}) == 4
    for category in CARRIES_PAIR:
        shift = items("test_shift", category, 300)
        held = [it for it in shift if asked_pair(it) in synth_v2.HELD_OUT_PAIRS]
        assert len(held) >= 0.4 * len(shift), category
        for item in held:  # the pair is the asked object's (a "no" of exist has no such object)
            if item.answer != "no":
                assert any(o.asked and (o.colour, o.shape) == asked_pair(item) for o in item.images[0].objects)


def test_background_families():
    for split in synth_v2.SPLITS:
        families = []
        for category in synth_v2.CATEGORIES:
            for item in items(split, category, 40):
                assert item.shift == (split == "test_shift") and item.cluttered == (item.background != "flat")
                assert {s.family for s in item.images} == {item.background}
                families.append(item.background)
        if split == "test_shift":
            assert set(families) <= set(synth_v2.SHIFT_FAMILIES)
        else:
            assert set(families) == set(synth_v2.FAMILIES)
            assert 0.4 <= families.count("flat") / len(families) <= 0.6
    assert not set(synth_v2.SHIFT_FAMILIES) & set(synth_v2.FAMILIES)


def test_backgrounds_are_grey():
    """Every family is grey (it never answers a colour question), and the patterned ones are patterned."""
    scenes = [synth_v2.make_item(split, "text", 0).images[0] for split in ("val", "test", "test_shift")]
    scenes += [synth_v2.make_item("val", "text", i).images[0] for i in range(1, 12)]
    empty = [background_of(s) for s in scenes]
    images = synth_v2.render(empty, 64)
    assert float((images.amax(1) - images.amin(1)).max()) < 0.08
    for scene, image in zip(empty, images, strict=True):
        assert (float(image.std((1, 2)).max()) > 0.01) == (scene.family != "flat"), scene.family


def test_size_shift():
    radius = synth_v2.RADIUS
    factors, outside = set(), 0
    for category in synth_v2.IMAGE_CATEGORIES:
        for item in items("test_shift", category, 100):
            radii = [o.r for o in item.images[0].objects]
            fits = [f for f in synth_v2.SIZE_SHIFT
                    if all(radius[0] * f - EPS <= r <= radius[1] * f + EPS for r in radii)]
            assert fits, radii
            factors.update(fits)
            outside += sum(not radius[0] <= r <= radius[1] for r in radii)
    assert factors == set(synth_v2.SIZE_SHIFT)
    assert outside > 100


# ------------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("split", ("val", "test_shift"))
def test_layout_gap_border_and_sizes(split):
    scale = (0.85 - EPS, 1.15 + EPS) if split == "test_shift" else (1 - EPS, 1 + EPS)
    for category in synth_v2.CATEGORIES:
        for item in items(split, category, 60):
            for scene in item.images:
                for x, y, r in discs(scene):
                    assert r + synth_v2.BORDER - EPS <= min(x, y) and max(x, y) <= 1 - r - synth_v2.BORDER + EPS
                for (x1, y1, r1), (x2, y2, r2) in itertools.combinations(discs(scene), 2):
                    assert math.hypot(x1 - x2, y1 - y2) >= r1 + r2 + synth_v2.GAP - EPS, (category, scene)
                if category in synth_v2.IMAGE_CATEGORIES:
                    low, high = synth_v2.RADIUS
                    assert all(low * scale[0] <= o.r <= high * scale[1] for o in scene.objects)
                    assert 2 <= len(scene.objects) + len(scene.tags) <= 10
                    if category != "text":
                        assert 2 <= len(scene.objects) <= 7


def test_layout_fallback_never_overlaps():
    rng = random.Random(0)
    radii = [0.07 * 1.15] * 7
    centres = synth_v2._place(rng, radii, tries=0)
    for (x1, y1), (x2, y2) in itertools.combinations(centres, 2):
        assert math.hypot(x1 - x2, y1 - y2) >= 2 * radii[0] + synth_v2.GAP
    in_quadrant = synth_v2._place(rng, radii[:4], quadrants=[3] * 4, tries=0)
    assert {quadrant(x, y) for x, y in in_quadrant} == {3}
    with pytest.raises(RuntimeError, match="No room"):
        synth_v2._place(rng, radii[:5], quadrants=[3] * 5, tries=0)


# ------------------------------------------------------------------------------------------ questions, distractors
@pytest.mark.parametrize("category", ("colour", "shape"))
def test_colour_and_shape_questions_have_distractors(category):
    asked_attr, answer_attr = ("shape", "colour") if category == "colour" else ("colour", "shape")
    names = COLOUR_NAMES if category == "colour" else SHAPE_NAMES
    for item in items("test", category, 300):
        objects = item.images[0].objects
        key = asked_pair(item)[0 if asked_attr == "colour" else 1]
        matches = [o for o in objects if getattr(o, asked_attr) == key]
        assert len(matches) == 1 and matches[0].asked and sum(o.asked for o in objects) == 1
        assert names[getattr(matches[0], answer_attr)] == item.answer
        distractors = [o for o in objects if not o.asked]
        assert 1 <= len(distractors) <= 6
        assert any(names[getattr(o, answer_attr)] != item.answer for o in distractors)


def test_exist_has_partial_matches():
    answers = collections.Counter()
    for item in items("test", "exist", 300):
        colour, shape = asked_pair(item)
        objects = item.images[0].objects
        answers[item.answer] += 1
        matches = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
        assert len(matches) == (item.answer == "yes")
        same_colour = [o for o in objects if o.colour == colour and o.shape != shape]
        same_shape = [o for o in objects if o.shape == shape and o.colour != colour]
        assert same_colour and same_shape
        asked = [o for o in objects if o.asked]
        if item.answer == "yes":
            assert asked == matches
        else:
            assert len(asked) == 2 and all(o in same_colour + same_shape for o in asked)
    assert min(answers.values()) >= 120


def test_position_target_and_sharing_distractors():
    for item in items("test", "position", 300):
        colour, shape = asked_pair(item)
        objects = item.images[0].objects
        target, = (o for o in objects if (o.colour, o.shape) == (colour, shape))
        assert target.asked and sum(o.asked for o in objects) == 1
        assert synth_v2.QUADRANTS[quadrant(target.x, target.y)] == item.answer
        assert min(abs(target.x - 0.5), abs(target.y - 0.5)) >= target.r + 0.03 - EPS
        sharing = [o for o in objects if o is not target and (o.colour == colour or o.shape == shape)]
        assert any(o.colour == colour for o in sharing) and any(o.shape == shape for o in sharing)
        assert all(quadrant(o.x, o.y) != quadrant(target.x, target.y) for o in sharing)


def test_count():
    answers = set()
    for item in items("test", "count", 300):
        colour = COLOUR_NAMES.index(item.question.split()[2])
        objects = item.images[0].objects
        count = synth_v2.NUMBERS.index(item.answer)
        answers.add(count)
        assert 2 <= len(objects) <= 7
        assert sum(o.colour == colour for o in objects) == count
        assert any(o.colour != colour for o in objects)
        assert [o.asked for o in objects] == [o.colour == colour or count == 0 for o in objects]
    assert answers == set(range(7))


def test_text_tags():
    for item in items("test", "text", 300):
        scene = item.images[0]
        assert 2 <= len(scene.tags) <= 3 and 1 <= len(scene.objects) <= 4
        assert len({t.colour for t in scene.tags}) == len({t.char for t in scene.tags}) == len(scene.tags)
        asked, = (t for t in scene.tags if t.asked)
        assert COLOUR_NAMES[asked.colour] in item.question.split()
        assert synth.CHARS[asked.char].lower() == item.answer
        assert not any(o.asked for o in scene.objects)


@pytest.mark.parametrize("shots", (2, 4))
def test_incontext_demonstrations(shots):
    rules = set()
    for i in range(40):
        item = synth_v2.make_item("test", "incontext", i, shots=shots)
        assert item.kind == "multi" and len(item.images) == shots + 1 and len(item.demo_answers) == shots
        labels = item.demo_answers + [item.answer]
        rule = "colour" if labels[0] in COLOUR_NAMES else "shape"
        rules.add(rule)
        names = COLOUR_NAMES if rule == "colour" else SHAPE_NAMES
        assert all(label in names for label in labels)
        for scene, label, is_query in zip(item.images, labels, [False] * shots + [True], strict=True):
            largest = max(scene.objects, key=lambda o: o.r)
            others = [o for o in scene.objects if o is not largest]
            assert 1 <= len(others) <= 3
            assert largest.r >= synth_v2.LARGE_RADIUS[0] > synth_v2.SMALL_RADIUS[1] >= max(o.r for o in others)
            assert names[getattr(largest, rule)] == label
            assert all(names[getattr(o, rule)] != label for o in others)
            assert [o.asked for o in scene.objects] == [is_query and o is largest for o in scene.objects]
    assert rules == {"colour", "shape"}


def test_videos():
    frames = synth_v2.VIDEO_FRAMES
    for item in items("test", "motion", 100):
        assert item.kind == "video" and len(item.images) == frames
        assert len({repr(background_of(s)) for s in item.images}) == 1  # one background for every frame
        movers = [next(o for o in s.objects if o.asked) for s in item.images]
        assert all((m.colour, m.shape) == asked_pair(item) for m in movers)
        static = [o for o in item.images[0].objects if not o.asked]
        assert 1 <= len(static) <= 3 and all((o.colour, o.shape) != asked_pair(item) for o in static)
        assert all([o for o in s.objects if not o.asked] == static for s in item.images)
        for o, m in itertools.product(static, movers):
            assert math.hypot(o.x - m.x, o.y - m.y) >= o.r + m.r + synth_v2.GAP - EPS
        dx, dy = movers[-1].x - movers[0].x, movers[-1].y - movers[0].y
        expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[item.answer]
        assert (math.copysign(1, dx) if abs(dx) > 0.2 else 0, math.copysign(1, dy) if abs(dy) > 0.2 else 0) == expected
    for item in items("test", "appear", 100):
        counts = [len(s.objects) for s in item.images]
        at = counts.index(max(counts))
        assert 2 <= at <= frames - 3 and counts == [counts[0]] * at + [counts[0] + 1] * (frames - at)
        new, = (o for o in item.images[-1].objects if o.asked)
        assert SHAPE_NAMES[new.shape] == item.answer and 1 <= counts[0] <= 3
        assert all(o.shape != new.shape for o in item.images[0].objects)
    for item in items("test", "order", 100):
        appeared = [[o for o in s.objects if o.asked] for s in item.images]
        first_at = next(t for t, a in enumerate(appeared) if a)
        second_at = next(t for t, a in enumerate(appeared) if len(a) == 2)
        assert 1 <= first_at < second_at <= frames - 2 and len(appeared[first_at]) == 1
        first, = appeared[first_at]
        second, = (o for o in appeared[-1] if o is not first)
        assert SHAPE_NAMES[first.shape] == item.answer and first.shape != second.shape
        static = [o for o in item.images[0].objects if not o.asked]
        assert len(static) <= 2 and all(o.shape not in (first.shape, second.shape) for o in static)


def test_vocabulary_covers_every_prompt_and_answer():
    words = synth_v2.vocabulary()
    assert len(words) == len(set(words))
    assert {"zero", "yes", "no", "label", "?", "topleft", "up", "k"} <= set(words)
    for category in synth_v2.CATEGORIES:
        for split in ("test", "test_shift"):
            for item in items(split, category, 50):
                assert set(item.question.split() + [item.answer] + item.demo_answers) <= set(words), item.question


def test_train_stream_mixes_categories():
    categories = synth_v2.IMAGE_CATEGORIES
    batch = list(itertools.islice(synth_v2.train_stream(categories, seed=3), 64))
    assert len({it.category for it in batch}) >= 5
    assert not any(it.shift for it in batch)
    again = list(itertools.islice(synth_v2.train_stream(categories, seed=3), 64))
    assert again == batch
    assert list(itertools.islice(synth_v2.train_stream(categories, seed=4), 64)) != batch
    only = itertools.islice(synth_v2.train_stream(categories, weights=(0, 0, 1, 0, 0, 0)), 20)
    assert {it.category for it in only} == {"exist"}


# -------------------------------------------------------------------------------------- rendering and label maps
def full_lattice_labels(scenes: list[synth_v2.Scene], size: int) -> dict[str, torch.Tensor]:
    """Label maps drawn one object at a time on the whole lattice with v1's primitives (the windowed fast path must
    give the same pixels)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = (c[None] for c in torch.meshgrid(coords, coords, indexing="ij"))
    labels = {k: torch.zeros(len(scenes), size, size, dtype=torch.long) for k in ("colour", "shape", "char", "asked")}
    font = synth.font_bitmaps("cpu")

    def at(value: float) -> torch.Tensor:
        return torch.tensor([[[value]]], dtype=torch.float32)

    for i, scene in enumerate(scenes):
        for o in scene.objects:
            mask = synth.shape_mask(torch.tensor([o.shape]), x - at(o.x), y - at(o.y), at(o.r))[0]
            for name, value in (("colour", o.colour + 1), ("shape", o.shape + 1), ("char", 0), ("asked", o.asked)):
                labels[name][i][mask] = int(value)
        for t in scene.tags:
            dx, dy = x - at(t.x), y - at(t.y)
            rect = ((dx.abs() <= synth_v2.TAG_HALF[0]) & (dy.abs() <= synth_v2.TAG_HALF[1]))[0]
            in_box, _ = synth.glyph_mask(font, torch.tensor([t.char]), dx, dy)
            for name, value in (("colour", t.colour + 1), ("shape", 5), ("char", 0), ("asked", t.asked)):
                labels[name][i][rect] = int(value)
            labels["char"][i][in_box[0]] = t.char + 1
    return labels


@pytest.mark.parametrize("size", (24, 97, 336))
def test_windowed_label_maps_match_the_full_lattice(size):
    scenes = [s for c in synth_v2.CATEGORIES for split in ("val", "test_shift")
              for it in items(split, c, 2) for s in it.images[:2]]
    # The widest shapes (triangles, wider than r at the base) at the largest shifted size, edges on many pixels.
    rng, r = random.Random(2), synth_v2.RADIUS[1] * synth_v2.SIZE_SHIFT[1]
    scenes += [synth_v2.Scene(objects=[synth_v2.Obj(shape=2, colour=0, x=x, y=y, r=r)
                                       for x, y in synth_v2._place(rng, [r] * 7)]) for _ in range(6)]
    fast, reference = synth_v2.label_maps(scenes, size), full_lattice_labels(scenes, size)
    for name in reference:
        assert torch.equal(fast[name], reference[name]), name


def test_render_paints_the_labels():
    scenes = [it.images[0] for c in synth_v2.IMAGE_CATEGORIES for it in items("test_shift", c, 3)]
    images, labels = synth_v2.render(scenes, 120), synth_v2.label_maps(scenes, 120)
    palette = torch.tensor(list(synth.COLOURS.values()))
    on = (labels["shape"] >= 1) & (labels["shape"] <= len(synth.SHAPES))
    assert torch.equal(images.permute(0, 2, 3, 1)[on], palette[labels["colour"][on] - 1])
    assert float(images.min()) == pytest.approx(synth_v2.GLYPH_INK)  # the glyphs
    assert labels["char"].max() <= len(synth.CHARS) and labels["shape"].max() == len(synth.SHAPES) + 1


def test_asked_is_marked_on_every_image_item():
    for category in synth_v2.IMAGE_CATEGORIES:
        for split in ("test", "test_shift"):
            scenes = [it.images[0] for it in items(split, category, 30)]
            assert bool((synth_v2.label_maps(scenes, 96)["asked"].flatten(1).amax(1) == 1).all()), category
            assert bool((_coverage(scenes)[1].sum(1) > 0).all()), category


def test_coverage_is_the_covered_share():
    scenes = [it.images[0] for c in synth_v2.IMAGE_CATEGORIES for it in items("val", c, 4)]
    cover = dict(zip(("object", "asked"), _coverage(scenes), strict=True))
    assert cover["object"].shape == cover["asked"].shape == (len(scenes), 576)
    assert float(cover["object"].min()) >= 0 and float(cover["object"].max()) <= 1
    assert bool((cover["asked"] <= cover["object"]).all())
    rng = random.Random(1)
    for r in (0.045, 0.06, 0.07):
        x, y = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        circle = synth_v2.Scene(objects=[synth_v2.Obj(shape=0, colour=1, x=x, y=y, r=r)])
        tokens = float(_coverage([circle])[0].sum())
        assert tokens / 24**2 == pytest.approx(math.pi * r * r, rel=0.12)


def test_objects_span_a_few_tokens():
    scenes = [it.images[0] for c in ("colour", "shape", "count") for it in items("test", c, 50)]
    per_object = _coverage(scenes)[0].sum(1) / torch.tensor([len(s.objects) for s in scenes])
    assert 2 <= float(per_object.mean()) <= 8 and float(per_object.min()) >= 1.5


def test_render_speed_on_cpu():
    scenes = [it.images[0] for c in synth_v2.IMAGE_CATEGORIES for it in items("test", c, 3)][:16]
    synth_v2.render(scenes, 32)  # first-call set-up is not the renderer's cost
    best = math.inf
    for _ in range(2):  # the better of two: other processes share the CPU
        start = time.perf_counter()
        images = synth_v2.render(scenes, 336)
        best = min(best, time.perf_counter() - start)
    assert images.shape == (16, 3, 336, 336) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert best < 3.0
