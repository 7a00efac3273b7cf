"""A procedural visual question-answering set: the yardstick for accuracy kept (DESIGN.md §3).

No pretrained VLM can be downloaded here, so vtprune trains small reference models on this set and measures every
pruner on them. Items are drawn deterministically from (split, category, index) and rendered with torch on any
device, so the GPU trainer renders its own batches and CPU CI renders the same test items bit for bit.

Categories and the evidence they need:
- ``colour``: colour of the object of a given shape (one object among 1-4);
- ``shape``: shape of the object of a given colour;
- ``position``: quadrant of a given object (objects sit in distinct quadrants);
- ``count``: number of objects (1-6);
- ``text``: a small glyph (5x7 bitmap font, about 2x2 patches) to read: fine detail that pruning easily loses;
- ``incontext``: two demonstration images labelled by a hidden rule (colour or shape of the largest object), then
  a query image: the rule must be inferred from the demonstrations (the CATP setting);
- ``motion`` / ``appear`` / ``order`` (video, 8 frames): direction an object moves; which object appears; which of
  two objects appears first. Frames are mostly redundant, as in real video.

Every item has a "simple" (flat) or "cluttered" (grey texture and specks) background, so token redundancy varies
between images as in photos; colours of clutter are grey so they never answer a colour question. Answers are single
words and balanced per category (the answer is drawn first and the scene built to match), so answer priors give
chance accuracy.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

COLOURS = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.13, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.75),
    "orange": (1.00, 0.55, 0.05),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = ("topleft", "topright", "bottomleft", "bottomright")
NUMBERS = ("one", "two", "three", "four", "five", "six")
DIRECTIONS = ("left", "right", "up", "down")
# 5x7 bitmap font: fixed here (not a system font) so the rendered test set never changes with the environment.
FONT = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "B": ("11110", "10001", "10001", "11110", "10001", "10001", "11110"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "K": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
}
CHARS = tuple(FONT)

IMAGE_CATEGORIES = ("colour", "shape", "position", "count", "text")
MULTI_CATEGORIES = ("incontext",)
VIDEO_CATEGORIES = ("motion", "appear", "order")
CATEGORIES = IMAGE_CATEGORIES + MULTI_CATEGORIES + VIDEO_CATEGORIES
SPLIT_SIZES = {"val": 200, "test": 1000}
VIDEO_FRAMES = 8
MAX_OBJECTS = 6

QUESTION_WORDS = (
    "what colour is the shape of object where how many objects are there character written label which way does "
    "move appears first ?"
).split()


def vocabulary() -> list[str]:
    """Every word a prompt or an answer can contain (a word-level tokenizer covers the set exactly)."""
    words = list(QUESTION_WORDS) + list(COLOURS) + list(SHAPES) + list(QUADRANTS) + list(NUMBERS)
    words += list(DIRECTIONS) + [c.lower() for c in CHARS]
    seen: dict[str, None] = {}
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


@dataclass
class Obj:
    shape: int  # index into SHAPES
    colour: int  # index into COLOURS
    x: float  # centre, in [0, 1] of the image width
    y: float
    r: float  # half size, fraction of the image


@dataclass
class Scene:
    """One image: objects, an optional glyph, and the background."""

    objects: list[Obj] = field(default_factory=list)
    glyph: int = -1  # index into CHARS, -1 for none
    glyph_xy: tuple[float, float] = (0.0, 0.0)
    background: tuple[float, float, float] = (0.9, 0.9, 0.88)
    cluttered: bool = False
    texture: tuple[float, float, float] = (0.0, 0.0, 0.0)  # frequency, angle, phase
    specks: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Item:
    """One question. ``images`` holds one scene (image), several (in-context) or the frames of one video."""

    category: str
    question: str
    answer: str
    images: list[Scene]
    kind: str  # "image", "multi" or "video"
    demo_answers: list[str] = field(default_factory=list)
    cluttered: bool = False


def _rng(split: str, category: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"vtprune-synth/{split}/{category}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _background(rng: random.Random, scene: Scene, cluttered: bool) -> None:
    grey = rng.uniform(0.75, 0.95)
    scene.background = (grey, grey * rng.uniform(0.97, 1.0), grey * rng.uniform(0.93, 1.0))
    scene.cluttered = cluttered
    if cluttered:
        scene.texture = (rng.uniform(8, 30), rng.uniform(0, 3.1416), rng.uniform(0, 6.28))
        scene.specks = [(rng.random(), rng.random()) for _ in range(rng.randint(10, 30))]


def _cells(rng: random.Random, count: int, size: float = 0.1) -> list[tuple[float, float]]:
    """Centres of ``count`` non-overlapping objects: distinct cells of a 3x3 grid, jittered inside the cell."""
    cells = rng.sample(range(9), count)
    margin = 1 / 6 - size - 0.01
    return [((c % 3 + 0.5) / 3 + rng.uniform(-margin, margin), (c // 3 + 0.5) / 3 + rng.uniform(-margin, margin))
            for c in cells]


def _objects(rng: random.Random, count: int, distinct: str | None = None) -> list[Obj]:
    shapes = rng.sample(range(len(SHAPES)), count) if distinct == "shape" else [
        rng.randrange(len(SHAPES)) for _ in range(count)]
    colours = rng.sample(range(len(COLOURS)), count) if distinct == "colour" else [
        rng.randrange(len(COLOURS)) for _ in range(count)]
    centres = _cells(rng, count)
    return [Obj(s, c, x, y, rng.uniform(0.07, 0.1)) for s, c, (x, y) in zip(shapes, colours, centres, strict=True)]


def make_item(split: str, category: str, index: int) -> Item:
    """The item ``index`` of ``category`` in ``split`` ("train", "val" or "test"); deterministic."""
    if category not in CATEGORIES:
        raise ValueError(f"Unknown category '{category}'. Categories: {list(CATEGORIES)}.")
    if split not in ("train", "val", "test"):
        raise ValueError(f"Unknown split '{split}'. Use 'train', 'val' or 'test'.")
    rng = _rng(split, category, index)
    cluttered = rng.random() < 0.5
    colour_names, shape_names = list(COLOURS), list(SHAPES)

    if category in IMAGE_CATEGORIES:
        scene = Scene()
        _background(rng, scene, cluttered)
        if category == "colour":
            scene.objects = _objects(rng, rng.randint(1, 4), distinct="shape")
            target = rng.randrange(len(scene.objects))
            scene.objects[target].colour = answer_idx = rng.randrange(len(COLOURS))
            question, answer = f"what colour is the {shape_names[scene.objects[target].shape]} ?", colour_names[
                answer_idx]
        elif category == "shape":
            scene.objects = _objects(rng, rng.randint(1, 4), distinct="colour")
            target = rng.randrange(len(scene.objects))
            scene.objects[target].shape = answer_idx = rng.randrange(len(SHAPES))
            question = f"what shape is the {colour_names[scene.objects[target].colour]} object ?"
            answer = shape_names[answer_idx]
        elif category == "position":
            count = rng.randint(1, 4)
            quadrants = rng.sample(range(4), count)
            scene.objects = _objects(rng, count, distinct="colour")
            for obj, quadrant in zip(scene.objects, quadrants, strict=True):
                obj.x = (quadrant % 2 + 0.5) / 2 + rng.uniform(-0.12, 0.12)
                obj.y = (quadrant // 2 + 0.5) / 2 + rng.uniform(-0.12, 0.12)
            target = rng.randrange(count)
            obj = scene.objects[target]
            question = f"where is the {colour_names[obj.colour]} {shape_names[obj.shape]} ?"
            answer = QUADRANTS[quadrants[target]]
        elif category == "count":
            count = rng.randint(1, MAX_OBJECTS)
            scene.objects = _objects(rng, count)
            question, answer = "how many objects are there ?", NUMBERS[count - 1]
        else:  # text
            scene.objects = _objects(rng, rng.randint(0, 2))
            free = [c for c in range(9) if all(
                int(o.x * 3) + 3 * int(o.y * 3) != c for o in scene.objects)]
            cell = rng.choice(free)
            scene.glyph = rng.randrange(len(CHARS))
            scene.glyph_xy = ((cell % 3 + 0.5) / 3 + rng.uniform(-0.1, 0.1), (cell // 3 + 0.5) / 3 + rng.uniform(
                -0.1, 0.1))
            question, answer = "what character is written ?", CHARS[scene.glyph].lower()
        return Item(category, question, answer, [scene], "image", cluttered=cluttered)

    if category == "incontext":
        rule = rng.choice(("colour", "shape"))
        scenes, labels = [], []
        for _ in range(3):
            scene = Scene()
            _background(rng, scene, cluttered)
            scene.objects = _objects(rng, 2, distinct=rule)
            scene.objects[0].r, scene.objects[1].r = rng.uniform(0.12, 0.15), rng.uniform(0.05, 0.07)
            rng.shuffle(scene.objects)
            largest = max(scene.objects, key=lambda o: o.r)
            labels.append(colour_names[largest.colour] if rule == "colour" else shape_names[largest.shape])
            scenes.append(scene)
        return Item(category, "label ?", labels[-1], scenes, "multi", demo_answers=labels[:-1], cluttered=cluttered)

    # Video: one background for all frames; objects move or appear between frames.
    frames = []
    base = Scene()
    _background(rng, base, cluttered)
    if category == "motion":
        direction = rng.randrange(4)
        obj = _objects(rng, 1)[0]
        extra = _objects(rng, rng.randint(0, 1))
        dx, dy = [(-1, 0), (1, 0), (0, -1), (0, 1)][direction]
        travel = rng.uniform(0.35, 0.5)
        start_x = 0.5 - dx * travel / 2 + rng.uniform(-0.1, 0.1) * (dx == 0)
        start_y = 0.5 - dy * travel / 2 + rng.uniform(-0.1, 0.1) * (dy == 0)
        for t in range(VIDEO_FRAMES):
            frac = t / (VIDEO_FRAMES - 1)
            moved = Obj(obj.shape, obj.colour, start_x + dx * travel * frac, start_y + dy * travel * frac, obj.r)
            frames.append(_frame(base, [moved] + [o for o in extra if _far(o, moved)]))
        question = f"which way does the {shape_names[obj.shape]} move ?"
        answer = DIRECTIONS[direction]
    elif category == "appear":
        objs = _objects(rng, 3, distinct="shape")
        appear_at = rng.randint(2, VIDEO_FRAMES - 3)
        for t in range(VIDEO_FRAMES):
            frames.append(_frame(base, objs if t >= appear_at else objs[1:]))
        question, answer = "which shape appears ?", shape_names[objs[0].shape]
    else:  # order
        objs = _objects(rng, 2, distinct="shape")
        first, second = sorted(rng.sample(range(1, VIDEO_FRAMES - 1), 2))
        for t in range(VIDEO_FRAMES):
            frames.append(_frame(base, [o for o, at in zip(objs, (first, second), strict=True) if t >= at]))
        question, answer = "which shape appears first ?", shape_names[objs[0].shape]
    return Item(category, question, answer, frames, "video", cluttered=cluttered)


def _far(a: Obj, b: Obj) -> bool:
    return abs(a.y - b.y) > 0.25 or abs(a.x - b.x) > 0.25


def _frame(base: Scene, objects: list[Obj]) -> Scene:
    return Scene(list(objects), base.glyph, base.glyph_xy, base.background, base.cluttered, base.texture,
                 base.specks)


def split_items(split: str, category: str, limit: int | None = None) -> list[Item]:
    """The fixed val/test items of a category (val: 200, test: 1,000)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"Fixed splits are {list(SPLIT_SIZES)}; use train_stream for training items.")
    count = SPLIT_SIZES[split] if limit is None else min(limit, SPLIT_SIZES[split])
    return [make_item(split, category, i) for i in range(count)]


