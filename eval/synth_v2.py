"""Version 2 of the procedural visual question-answering set: a yardstick that rewards picking the informative tokens.

Version 1 (``vtprune.eval.synth``, kept unchanged: the shipped checkpoints were trained on it) drew at most six large
objects into the cells of a 3x3 grid and asked about "the" object of a colour or a shape that nothing else shared. A
model could answer from "the only red thing" or from how much of the image was covered, so a pruner that kept a
lattice of tokens scored as well as one that kept the evidence. Version 2 keeps v1's colours, shapes, font, quadrants,
directions, clutter and drawing code (imported, not copied) and changes the scenes so that, as in real images, only a
few tokens answer the question and they must be found:

- small objects (half size 0.045-0.07 of the side: about 3-6 tokens of a 24x24 grid) placed anywhere with a minimum
  gap, 2-7 per image; sizes vary about 2x in area, so covered area does not predict a count;
- every question has distractors that share the asked attribute (``colour``: other shapes, some of other colours;
  ``shape``: other colours, some of other shapes; ``exist``: an object of the asked colour with another shape and
  one of the asked shape with another colour; ``position``: objects sharing the target's colour or shape in other
  quadrants; ``count``: objects of other colours; ``text``: 2-3 coloured tags, each with a character, and the
  question names the tag's colour), so the answer needs the right object, not any object;
- categories: ``colour``, ``shape``, ``exist`` (yes / no), ``position`` (quadrant), ``count`` (zero..six objects of
  a colour), ``text`` (the 5x7 glyph, about 2x2 patches, on the tag of a colour), ``incontext`` (demonstrations
  labelled with the colour or the shape of the largest object, then a query: the CATP setting), and the videos
  ``motion`` (which way the object of a colour and a shape moves), ``appear`` (which shape appears), ``order``
  (which of two shapes appears first); frames share one background and are mostly redundant, as in real video;
- a distribution shift, split ``test_shift``: four colour x shape pairs (``HELD_OUT_PAIRS``) never appear in train,
  val or test and are the asked object of at least 40% of the shift items that name a colour and a shape; its
  backgrounds are a family no other split has (a low-contrast checkerboard, where the others have flat grey or v1's
  grating with specks, half each); all its objects are 15% smaller or larger. A pruner tuned to the training
  distribution shows here whether it keeps the evidence or a learned prior.

Backgrounds are grey in every family so they never answer a colour question. Answers are single words, drawn
uniformly before the scene is built to match, so answer priors give chance accuracy (``CHANCE``). Objects and tags
carry ``asked``: what the question is about (the target; for ``count`` every object of the asked colour, every object
when there is none; for a "no" of ``exist`` the two partial matches; the largest object of an in-context query; the
moving or appearing objects of a video), which ``label_maps`` exposes to question-aware oracles
(``accuracy.token_coverage``).
Items are drawn deterministically from (split, category, index) and rendered with torch on any device, vectorised
over scenes, like version 1.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from vtprune.eval import synth
from vtprune.eval.synth import (
    CHARS,
    COLOURS,
    DIRECTIONS,
    GLYPH_CELL,
    QUADRANTS,
    SHAPES,
    VIDEO_FRAMES,
    font_bitmaps,
    glyph_mask,
    grating,
    shape_mask,
)

COLOUR_NAMES, SHAPE_NAMES = tuple(COLOURS), SHAPES
NUMBERS = ("zero",) + synth.NUMBERS  # count answers: 0-6 objects of the asked colour
# (colour, shape) indices: red triangle, green cross, blue circle, yellow square; one per shape, distinct colours, so
# every shape and four colours are still seen in training, only these combinations are not.
HELD_OUT_PAIRS = ((0, 2), (1, 3), (2, 0), (3, 1))
HELD_OUT_SHARE = 0.75  # chance that a test_shift target is forced to a held-out pair when one fits the answer

RADIUS = (0.045, 0.07)  # object half size, fraction of the image side
LARGE_RADIUS, SMALL_RADIUS = (0.085, 0.1), (0.045, 0.06)  # in-context: the largest object and its distractors
SIZE_SHIFT = (0.85, 1.15)  # test_shift: every radius of an item times one of these
GAP = 0.03  # least gap between the circles of radius r of two objects (a tag: its bounding circle)
BORDER = 0.02  # least distance between an object's edge and the image's
# A tag is the glyph's 5x7 box plus one font pixel of margin; it keeps the gap with its bounding circle.
TAG_HALF = (3.5 * GLYPH_CELL, 4.5 * GLYPH_CELL)
TAG_RADIUS = math.hypot(*TAG_HALF)
GLYPH_INK = 0.05  # grey level of a glyph's lit pixels, as in v1
SPECK_RADIUS = 0.012  # dark specks of the "texture" family, as in v1
FAMILIES = ("flat", "texture")  # backgrounds of train, val and test, half each
SHIFT_FAMILIES = ("checker",)  # backgrounds seen only in test_shift

IMAGE_CATEGORIES = ("colour", "shape", "exist", "position", "count", "text")
MULTI_CATEGORIES = ("incontext",)
VIDEO_CATEGORIES = ("motion", "appear", "order")
CATEGORIES = IMAGE_CATEGORIES + MULTI_CATEGORIES + VIDEO_CATEGORIES
SPLITS = ("train", "val", "test", "test_shift")
SPLIT_SIZES = {"val": 200, "test": 1000, "test_shift": 1000}

QUESTIONS = {
    "colour": "what colour is the {shape} ?",
    "shape": "what shape is the {colour} object ?",
    "exist": "is there a {colour} {shape} ?",
    "position": "where is the {colour} {shape} ?",
    "count": "how many {colour} objects ?",
    "text": "what character is on the {colour} tag ?",
    "incontext": "label ?",
    "motion": "which way does the {colour} {shape} move ?",
    "appear": "which shape appears ?",
    "order": "which shape appears first ?",
}
ANSWERS = {
    "colour": COLOUR_NAMES, "shape": SHAPE_NAMES, "exist": ("yes", "no"), "position": QUADRANTS, "count": NUMBERS,
    "text": tuple(c.lower() for c in CHARS), "incontext": COLOUR_NAMES + SHAPE_NAMES, "motion": DIRECTIONS,
    "appear": SHAPE_NAMES, "order": SHAPE_NAMES,
}
# In-context: the demonstrations tell the rule, so a blind guess is uniform over the rule's values.
CHANCE = {c: 1 / len(a) for c, a in ANSWERS.items()} | {
    "incontext": (1 / len(COLOUR_NAMES) + 1 / len(SHAPE_NAMES)) / 2}


# Training only (never a test category): "describe" items, whose answer lists every object as colour, shape and
# quadrant, and every tag as colour, "tag", character, in reading order. Many supervised words per image, each
# needing the LLM to find one object among the visual tokens: the image-captioning stage of a real VLM's recipe.
CAPTION = "caption"
CAPTION_PROMPT = "describe the image ?"


def vocabulary() -> list[str]:
    """Every word a prompt or an answer can contain (a word-level tokenizer covers the set exactly)."""
    words = [w for q in (*QUESTIONS.values(), CAPTION_PROMPT) for w in q.split() if not w.startswith("{")]
    words += [w for answers in ANSWERS.values() for w in answers]
    return list(dict.fromkeys(words))


@dataclass
class Obj(synth.Obj):
    """An object: v1's (shape, colour, x, y, r) and whether the question is about it."""

    asked: bool = False


