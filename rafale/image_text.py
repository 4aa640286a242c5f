"""Images and captions for CLIP and SigLIP: the image-text sources and the image conversion that the image-text
datapipe (rafale.datapipes.ImageTextDataPipe) caches, and that `rafale zero-shot` reads images with.

Sources (data.source):
    shapes                    the embedded coloured-shapes generator (rafale/shapes.py), with its zero-shot set
    captions.jsonl / .csv     a captions file: one row per pair, data.image_column (a path relative to the file)
                              and data.text_column; a folder holding captions.jsonl or captions.csv works too
    hf:<name>                 a hub image-text dataset (online only): data.image_column holds images
Zero-shot classification (every evaluation) uses the shapes' 36 colour-shape classes, or data.zero_shot_source:
a folder with one sub-folder of images per class (the folder name is the class name, '_' read as a space).

Each image is resized (shorter side) and centre-cropped to data.image_size and stored as uint8 (H, W, 3) in the
Arrow dataset (3 bytes a pixel, 12 KB a 64 px image). Normalisation and text padding are the model family's
(rafale/models/clip.py), applied per batch by the collator.
"""

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Array3D, Dataset, DatasetDict, Features, concatenate_datasets
from PIL import Image
from torchvision.transforms import v2

from rafale.config import DataConfig
from rafale.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CHUNK = 1000  # images converted and stored per step, so a large folder is never all in memory as PIL images


# ----------------------------------------------------------------------------------------------------
# images


def square_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image resized (shorter side to `size`, bicubic) and centre-cropped: uint8 (size, size, 3)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = v2.CenterCrop(size)(v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(image))
    return np.asarray(image, dtype=np.uint8)


def open_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return square_image(image, size)
    except (OSError, ValueError) as err:
        raise DataError(f"data.source: cannot read image {path}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# sources: each gives {split: (texts, images)}, images as PIL images or paths


def shapes_pairs(cfg: DataConfig) -> dict:
    from rafale.shapes import shape_splits

    splits = shape_splits(cfg.num_train_images, cfg.num_val_images, seed=cfg.split_seed, image_size=cfg.image_size)
    return {split: ([c for _, c in pairs], [im for im, _ in pairs]) for split, pairs in splits.items()}


def captions_file(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / name for name in CAPTION_FILES if (path / name).is_file()]
        if not found:
            raise DataError(f"data.source: the folder {path} holds no {' or '.join(CAPTION_FILES)}")
        return found[0]
    if path.suffix not in (".jsonl", ".csv"):
        raise DataError(f"data.source: {path}: an image-text source is a .jsonl or .csv captions file, 'shapes' "
                        "or hf:<name>")
    return path


def read_captions(path: Path, cfg: DataConfig) -> tuple[list[str], list[Path]]:
    """(texts, image paths) of a captions file; a missing column, image or text names the file and row."""
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix == ".csv":
            rows = list(csv.DictReader(f))
        else:
            rows = []
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise DataError(f"data.source: line {number} of {path} is not JSON: {err}") from None
    texts, images = [], []
    for row_number, row in enumerate(rows):
        for key, column in (("data.image_column", cfg.image_column), ("data.text_column", cfg.text_column)):
            if not isinstance(row.get(column), str) or not row[column].strip():
                raise DataError(f"{key}: row {row_number} of {path} has no '{column}' (a non-empty string)")
        image = path.parent / row[cfg.image_column]
        if not image.is_file():
            raise DataError(f"data.image_column: row {row_number} of {path} names {image}, which does not exist")
        texts.append(row[cfg.text_column])
        images.append(image)
    if len(texts) < 2:
        raise DataError(f"data.source: {path} holds {len(texts)} pairs; need at least 2 to split")
    return texts, images


def local_pairs(cfg: DataConfig) -> dict:
    texts, images = read_captions(captions_file(cfg.source), cfg)
    order = list(range(len(texts)))
    random.Random(cfg.split_seed).shuffle(order)
    num_val = max(1, round(len(order) * cfg.val_fraction))
    picks = {"train": sorted(order[num_val:]), "validation": sorted(order[:num_val])}
    return {split: ([texts[i] for i in idx], [images[i] for i in idx]) for split, idx in picks.items()}


def hub_pairs(cfg: DataConfig) -> dict:  # online only; not exercised by the tests
    from datasets import load_dataset

    try:
        loaded = load_dataset(cfg.source[3:], cfg.hub_config)
    except Exception as err:  # the hub raises many types; all mean the same to a user
        raise DataError(f"data.source: could not load hub dataset '{cfg.source[3:]}' (needs internet): {err}") from None
    if "validation" not in loaded:
        loaded = loaded["train"].train_test_split(test_size=cfg.val_fraction, seed=cfg.split_seed)
        loaded = DatasetDict({"train": loaded["train"], "validation": loaded["test"]})
    out = {}
    for split in ("train", "validation"):
        ds = loaded[split]
        for key, column in (("data.image_column", cfg.image_column), ("data.text_column", cfg.text_column)):
            if column not in ds.column_names:
                raise DataError(f"{key}: no column '{column}' in {cfg.source}; columns: {ds.column_names}")
        out[split] = (list(ds[cfg.text_column]), HubImages(ds, cfg.image_column))
    return out


@dataclass
class HubImages:
    """A hub split's image column, decoded a slice at a time (images_dataset reads CHUNK of them per step)."""

    ds: Dataset
    column: str

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, rows: slice):
        return self.ds[rows][self.column]


def zero_shot_source(cfg: DataConfig) -> dict | None:
    """{"classes", "templates", "held_out", "labels", "images"} for zero-shot evaluation, or None."""
    if cfg.zero_shot_source is not None:
        folder = Path(cfg.zero_shot_source).expanduser()
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if len(class_dirs) < 2:
            raise DataError(f"data.zero_shot_source: {folder} must hold one folder of images per class (at least 2)")
        labels, images = [], []
        for label, class_dir in enumerate(class_dirs):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            labels += [label] * len(files)
            images += files
        classes = [p.name.replace("_", " ") for p in class_dirs]
        templates = cfg.prompt_templates or DEFAULT_TEMPLATES
        return dict(classes=classes, templates=list(templates), held_out=[], labels=labels, images=images)
    if cfg.source == "shapes":
        from rafale.shapes import HELD_OUT_CLASSES, PROMPT_TEMPLATES, ZERO_SHOT_CLASSES, zero_shot_set

        pairs = zero_shot_set(cfg.num_zero_shot_images, seed=cfg.split_seed, image_size=cfg.image_size)
        return dict(classes=list(ZERO_SHOT_CLASSES), templates=list(cfg.prompt_templates or PROMPT_TEMPLATES),
                    held_out=list(HELD_OUT_CLASSES), labels=[y for _, y in pairs], images=[im for im, _ in pairs])
    return None


def as_array(image, size: int) -> np.ndarray:
    return open_image(image, size) if isinstance(image, Path) else square_image(image, size)


def pixel_features(size: int, **columns) -> Features:
    return Features({"pixel_values": Array3D((size, size, 3), "uint8"), **columns})


def images_dataset(images, columns: dict, features: Features, size: int) -> Dataset:
    """A Dataset of uint8 images and the given columns, converted CHUNK images at a time."""
    parts = []
    for start in range(0, len(images), CHUNK):
        pixels = [as_array(im, size) for im in images[start:start + CHUNK]]
        part = {name: values[start:start + CHUNK] for name, values in columns.items()}
        parts.append(Dataset.from_dict({"pixel_values": pixels, **part}, features=features))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