def train_stream(categories: tuple[str, ...], seed: int = 0) -> Iterator[Item]:
    """An unbounded stream of training items, round-robin over ``categories``."""
    index = seed * 10_000_000
    while True:
        for category in categories:
            yield make_item("train", category, index)
        index += 1


def score(prediction: str, answer: str) -> bool:
    """Exact match on the first word, case-insensitive."""
    words = prediction.strip().lower().split()
    return bool(words) and words[0] == answer.lower()


# ------------------------------------------------------------------------------------------------------ rendering
def render(scenes: list[Scene], size: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, 3, size, size) float images in [0, 1], rendered with torch ops (the same on CPU and GPU)."""
    images, _ = _render(scenes, size, size, device)
    return images


def label_maps(scenes: list[Scene], grid: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Dense targets at the centres of a grid x grid patch lattice: colour (0 = none), shape (0 = none, last =
    glyph) and character (0 = none) of whatever covers each patch centre. Used to pre-train vision towers."""
    _, labels = _render(scenes, grid, grid, device, sample_centres=True)
    return labels


def _render(scenes: list[Scene], height: int, width: int, device, sample_centres: bool = False):
    n = len(scenes)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    y, x = y[None], x[None]

    background = torch.tensor([s.background for s in scenes], device=device)  # (N, 3)
    image = background[:, :, None, None].expand(n, 3, height, width).clone()
    texture = torch.tensor([s.texture for s in scenes], device=device)
    clutter = torch.tensor([s.cluttered for s in scenes], device=device, dtype=torch.float32)
    image = image + (0.08 * clutter[:, None, None, None] * grating(texture, x, y)[:, None])
    max_specks = max((len(s.specks) for s in scenes), default=0)
    if max_specks:
        specks = torch.full((n, max_specks, 2), -10.0, device=device)
        for i, s in enumerate(scenes):
            if s.specks:
                specks[i, : len(s.specks)] = torch.tensor(s.specks, device=device)
        hit = torch.zeros(n, height, width, dtype=torch.bool, device=device)
        for k in range(max_specks):  # one speck at a time: an (N, specks, H, W) tensor would not fit at 448 px
            hit |= (x - specks[:, k, 0, None, None]) ** 2 + (y - specks[:, k, 1, None, None]) ** 2 < 0.012**2
        image = torch.where(hit[:, None], image * 0.55, image)

    colour_label = torch.zeros(n, height, width, dtype=torch.long, device=device)
    shape_label = torch.zeros_like(colour_label)
    char_label = torch.zeros_like(colour_label)
    palette = torch.tensor(list(COLOURS.values()), device=device)
    max_objects = max((len(s.objects) for s in scenes), default=0)
    for k in range(max_objects):
        params = _object_params(scenes, k, device)
        shape, colour = params[:, 0].long(), params[:, 1].long()
        cx, cy, r = (params[:, j, None, None] for j in (2, 3, 4))
        mask = shape_mask(shape, x - cx, y - cy, r)
        image = torch.where(mask[:, None], palette[colour][:, :, None, None], image)
        colour_label = torch.where(mask, colour[:, None, None] + 1, colour_label)
        shape_label = torch.where(mask, shape[:, None, None] + 1, shape_label)

    glyphs = torch.tensor([s.glyph for s in scenes], device=device)
    if bool((glyphs >= 0).any()):
        gxy = torch.tensor([s.glyph_xy for s in scenes], device=device)
        in_box, lit = glyph_mask(font_bitmaps(device), glyphs, x - gxy[:, 0, None, None], y - gxy[:, 1, None, None])
        image = torch.where(lit[:, None], torch.zeros_like(image) + 0.05, image)
        shape_label = torch.where(in_box, len(SHAPES) + 1, shape_label)
        char_label = torch.where(in_box, glyphs[:, None, None] + 1, char_label)
        colour_label = torch.where(in_box, 0, colour_label)
    labels = {"colour": colour_label, "shape": shape_label, "char": char_label}
    return image.clamp(0, 1), labels