@dataclass
class Tag:
    """A coloured rectangle (``TAG_HALF``) carrying one dark glyph."""

    colour: int  # index into COLOURS
    char: int  # index into CHARS
    x: float  # centre, in [0, 1] of the image width
    y: float
    asked: bool = False


@dataclass
class Scene:
    """One image: objects, tags and a background of one family."""

    objects: list[Obj] = field(default_factory=list)
    tags: list[Tag] = field(default_factory=list)
    family: str = "flat"  # one of FAMILIES or SHIFT_FAMILIES
    background: tuple[float, float, float] = (0.9, 0.9, 0.88)
    texture: tuple[float, float, float] = (0.0, 0.0, 0.0)  # "texture": grating frequency, angle, phase
    specks: list[tuple[float, float]] = field(default_factory=list)  # "texture": dark specks' centres
    checker: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)  # "checker": cell side, x, y phase, amplitude


@dataclass
class Item(synth.Item):
    """One question: v1's fields (``images``: one scene, several for in-context, the frames of a video; ``kind``:
    "image", "multi" or "video"; ``cluttered``: the background is patterned, so v1's per-background reports still
    work), the background's family and whether the item is drawn from test_shift."""

    background: str = "flat"  # the family of every scene of the item
    shift: bool = False


def _seeded(key: str) -> random.Random:
    digest = hashlib.sha256(f"vtprune-synth-v2/{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------------------------------------- layout
Disc = tuple[float, float, float]  # centre x, y and radius


def _clear(x: float, y: float, r: float, discs: Sequence[Disc]) -> bool:
    return all(math.hypot(x - cx, y - cy) >= r + cr + GAP for cx, cy, cr in discs)


def _bounds(r: float, quadrant: int | None) -> tuple[float, float, float, float]:
    """Range of a centre (x0, x1, y0, y1): inside the border and, for a quadrant, clearly inside it (an edge at
    least GAP from the midlines, so the answer never hangs on a pixel)."""
    lo, hi = r + BORDER, 1 - r - BORDER
    if quadrant is None:
        return lo, hi, lo, hi
    inner = r + GAP
    x0, x1 = (lo, 0.5 - inner) if quadrant % 2 == 0 else (0.5 + inner, hi)
    y0, y1 = (lo, 0.5 - inner) if quadrant // 2 == 0 else (0.5 + inner, hi)
    return x0, x1, y0, y1


def _place(rng: random.Random, radii: Sequence[float], quadrants: Sequence[int | None] | None = None,
           obstacles: Sequence[Disc] = (), tries: int = 100, restarts: int = 20) -> list[tuple[float, float]]:
    """Centres for discs of ``radii``, each in its quadrant (None: anywhere), at least GAP from one another and from
    ``obstacles``: rejection sampling, the whole layout redrawn when a disc finds no room, then a fallback on the
    centres of a 4x4 lattice (0.25 apart, more than two of the largest shifted objects and a gap; each cell centre
    is clearly inside its quadrant)."""
    quadrants = [None] * len(radii) if quadrants is None else quadrants
    bounds = [_bounds(r, q) for r, q in zip(radii, quadrants, strict=True)]
    for _ in range(restarts if tries else 0):
        placed = list(obstacles)
        for r, (x0, x1, y0, y1) in zip(radii, bounds, strict=True):
            for _ in range(tries):
                x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
                if _clear(x, y, r, placed):
                    placed.append((x, y, r))
                    break
            else:
                break
        else:
            return [(x, y) for x, y, _ in placed[len(obstacles):]]
    placed = list(obstacles)
    cells = [((i + 0.5) / 4, (j + 0.5) / 4) for j in range(4) for i in range(4)]
    for r, (x0, x1, y0, y1) in zip(radii, bounds, strict=True):
        free = [(x, y) for x, y in cells if x0 <= x <= x1 and y0 <= y <= y1 and _clear(x, y, r, placed)]
        if not free:
            raise RuntimeError(f"No room for {len(radii)} objects of radii {list(radii)}; lower their number or size.")
        x, y = rng.choice(free)
        placed.append((x, y, r))
    return [(x, y) for x, y, _ in placed[len(obstacles):]]


# ---------------------------------------------------------------------------------------------------------- items
Pair = tuple[int, int]  # (colour, shape) indices


class _Draw:
    """The random choices of one item: which colour x shape pairs are allowed (the held-out ones only in
    test_shift) and the item's size factor."""

    def __init__(self, rng: random.Random, shift: bool) -> None:
        self.rng = rng
        self.shift = shift
        self.scale = rng.choice(SIZE_SHIFT) if shift else 1.0

    def radius(self, bounds: tuple[float, float] = RADIUS) -> float:
        return self.rng.uniform(*bounds) * self.scale

    def pair(self, colours: Sequence[int] | None = None, shapes: Sequence[int] | None = None,
             exclude: Pair | None = None) -> Pair:
        colours = range(len(COLOURS)) if colours is None else colours
        shapes = range(len(SHAPES)) if shapes is None else shapes
        return self.rng.choice([(c, s) for c in colours for s in shapes
                                if (c, s) != exclude and (self.shift or (c, s) not in HELD_OUT_PAIRS)])

    def target(self, colour: int | None = None, shape: int | None = None) -> Pair:
        """The asked pair, of the given colour or shape: in test_shift a held-out pair (with HELD_OUT_SHARE
        probability) when one has that colour or shape."""
        held = [(c, s) for c, s in HELD_OUT_PAIRS if colour in (None, c) and shape in (None, s)]
        if self.shift and held and self.rng.random() < HELD_OUT_SHARE:
            return self.rng.choice(held)
        return self.pair(None if colour is None else [colour], None if shape is None else [shape])

    def objects(self, pairs: Sequence[Pair], asked: Sequence[bool], quadrants: Sequence[int | None] | None = None,
                radii: Sequence[float] | None = None, obstacles: Sequence[Disc] = ()) -> list[Obj]:
        """Objects of ``pairs`` placed with the gap, in random order (nothing may read the target off the list)."""
        radii = [self.radius() for _ in pairs] if radii is None else radii
        centres = _place(self.rng, radii, quadrants, obstacles)
        objects = [Obj(shape=s, colour=c, x=x, y=y, r=r, asked=a)
                   for (c, s), (x, y), r, a in zip(pairs, centres, radii, asked, strict=True)]
        self.rng.shuffle(objects)
        return objects


def _others(count: int, *excluded: int) -> list[int]:
    return [i for i in range(count) if i not in excluded]


def _colour(draw: _Draw) -> tuple[list[Obj], list[Tag], str, str]:
    colour, shape = draw.target(colour=draw.rng.randrange(len(COLOURS)))
    shapes = _others(len(SHAPES), shape)
    count = draw.rng.randint(1, 6)
    # The first distractor has another colour: the answer is never "the colour of every object".
    pairs = [(colour, shape), draw.pair(_others(len(COLOURS), colour), shapes)]
    pairs += [draw.pair(shapes=shapes) for _ in range(count - 1)]
    objects = draw.objects(pairs, [True] + [False] * count)
    return objects, [], QUESTIONS["colour"].format(shape=SHAPE_NAMES[shape]), COLOUR_NAMES[colour]


def _shape(draw: _Draw) -> tuple[list[Obj], list[Tag], str, str]:
    colour, shape = draw.target(shape=draw.rng.randrange(len(SHAPES)))
    colours = _others(len(COLOURS), colour)
    count = draw.rng.randint(1, 6)
    pairs = [(colour, shape), draw.pair(colours, _others(len(SHAPES), shape))]
    pairs += [draw.pair(colours) for _ in range(count - 1)]
    objects = draw.objects(pairs, [True] + [False] * count)
    return objects, [], QUESTIONS["shape"].format(colour=COLOUR_NAMES[colour]), SHAPE_NAMES[shape]


def _exist(draw: _Draw) -> tuple[list[Obj], list[Tag], str, str]:
    yes = draw.rng.random() < 0.5
    colour, shape = draw.target()
    # The total does not depend on the answer, so the number of objects tells nothing.
    total = draw.rng.randint(3, 7)
    partial = [draw.pair([colour], _others(len(SHAPES), shape)), draw.pair(_others(len(COLOURS), colour), [shape])]
    extra = [draw.pair(exclude=(colour, shape)) for _ in range(total - 2 - yes)]
    pairs = [(colour, shape)] * yes + partial + extra
    asked = [True] * yes + [not yes] * 2 + [False] * len(extra)
    question = QUESTIONS["exist"].format(colour=COLOUR_NAMES[colour], shape=SHAPE_NAMES[shape])
    return draw.objects(pairs, asked), [], question, "yes" if yes else "no"


def _position(draw: _Draw) -> tuple[list[Obj], list[Tag], str, str]:
    rng = draw.rng
    quadrant = rng.randrange(len(QUADRANTS))
    colour, shape = draw.target()
    same_colour = [colour], _others(len(SHAPES), shape)
    same_shape = _others(len(COLOURS), colour), [shape]
    # Objects that share the target's colour or shape sit in other quadrants, so neither attribute alone answers;
    # unrelated objects go anywhere, so the target's quadrant is not the emptiest one.
    sharing = [same_colour, same_shape] + [rng.choice((same_colour, same_shape)) for _ in range(rng.randint(0, 2))]
    unrelated = rng.randint(0, 2)
    pairs = [(colour, shape)] + [draw.pair(*s) for s in sharing]
    pairs += [draw.pair(_others(len(COLOURS), colour), _others(len(SHAPES), shape)) for _ in range(unrelated)]
    quadrants = [quadrant] + [rng.choice(_others(len(QUADRANTS), quadrant)) for _ in sharing] + [None] * unrelated
    objects = draw.objects(pairs, [True] + [False] * (len(pairs) - 1), quadrants)
    question = QUESTIONS["position"].format(colour=COLOUR_NAMES[colour], shape=SHAPE_NAMES[shape])
    return objects, [], question, QUADRANTS[quadrant]


def _count(draw: _Draw) -> tuple[list[Obj], list[Tag], str, str]:
    rng = draw.rng
    answer = rng.randrange(len(NUMBERS))
    colour = rng.randrange(len(COLOURS))
    total = rng.randint(max(2, answer + 1), 7)
    pairs = [draw.pair([colour]) for _ in range(answer)]
    pairs += [draw.pair(_others(len(COLOURS), colour)) for _ in range(total - answer)]
    # With none of the colour, the evidence for "zero" is every object's (other) colour.
    asked = [True] * answer + [answer == 0] * (total - answer)
    return draw.objects(pairs, asked), [], QUESTIONS["count"].format(colour=COLOUR_NAMES[colour]), NUMBERS[answer]


def _text(draw: _Draw) -> tuple[list[Obj], list[Tag], str, str]:
    rng = draw.rng
    count = rng.randint(2, 3)
    colours = rng.sample(range(len(COLOURS)), count)
    answer = rng.randrange(len(CHARS))
    chars = [answer] + rng.sample(_others(len(CHARS), answer), count - 1)
    centres = _place(rng, [TAG_RADIUS] * count)
    tags = [Tag(colour, char, x, y, asked=i == 0)
            for i, (colour, char, (x, y)) in enumerate(zip(colours, chars, centres, strict=True))]
    rng.shuffle(tags)
    clutter = rng.randint(1, 4)
    objects = draw.objects([draw.pair() for _ in range(clutter)], [False] * clutter,
                           obstacles=[(x, y, TAG_RADIUS) for x, y in centres])
    return objects, tags, QUESTIONS["text"].format(colour=COLOUR_NAMES[colours[0]]), CHARS[answer].lower()


_IMAGE_BUILDERS = {"colour": _colour, "shape": _shape, "exist": _exist, "position": _position, "count": _count,
                   "text": _text}


def _incontext(draw: _Draw, family: str, shots: int) -> tuple[list[Scene], list[str]]:
    rng = draw.rng
    rule = rng.choice(("colour", "shape"))
    values = COLOUR_NAMES if rule == "colour" else SHAPE_NAMES
    scenes, labels = [], []
    for i in range(shots + 1):
        value = rng.randrange(len(values))
        # The distractors differ from the largest object in the rule's attribute: only the largest one answers.
        if rule == "colour":
            pairs = [draw.pair([value])] + [draw.pair(_others(len(COLOURS), value)) for _ in range(rng.randint(1, 3))]
        else:
            pairs = [draw.pair(shapes=[value])] + [draw.pair(shapes=_others(len(SHAPES), value))
                                                   for _ in range(rng.randint(1, 3))]
        radii = [draw.radius(LARGE_RADIUS)] + [draw.radius(SMALL_RADIUS) for _ in pairs[1:]]
        objects = draw.objects(pairs, [i == shots] + [False] * (len(pairs) - 1), radii=radii)
        scenes.append(_scene(rng, family, objects))
        labels.append(values[value])
    return scenes, labels


def _motion(draw: _Draw, base: Scene) -> tuple[list[Scene], str, str]:
    rng = draw.rng
    direction = rng.randrange(len(DIRECTIONS))
    colour, shape = draw.target()
    r = draw.radius()
    travel = rng.uniform(0.3, 0.45)
    lo, hi = r + BORDER, 1 - r - BORDER
    start, across = rng.uniform(lo, hi - travel), rng.uniform(lo, hi)
    forward = DIRECTIONS[direction] in ("right", "down")
    along = [start + travel * (t if forward else VIDEO_FRAMES - 1 - t) / (VIDEO_FRAMES - 1)
             for t in range(VIDEO_FRAMES)]
    path = [(a, across) if DIRECTIONS[direction] in ("left", "right") else (across, a) for a in along]
    # The first static distractor shares the mover's colour or shape: only both attributes pick the mover.
    sharing = rng.choice((([colour], _others(len(SHAPES), shape)), (_others(len(COLOURS), colour), [shape])))
    pairs = [draw.pair(*sharing)] + [draw.pair(exclude=(colour, shape)) for _ in range(rng.randint(0, 2))]
    static = draw.objects(pairs, [False] * len(pairs), obstacles=[(x, y, r) for x, y in path])
    slot = rng.randrange(len(static) + 1)
    frames = [replace(base, objects=static[:slot] + [Obj(shape, colour, x, y, r, asked=True)] + static[slot:])
              for x, y in path]
    question = QUESTIONS["motion"].format(colour=COLOUR_NAMES[colour], shape=SHAPE_NAMES[shape])
    return frames, question, DIRECTIONS[direction]


def _appear(draw: _Draw, base: Scene) -> tuple[list[Scene], str, str]:
    rng = draw.rng
    shape = rng.randrange(len(SHAPES))
    count = rng.randint(1, 3)
    pairs = [draw.pair(shapes=[shape])] + [draw.pair(shapes=_others(len(SHAPES), shape)) for _ in range(count)]
    objects = draw.objects(pairs, [True] + [False] * count)
    at = rng.randint(2, VIDEO_FRAMES - 3)
    frames = [replace(base, objects=[o for o in objects if t >= at or not o.asked]) for t in range(VIDEO_FRAMES)]
    return frames, QUESTIONS["appear"], SHAPE_NAMES[shape]


def _order(draw: _Draw, base: Scene) -> tuple[list[Scene], str, str]:
    rng = draw.rng
    first = rng.randrange(len(SHAPES))
    second = rng.choice(_others(len(SHAPES), first))
    count = rng.randint(0, 2)
    pairs = [draw.pair(shapes=[first]), draw.pair(shapes=[second])]
    pairs += [draw.pair(shapes=_others(len(SHAPES), first, second)) for _ in range(count)]
    radii = [draw.radius() for _ in pairs]
    centres = _place(rng, radii)
    at = sorted(rng.sample(range(1, VIDEO_FRAMES - 1), 2)) + [0] * count
    objects = [(Obj(s, c, x, y, r, asked=i < 2), t)
               for i, ((c, s), (x, y), r, t) in enumerate(zip(pairs, centres, radii, at, strict=True))]
    rng.shuffle(objects)
    frames = [replace(base, objects=[o for o, since in objects if t >= since]) for t in range(VIDEO_FRAMES)]
    return frames, QUESTIONS["order"], SHAPE_NAMES[first]


_VIDEO_BUILDERS = {"motion": _motion, "appear": _appear, "order": _order}


def _scene(rng: random.Random, family: str, objects: list[Obj], tags: list[Tag] | None = None) -> Scene:
    grey = rng.uniform(0.75, 0.95)
    scene = Scene(objects, tags or [], family, (grey, grey * rng.uniform(0.97, 1.0), grey * rng.uniform(0.93, 1.0)))
    if family == "texture":
        scene.texture = (rng.uniform(8, 30), rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi))
        scene.specks = [(rng.random(), rng.random()) for _ in range(rng.randint(10, 30))]
    elif family == "checker":
        cell = rng.uniform(0.04, 0.15)
        scene.checker = (cell, rng.uniform(0, cell), rng.uniform(0, cell), rng.uniform(0.04, 0.07))
    return scene


