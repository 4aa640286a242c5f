"""Deterministic generator of image-caption pairs: coloured shapes on a plain background.

The machine that trains rafale's models has no internet, so this module is the embedded default data for
CLIP and SigLIP, in the spirit of rafale/data/stories.py. Pillow draws the images; nothing is downloaded.

Design: plan -> image, plan -> caption
--------------------------------------
``sample_plan(rng)`` draws a ``ShapePlan``: a background and one or two groups, each a count (one to three)
of shapes of one size, colour and kind in one quadrant of the image, with every shape's centre already
placed (no two shapes touch, so they can be counted). ``draw(plan, size)`` paints exactly that plan and
``caption(plan)`` reads it out ("two small red triangles at the top left and a large blue circle at the
bottom right, on a grey background"), so a caption is always true to its image. The phrasing is drawn
with the plan, so ``caption`` needs no randomness of its own.

There are len(COLOURS) * len(SHAPES) = 36 colour-shape combinations, two sizes, three counts, four
quadrants, three backgrounds, four phrasings and free positions inside each quadrant: far too many
combinations to memorise from a few thousand pairs.

Held-out combinations
---------------------
``HELD_OUT`` lists six colour-shape pairs (a diagonal of the colour x shape table, so every colour and
every shape is held out exactly once) that ``sample_plan`` never draws: training and validation captions
never bind that colour to that shape, although each word appears in other pairs. ``zero_shot_set`` draws
single-group images of all 36 combinations, held-out ones included, labelled by their index in
``ZERO_SHOT_CLASSES``; zero-shot accuracy on the held-out ones measures composition, not recall. Prompts
are made with ``PROMPT_TEMPLATES`` ("a photo of a {}.").

Determinism
-----------
Pair ``i`` of seed ``s`` comes from ``random.Random(s * 1_000_003 + i)`` (zero-shot images from another
stream), so it depends neither on how many are drawn nor on the process.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SHAPES",
    "HELD_OUT",
    "ZERO_SHOT_CLASSES",
    "HELD_OUT_CLASSES",
    "PROMPT_TEMPLATES",
    "ShapePlan",
    "sample_plan",
    "draw",
    "caption",
    "shape_splits",
    "zero_shot_set",
]

COLOURS = {  # name -> RGB, far apart from each other and from every background
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {"cross": "crosses"}  # the rest take an s
BACKGROUNDS = {"white": (255, 255, 255), "grey": (128, 128, 128), "black": (20, 20, 20)}
SIZES = {"small": 0.065, "large": 0.095}  # radius as a fraction of the image side
QUADRANTS = {  # name -> top-left corner in unit coordinates
    "top left": (0.0, 0.0),
    "top right": (0.5, 0.0),
    "bottom left": (0.0, 0.5),
    "bottom right": (0.5, 0.5),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
MARGIN = 0.015  # between a shape and its quadrant's edge
GAP = 0.035  # at least this much background between two shapes (1.1 pixels at 32 px), so they stay countable

# one colour-shape pair per colour and per shape, never in training: zero-shot accuracy on them is generalisation
HELD_OUT = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "star"),
    ("yellow", "square"),
    ("purple", "cross"),
    ("orange", "diamond"),
)
ZERO_SHOT_CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
HELD_OUT_CLASSES = tuple(ZERO_SHOT_CLASSES.index(f"{colour} {shape}") for colour, shape in HELD_OUT)
PROMPT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "a {}.")

PHRASINGS = ("{}", "{}, on a {} background", "a picture of {}", "an image of {} on a {} background")


@dataclass(frozen=True)
class Group:
    count: int
    size: str  # a key of SIZES
    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    quadrant: str  # a key of QUADRANTS
    centres: tuple  # ((x, y), ...) in unit coordinates, one per shape


@dataclass(frozen=True)
class ShapePlan:
    background: str  # a key of BACKGROUNDS
    groups: tuple  # one or two Groups, in different quadrants, in the order the caption names them
    phrasing: int  # index into PHRASINGS


# --------------------------------------------------------------------------
# Plans


def place(rng: random.Random, count: int, radius: float, quadrant: str) -> tuple:
    """count centres inside the quadrant, no two closer than 2 * radius + GAP. Each centre is retried a
    few times, and the whole group when one does not fit (three large shapes fit, but not everywhere)."""
    x0, y0 = QUADRANTS[quadrant]
    low, high = radius + MARGIN, 0.5 - radius - MARGIN
    while True:
        centres = []
        for _ in range(count * 20):
            c = (x0 + rng.uniform(low, high), y0 + rng.uniform(low, high))
            if all(math.dist(c, other) >= 2 * radius + GAP for other in centres):
                centres.append(c)
                if len(centres) == count:
                    return tuple(centres)


def sample_group(rng: random.Random, quadrant: str, colour: str, shape: str) -> Group:
    count = rng.choice((1, 2, 3))
    size = rng.choice(tuple(SIZES))
    return Group(count, size, colour, shape, quadrant, place(rng, count, SIZES[size], quadrant))


def sample_combo(rng: random.Random) -> tuple[str, str]:
    """A colour-shape pair that is not held out."""
    while True:
        combo = (rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        if combo not in HELD_OUT:
            return combo


def sample_plan(rng: random.Random) -> ShapePlan:
    """A training plan: one or two groups, never a HELD_OUT colour-shape pair."""
    quadrants = rng.sample(tuple(QUADRANTS), rng.choice((1, 2)))
    groups = tuple(sample_group(rng, quadrant, *sample_combo(rng)) for quadrant in quadrants)
    return ShapePlan(rng.choice(tuple(BACKGROUNDS)), groups, rng.randrange(len(PHRASINGS)))


# --------------------------------------------------------------------------
# Drawing


def shape_points(shape: str, cx: float, cy: float, r: float) -> list:
    """The polygon of a shape of radius r centred on (cx, cy), in pixels (circles are drawn apart)."""
    if shape == "square":
        s = r * 0.85  # the same area as the circle, near enough, so size does not tell the shapes apart
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # pointing up
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":  # five points, inner radius 0.45 r
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]  # outer and inner corners in turn
        return [(cx + rad * math.sin(k * math.pi / 5), cy - rad * math.cos(k * math.pi / 5))
                for k, rad in enumerate(radii)]
    if shape == "cross":  # a plus sign with arms 0.36 r thick on each side of the centre line
        a, t = r * 0.95, r * 0.36
        return [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t),
                (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t),
                (cx - a, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def draw(plan: ShapePlan, size: int = 32) -> Image.Image:
    """The plan as a size x size RGB image. Drawn 4x larger and averaged down, so small shapes keep their
    outline (anti-aliased edges) while their insides keep the exact colour."""
    scale = 4
    big = Image.new("RGB", (size * scale, size * scale), BACKGROUNDS[plan.background])
    pen = ImageDraw.Draw(big)
    side = size * scale
    for group in plan.groups:
        r = SIZES[group.size] * side
        fill = COLOURS[group.colour]
        for x, y in group.centres:
            cx, cy = x * side, y * side
            if group.shape == "circle":
                pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                pen.polygon(shape_points(group.shape, cx, cy, r), fill=fill)
    return big.resize((size, size), Image.Resampling.BOX)


# --------------------------------------------------------------------------
# Captions


def describe(group: Group) -> str:
    """'two small red triangles at the top left'."""
    noun = group.shape if group.count == 1 else PLURALS.get(group.shape, group.shape + "s")
    return f"{COUNT_WORDS[group.count]} {group.size} {group.colour} {noun} at the {group.quadrant}"


def caption(plan: ShapePlan) -> str:
    groups = " and ".join(describe(group) for group in plan.groups)
    return PHRASINGS[plan.phrasing].format(groups, plan.background)


# --------------------------------------------------------------------------
# Data sets


def _plan(seed: int, i: int) -> ShapePlan:
    return sample_plan(random.Random(seed * 1_000_003 + i))


def shape_splits(num_train: int, num_val: int, seed: int = 0, image_size: int = 32) -> dict[str, list]:
    """{"train": [(image, caption)], "validation": [...]}: pairs 0..num_train-1, then the next num_val."""
    def pair(i: int):
        plan = _plan(seed, i)
        return draw(plan, image_size), caption(plan)
    return {
        "train": [pair(i) for i in range(num_train)],
        "validation": [pair(i) for i in range(num_train, num_train + num_val)],
    }


def zero_shot_plan(rng: random.Random, colour: str, shape: str) -> ShapePlan:
    """One group of the given colour and shape, in a random quadrant, size, count and background."""
    group = sample_group(rng, rng.choice(tuple(QUADRANTS)), colour, shape)
    return ShapePlan(rng.choice(tuple(BACKGROUNDS)), (group,), 0)


def zero_shot_set(num: int, seed: int = 0, image_size: int = 32) -> list[tuple[Image.Image, int]]:
    """num (image, class index into ZERO_SHOT_CLASSES) pairs, cycling through the classes so each has
    num / 36 images; the held-out classes (HELD_OUT_CLASSES) are among them."""
    out = []
    for i in range(num):
        label = i % len(ZERO_SHOT_CLASSES)
        colour, shape = ZERO_SHOT_CLASSES[label].split(" ")
        # its own stream: the zero-shot images are not the training images of the same seed
        plan = zero_shot_plan(random.Random((seed * 1_000_003 + i) * 7919 + 1), colour, shape)
        out.append((draw(plan, image_size), label))
    return out