def _object_params(scenes: list[Scene], k: int, device) -> Tensor:
    rows = []
    for s in scenes:
        if k < len(s.objects):
            o = s.objects[k]
            rows.append([o.shape, o.colour, o.x, o.y, o.r])
        else:
            rows.append([-1, 0, -10.0, -10.0, 0.0])
    return torch.tensor(rows, device=device, dtype=torch.float32)


# The drawing primitives below are shared with ``synth_v2`` (the same shapes, font and grating in both versions).
GLYPH_CELL = 1 / 84  # side of a font pixel: 4 px at 336, so a 5x7 glyph spans about 2 x 2 patches of 14 px


def shape_mask(shape: Tensor, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """(N, H, W) pixels inside each scene's object: ``shape`` (N,) indices into SHAPES (-1 = no object), ``dx``,
    ``dy`` (N, H, W) offsets of the pixels from the object's centre, ``r`` (N, 1, 1) its half size."""
    n, height, width = dx.shape
    inside = torch.stack(
        (
            dx**2 + dy**2 <= r**2,
            (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r),
            (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= (dy + r) * 0.58),
            ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r)),
        ),
        dim=1,
    )  # (N, 4, H, W)
    mask = inside.gather(1, shape.clamp(min=0)[:, None, None, None].expand(n, 1, height, width))[:, 0]
    return mask & (shape >= 0)[:, None, None]