def make_item(split: str, category: str, index: int, *, shots: int = 2) -> Item:
    """The item ``index`` of ``category`` in ``split`` (one of SPLITS); deterministic. ``shots``: demonstrations of
    an in-context item."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'. Splits: {list(SPLITS)}.")
    if category not in CATEGORIES:
        raise ValueError(f"Unknown category '{category}'. Categories: {list(CATEGORIES)}.")
    if shots < 1:
        raise ValueError(f"shots must be at least 1 (demonstrations of an in-context item), got {shots}.")
    rng = _seeded(f"{split}/{category}/{index}")
    shift = split == "test_shift"
    family = rng.choice(SHIFT_FAMILIES if shift else FAMILIES)
    draw = _Draw(rng, shift)
    where = {"background": family, "shift": shift, "cluttered": family != "flat"}
    if category in _IMAGE_BUILDERS:
        objects, tags, question, answer = _IMAGE_BUILDERS[category](draw)
        return Item(category, question, answer, [_scene(rng, family, objects, tags)], "image", **where)
    if category == "incontext":
        scenes, labels = _incontext(draw, family, shots)
        return Item(category, QUESTIONS["incontext"], labels[-1], scenes, "multi", demo_answers=labels[:-1], **where)
    frames, question, answer = _VIDEO_BUILDERS[category](draw, _scene(rng, family, []))
    return Item(category, question, answer, frames, "video", **where)


def quadrant_of(x: float, y: float) -> str:
    """The QUADRANTS word of a centre (x, y) in [0, 1]."""
    return QUADRANTS[(2 if y >= 0.5 else 0) + (1 if x >= 0.5 else 0)]


def caption_item(scene: Scene, **where) -> Item:
    """A training "describe" item of one scene: its objects then its tags, in reading order (rows of quadrants,
    then left to right), each object as "colour shape quadrant", each tag as "colour tag character"."""
    def order(thing) -> tuple[int, float, float]:
        return QUADRANTS.index(quadrant_of(thing.x, thing.y)), thing.y, thing.x

    words: list[str] = []
    for obj in sorted(scene.objects, key=order):
        words += [COLOUR_NAMES[obj.colour], SHAPE_NAMES[obj.shape], quadrant_of(obj.x, obj.y)]
    for tag in sorted(scene.tags, key=order):
        words += [COLOUR_NAMES[tag.colour], "tag", CHARS[tag.char].lower()]
    return Item(CAPTION, CAPTION_PROMPT, " ".join(words), [scene], "image", **where)


def caption_stream(seed: int = 0) -> Iterator[Item]:
    """An unbounded stream of caption items over the scenes of the image categories' training items."""
    for item in train_stream(IMAGE_CATEGORIES, seed=seed):
        yield caption_item(item.images[0], background=item.background, cluttered=item.cluttered)


