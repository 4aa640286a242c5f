"""Tests for the shapes image-caption generator (rafale/data/shapes.py): determinism, captions true to the pixels,
held-out colour-shape pairs kept out of training and present in the zero-shot set."""

import random
import re

import numpy as np

from rafale.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    HELD_OUT_CLASSES,
    PROMPT_TEMPLATES,
    QUADRANTS,
    SHAPES,
    ZERO_SHOT_CLASSES,
    caption,
    draw,
    sample_plan,
    shape_splits,
    zero_shot_set,
)

SIZE = 64  # large enough that the gaps between shapes survive the downsampling
COUNTS = {"a": 1, "two": 2, "three": 3}
CLAIM = re.compile(
    r"(a|two|three) (small|large) (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")(?:e?s)? at the ("
    + "|".join(QUADRANTS) + r")"
)


def near(pixels: np.ndarray, rgb, tolerance: float = 40.0) -> np.ndarray:
    """(H, W) bool: pixels within `tolerance` of the colour (the insides of shapes keep it exactly)."""
    return np.linalg.norm(pixels.astype(float) - np.array(rgb, dtype=float), axis=-1) < tolerance


def components(mask: np.ndarray) -> list[int]:
    """Sizes of the 8-connected regions of a boolean mask (a small flood fill: the images are 64 x 64)."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, n = True, [start], 0
        while stack:
            y, x = stack.pop()
            n += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                        seen[q] = True
                        stack.append(q)
        sizes.append(n)
    return sizes


def quadrant_pixels(pixels: np.ndarray, quadrant: str) -> np.ndarray:
    x0, y0 = QUADRANTS[quadrant]
    half = SIZE // 2
    return pixels[int(y0 * SIZE) : int(y0 * SIZE) + half, int(x0 * SIZE) : int(x0 * SIZE) + half]


def test_deterministic_for_a_seed():
    a = shape_splits(6, 3, seed=5, image_size=32)
    b = shape_splits(6, 3, seed=5, image_size=32)
    for split in ("train", "validation"):
        assert [c for _, c in a[split]] == [c for _, c in b[split]]
        assert [im.tobytes() for im, _ in a[split]] == [im.tobytes() for im, _ in b[split]]
    other = shape_splits(6, 0, seed=6, image_size=32)
    assert [c for _, c in other["train"]] != [c for _, c in a["train"]]
    # a pair does not depend on how many are drawn: the first 6 of 9 are the 6
    longer = shape_splits(9, 0, seed=5, image_size=32)["train"]
    assert [c for _, c in longer[:6]] == [c for _, c in a["train"]]
    assert a["train"][0][0].size == (32, 32) and a["train"][0][0].mode == "RGB"


def test_captions_are_true_to_the_pixels():
    """Read each caption's claims back and check them against the image alone: in the named quadrant, as many
    separate blobs of the named colour as the count word says, large ones bigger than small ones of their kind; nothing
    coloured in the quadrants the caption does not name; the named background in the corner."""
    rng = random.Random(0)
    blob_sizes = {(shape, size): [] for shape in SHAPES for size in ("small", "large")}
    for _ in range(120):
        plan = sample_plan(rng)
        text = caption(plan)
        pixels = np.asarray(draw(plan, SIZE))
        claims = CLAIM.findall(text)
        assert len(claims) == len(plan.groups), text
        for count_word, size, colour, shape, quadrant in claims:
            blobs = components(near(quadrant_pixels(pixels, quadrant), COLOURS[colour]))
            assert len(blobs) == COUNTS[count_word], (text, blobs)
            blob_sizes[shape, size] += blobs
        for quadrant in set(QUADRANTS) - {claim[4] for claim in claims}:
            for rgb in COLOURS.values():
                assert not near(quadrant_pixels(pixels, quadrant), rgb).any(), (text, quadrant)
        background = next(name for name in BACKGROUNDS if re.search(rf"\b{name} background", text)) \
            if "background" in text else plan.background
        assert tuple(pixels[0, 0]) == BACKGROUNDS[background], text
    for shape in SHAPES:  # pixel areas: every large shape is bigger than every small one of its kind
        assert max(blob_sizes[shape, "small"]) < min(blob_sizes[shape, "large"]), shape


def test_held_out_pairs_never_in_training_but_in_the_zero_shot_set():
    data = shape_splits(1500, 300, seed=0, image_size=8)  # tiny images: only the captions matter here
    captions = [c for split in data.values() for _, c in split]
    for colour, shape in HELD_OUT:
        assert not any(f"{colour} {shape}" in c for c in captions), (colour, shape)
    # ...while every colour and every shape on its own is in training
    words = set(" ".join(captions).split())
    assert set(COLOURS) <= words and all(shape in words or shape + "s" in words for shape in SHAPES)

    assert len(ZERO_SHOT_CLASSES) == len(COLOURS) * len(SHAPES) == 36
    assert sorted(ZERO_SHOT_CLASSES[i] for i in HELD_OUT_CLASSES) == sorted(f"{c} {s}" for c, s in HELD_OUT)
    assert PROMPT_TEMPLATES[0].format(ZERO_SHOT_CLASSES[0]) == "a photo of a red circle."
    zero_shot = zero_shot_set(72, seed=0, image_size=SIZE)
    labels = [label for _, label in zero_shot]
    assert sorted(set(labels)) == list(range(36)) and labels.count(HELD_OUT_CLASSES[0]) == 2
    for image, label in zero_shot:  # each image shows its class's colour, and no other
        pixels = np.asarray(image)
        colour = ZERO_SHOT_CLASSES[label].split()[0]
        assert near(pixels, COLOURS[colour]).any()
        assert not any(near(pixels, rgb).any() for name, rgb in COLOURS.items() if name != colour)


def test_enough_variety_to_defeat_memorising():
    captions = [c for _, c in shape_splits(1000, 0, seed=1, image_size=8)["train"]]
    assert len(set(captions)) > 900