def font_bitmaps(device: torch.device | str) -> Tensor:
    """(len(CHARS), 7, 5) bool bitmaps of the font."""
    return torch.tensor([[[int(c) for c in row] for row in FONT[ch]] for ch in CHARS], device=device,
                        dtype=torch.bool)


def glyph_mask(font: Tensor, glyphs: Tensor, dx: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(N, H, W) masks of each scene's glyph box and of its lit font pixels: ``glyphs`` (N,) indices into CHARS
    (-1 = none), ``dx``, ``dy`` (N, H, W) offsets of the pixels from the glyph's centre."""
    col = torch.floor(dx / GLYPH_CELL + 2.5).long()
    row = torch.floor(dy / GLYPH_CELL + 3.5).long()
    in_box = (col >= 0) & (col < 5) & (row >= 0) & (row < 7) & (glyphs >= 0)[:, None, None]
    lit = font[glyphs.clamp(min=0)[:, None, None], row.clamp(0, 6), col.clamp(0, 4)] & in_box
    return in_box, lit


def grating(texture: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """(N, H, W) sinusoid in [-1, 1]: ``texture`` (N, 3) frequency, angle, phase; ``x``, ``y`` (1, H, W)."""
    return torch.sin(texture[:, 0, None, None] * (x * torch.cos(texture[:, 1, None, None]) + y * torch.sin(
        texture[:, 1, None, None])) + texture[:, 2, None, None])