def split_items(split: str, category: str, limit: int | None = None) -> list[Item]:
    """The fixed items of a category: val 200, test 1,000, test_shift 1,000."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"Fixed splits are {list(SPLIT_SIZES)}; use train_stream for training items.")
    count = SPLIT_SIZES[split] if limit is None else min(limit, SPLIT_SIZES[split])
    return [make_item(split, category, i) for i in range(count)]


def train_stream(categories: Sequence[str], seed: int = 0, weights: Sequence[float] | None = None) -> Iterator[Item]:
    """An unbounded stream of training items, each of a category drawn at random (``weights``: relative
    frequencies), so every batch mixes categories. Streams of different seeds use disjoint item indices."""
    categories = tuple(categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if not categories or unknown:
        raise ValueError(f"Unknown or no categories {unknown or list(categories)}. Categories: {list(CATEGORIES)}.")
    if weights is not None and (len(weights) != len(categories) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"weights must be {len(categories)} non-negative numbers, not all zero; got {weights}.")
    return _stream(categories, seed, weights)


def _stream(categories: tuple[str, ...], seed: int, weights: Sequence[float] | None) -> Iterator[Item]:
    rng = _seeded(f"stream/{seed}")
    index = seed * 1_000_000_000
    while True:
        yield make_item("train", rng.choices(categories, weights)[0], index)
        index += 1


score = synth.score  # exact match on the first word, case-insensitive, as in v1


# ------------------------------------------------------------------------------------------------------ rendering
def render(scenes: list[Scene], size: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, 3, size, size) float images in [0, 1], rendered with torch ops (the same on CPU and GPU)."""
    labels, ink = _paint(scenes, size, device)
    palette = torch.tensor(list(COLOURS.values()), device=device)
    colour = labels["colour"]
    # Painted from the final colour map: whatever covers a pixel last gives its colour, as painting in order would.
    image = torch.where((colour > 0)[:, None], palette[(colour - 1).clamp(min=0)].permute(0, 3, 1, 2),
                        _backgrounds(scenes, size, device))
    return torch.where(ink[:, None], GLYPH_INK, image).clamp(0, 1)


def label_maps(scenes: list[Scene], grid: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """(N, grid, grid) long targets at the centres of a grid x grid patch lattice: "colour" (0 = none, 1-6; a tag's
    colour on the tag), "shape" (0 = none, 1-4, 5 = tag), "char" (0 = none, 1-16 on a glyph's box) and "asked" (1 on
    an object or tag the question is about)."""
    labels, _ = _paint(scenes, grid, device)
    return labels


def _lattice(size: int, device) -> tuple[Tensor, Tensor]:
    """(1, size, size) x and y of the pixel centres, in [0, 1]."""
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x[None], y[None]


def _slots(rows: list[list[list[float]]], empty: list[float], device) -> Tensor:
    """(N, K, F) one row per object (or tag, speck) of each scene, padded with ``empty`` up to the most any scene
    has."""
    most = max((len(r) for r in rows), default=0)
    padded = [r + [empty] * (most - len(r)) for r in rows]
    return torch.tensor(padded, device=device, dtype=torch.float32).view(len(rows), most, len(empty))


def _window(cx: Tensor, cy: Tensor, reach: float, size: int) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
    """Index (batch, rows, cols) of a w x w pixel window per scene holding everything within ``reach`` of the
    centre (cx, cy) (N,), and the offsets (N, w, w) of the window's pixel centres from it (the same numbers as on
    the whole lattice). Each slot drawn in its window instead of the whole image: a few percent of the work."""
    n, w = cx.shape[0], min(size, math.ceil(2 * reach * size) + 2)
    steps = torch.arange(w, device=cx.device)
    cols = (torch.floor((cx - reach) * size).long().clamp(0, size - w)[:, None] + steps)[:, None, :]
    rows = (torch.floor((cy - reach) * size).long().clamp(0, size - w)[:, None] + steps)[:, :, None]
    dx = ((cols.float() + 0.5) / size - cx[:, None, None]).expand(n, w, w)
    dy = ((rows.float() + 0.5) / size - cy[:, None, None]).expand(n, w, w)
    return (torch.arange(n, device=cx.device)[:, None, None], rows, cols), dx, dy


def _backgrounds(scenes: list[Scene], size: int, device) -> Tensor:
    """(N, 3, size, size) backgrounds: grey (slightly tinted), plus the grating and specks or the checkerboard."""
    x, y = _lattice(size, device)
    base = torch.tensor([s.background for s in scenes], device=device)[:, :, None, None]  # (N, 3, 1, 1)
    image = base.expand(len(scenes), 3, size, size)
    if any(s.family == "texture" for s in scenes):
        texture = torch.tensor([s.texture for s in scenes], device=device)
        on = torch.tensor([s.family == "texture" for s in scenes], device=device, dtype=torch.float32)
        image = image + 0.08 * on[:, None, None, None] * grating(texture, x, y)[:, None]
    if any(s.family == "checker" for s in scenes):
        cell, px, py, amplitude = (c[:, None, None] for c in torch.tensor(
            [s.checker for s in scenes], device=device).unbind(1))
        parity = (torch.floor((x + px) / cell) + torch.floor((y + py) / cell)) % 2
        image = image + (amplitude * (2 * parity - 1))[:, None]
    specks = _slots([[list(p) for p in s.specks] for s in scenes], [-10.0, -10.0], device)
    hit = torch.zeros(len(scenes), size, size, dtype=torch.bool, device=device)
    for k in range(specks.shape[1]):
        at, dx, dy = _window(specks[:, k, 0], specks[:, k, 1], SPECK_RADIUS, size)
        hit[at] = hit[at] | (dx**2 + dy**2 < SPECK_RADIUS**2)
    return torch.where(hit[:, None], image * 0.55, image)


def _paint(scenes: list[Scene], size: int, device) -> tuple[dict[str, Tensor], Tensor]:
    """Label maps (N, size, size) at pixel centres and the mask of lit glyph pixels, one object or tag slot at a time
    over all scenes (an (N, slots, H, W) tensor would not fit at 448 px), each in its window (``_window``)."""
    n = len(scenes)
    labels = {name: torch.zeros(n, size, size, dtype=torch.long, device=device)
              for name in ("colour", "shape", "char", "asked")}
    ink = torch.zeros(n, size, size, dtype=torch.bool, device=device)

    def paint(at: tuple[Tensor, Tensor, Tensor], mask: Tensor, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            labels[name][at] = torch.where(mask, value if value.dim() == 3 else value[:, None, None], labels[name][at])

    objects = _slots([[[o.shape, o.colour, o.x, o.y, o.r, o.asked] for o in s.objects] for s in scenes],
                     [-1, 0, -10.0, -10.0, 0.0, 0], device)
    for k in range(objects.shape[1]):
        row = objects[:, k]
        shape, colour = row[:, 0].long(), row[:, 1].long()
        # v1's triangle is 1.044 r wide at its base: the window reaches 1.05 r from the centre.
        reach = 1.05 * max(s.objects[k].r for s in scenes if k < len(s.objects))
        at, dx, dy = _window(row[:, 2], row[:, 3], reach, size)
        mask = shape_mask(shape, dx, dy, row[:, 4, None, None])
        paint(at, mask, {"colour": colour + 1, "shape": shape + 1, "char": torch.zeros_like(shape),
                         "asked": row[:, 5].long()})
        ink[at] = ink[at] & ~mask

    tags = _slots([[[t.colour, t.char, t.x, t.y, t.asked] for t in s.tags] for s in scenes],
                  [0, -1, -10.0, -10.0, 0], device)
    font = font_bitmaps(device)
    for k in range(tags.shape[1]):
        colour, char = tags[:, k, :2].long().unbind(1)
        at, dx, dy = _window(tags[:, k, 2], tags[:, k, 3], max(TAG_HALF), size)
        rect = (dx.abs() <= TAG_HALF[0]) & (dy.abs() <= TAG_HALF[1]) & (char >= 0)[:, None, None]
        in_box, lit = glyph_mask(font, char, dx, dy)
        paint(at, rect, {"colour": colour + 1, "shape": torch.full_like(char, len(SHAPES) + 1),
                         "asked": tags[:, k, 4].long(), "char": torch.where(in_box, char[:, None, None] + 1, 0)})
        ink[at] = torch.where(rect, lit, ink[at])
    return labels, ink
