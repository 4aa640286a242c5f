"""Contrastive image-text pairs for CLIP and SigLIP: the sources, the image conversion, the text and pixel
preprocessing, the datapipe that caches them and the collator that makes their batches. `rafale zero-shot` reads
images and tokenizes prompts with the same functions.

Sources (data.source):
    shapes                    the embedded coloured-shapes generator (rafale/data/shapes.py), with its zero-shot set
    captions.jsonl / .csv     a captions file: one row per pair, data.image_column (a path relative to the file)
                              and data.text_column; a folder holding captions.jsonl or captions.csv works too
    hf:<name>                 a hub image-text dataset (online only): data.image_column holds images
Zero-shot classification (every evaluation) uses the shapes' 36 colour-shape classes, or data.zero_shot_source:
a folder with one sub-folder of images per class (the folder name is the class name, '_' read as a space).

Each image is resized (shorter side) and centre-cropped to data.image_size and stored as uint8 (H, W, 3) in the
Arrow dataset (3 bytes a pixel, 12 KB a 64 px image). What differs between CLIP and SigLIP is given to the
datapipe as plain values (the family's `data`, rafale/models/contrastive.py): the pixels' per-channel mean and std, and
whether every text is padded to block_size without a mask (SigLIP, `fixed_text_length`) or to the batch's
longest with one (CLIP). The collator applies them per batch; the zero-shot prompts are tokenized and padded
once, into the cache's meta, with the mean and std, for the model's zero-shot evaluation.
"""

import csv
import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Array3D, Dataset, DatasetDict, Features, Sequence, Value, concatenate_datasets
from PIL import Image
from tokenizers import Tokenizer

from rafale.config import DataConfig
from rafale.data.cache import LABEL_FIELDS, PIPELINE_VERSION, DataPipe
from rafale.data.sources import file_identity
from rafale.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CHUNK = 1000  # images converted and stored per step, so a large folder is never all in memory as PIL images
# 2: the zero-shot prompts tokenized and padded into the meta, which records the text length and the pixel
# normalisation; both are fingerprint inputs (CLIP and SigLIP no longer share a cache)
IMAGE_TEXT_VERSION = 2


# ----------------------------------------------------------------------------------------------------
# images


def square_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image resized (shorter side to `size`, bicubic) and centre-cropped: uint8 (size, size, 3)."""
    from torchvision.transforms import v2  # (seconds to import: only where images are converted)

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
    from rafale.data.shapes import shape_splits

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
        from rafale.data.shapes import HELD_OUT_CLASSES, PROMPT_TEMPLATES, ZERO_SHOT_CLASSES, zero_shot_set

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


# ----------------------------------------------------------------------------------------------------
# texts and pixels as the model takes them (what HF's CLIPProcessor does)


def normalize(pixels, mean, std):
    """uint8 (B, 3, H, W) -> float (B, 3, H, W): in [0, 1], less the per-channel `mean`, over the per-channel `std`."""
    mean, std = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (mean, std))
    return (pixels.float() / 255 - mean) / std


def encode_texts(tokenizer, texts: list, eos_token_id: int, max_len: int) -> list:
    """Token ids of each text (a `tokenizers.Tokenizer`), ending with the end-of-text token (CLIP pools there), at
    most max_len of them. The tokenizer's own special tokens are kept (an HF CLIP tokenizer adds its start and end)."""
    out = []
    for encoding in tokenizer.encode_batch(list(texts)):
        ids = encoding.ids
        if not ids or ids[-1] != eos_token_id:
            ids = ids + [eos_token_id]
        if len(ids) > max_len:
            ids = ids[: max_len - 1] + [eos_token_id]
        out.append(ids)
    return out


def pad_texts(sequences: list, pad_token_id: int, fixed_length: int | None = None):
    """(input_ids (B, T) right-padded, attention_mask (B, T)), the mask None with fixed_length (SigLIP: every text
    padded to it, no mask, as its checkpoints were trained: it pools the last position, so padding changes the
    embedding); without it (CLIP), padded to the longest."""
    T = fixed_length or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.as_tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return input_ids, None if fixed_length else attention_mask


# ----------------------------------------------------------------------------------------------------
# the datapipe and its collator


class ImageTextDataPipe(DataPipe):
    """Contrastive image-text pairs: uint8 images (H, W, 3) and caption ids ending with the end-of-text token (at
    most block_size), plus a `zero_shot` split of labelled images whose classes, prompts and the prompts' padded
    ids go in the meta.

    Takes, besides the data section, tokenizer_kind and num_proc (as every datapipe):
        fixed_text_length  True: every text padded to block_size, no attention mask (SigLIP); False: to the
                           batch's longest, with a mask (CLIP)
        image_mean, image_std  the per-channel mean and std (3 numbers each) the pixels in [0, 1] are normalised by
    """

    name = "contrastive"
    head = "contrastive"
    # augment is the collator's (a fresh crop each batch); the others are never read here
    not_in_cache = LABEL_FIELDS | {"mlm_probability", "doc_separator", "augment"}

    def __init__(self, cfg: DataConfig, tokenizer_kind: str | None = None, num_proc: int = 0, *,
                 fixed_text_length: bool, image_mean, image_std):
        super().__init__(cfg, tokenizer_kind, num_proc)
        self.text_length = cfg.block_size if fixed_text_length else None
        self.image_mean, self.image_std = [float(v) for v in image_mean], [float(v) for v in image_std]

    def source_identity(self) -> list:
        """The source's files: the shapes generator, a hub name, or the captions file's folder (the file and the
        images it names); and the zero-shot folder's."""
        cfg = self.cfg
        if cfg.source == "shapes":
            generator = (Path(__file__).parent / "shapes.py").read_bytes()
            source = ["shapes", cfg.num_train_images, cfg.num_val_images, cfg.num_zero_shot_images,
                      hashlib.sha256(generator).hexdigest()]
        elif cfg.source.startswith("hf:"):
            source = [cfg.source, cfg.hub_config]
        else:  # the captions file's folder: the file and the images it names
            path = Path(cfg.source).expanduser()
            source = file_identity(path if path.is_dir() else path.parent)
        zero_shot = None if cfg.zero_shot_source is None else file_identity(Path(cfg.zero_shot_source).expanduser())
        return [source, zero_shot]

    def fingerprint_inputs(self) -> dict:
        return super().fingerprint_inputs() | {  # and what the model side says of its inputs, which the meta records
            "pipeline": [self.name, PIPELINE_VERSION, IMAGE_TEXT_VERSION],
            "model_inputs": [self.text_length, self.image_mean, self.image_std],
        }

    def load_raw(self) -> DatasetDict:
        """The captions as a DatasetDict of texts (what the tokenizer trains on); the images wait in self.images."""
        cfg = self.cfg
        pairs = shapes_pairs(cfg) if cfg.source == "shapes" else hub_pairs(cfg) if cfg.source.startswith("hf:") \
            else local_pairs(cfg)
        self.images = {split: images for split, (_, images) in pairs.items()}
        return DatasetDict({split: Dataset.from_dict({"text": texts}) for split, (texts, _) in pairs.items()})

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        size = self.cfg.image_size
        out = {}
        for split, ds in raw.items():
            ids = encode_texts(tokenizer, ds["text"], meta["eos_token_id"], self.cfg.block_size)
            features = pixel_features(size, input_ids=Sequence(Value("int32")))
            out[split] = images_dataset(self.images[split], {"input_ids": ids}, features, size)
        zero_shot = zero_shot_source(self.cfg)
        if zero_shot is not None:  # {classes, templates, held_out, input_ids, attention_mask} go in the meta
            features = pixel_features(size, label=Value("int64"))
            labels = {"label": zero_shot.pop("labels")}
            out["zero_shot"] = images_dataset(zero_shot.pop("images"), labels, features, size)
            meta["zero_shot"] = zero_shot | self.prompt_ids(zero_shot, tokenizer, meta)
        meta |= {"image_size": size, "text_length": self.text_length, "image_mean": self.image_mean,
                 "image_std": self.image_std}
        return DatasetDict(out)

    def prompt_ids(self, zero_shot: dict, tokenizer: Tokenizer, meta: dict) -> dict:
        """The zero-shot prompts (each class's templates, class-major) as the model's text tower takes them:
        {input_ids: (C*K, T) as lists, attention_mask: the same, or None with a fixed text length}."""
        prompts = [t.format(c) for c in zero_shot["classes"] for t in zero_shot["templates"]]
        ids = encode_texts(tokenizer, prompts, meta["eos_token_id"], self.cfg.block_size)
        input_ids, attention_mask = pad_texts(ids, meta["pad_token_id"], self.text_length)
        return {"input_ids": input_ids.tolist(),
                "attention_mask": None if attention_mask is None else attention_mask.tolist()}

    def _describe(self, ds: Dataset) -> dict:
        info = {"examples": len(ds), "images": len(ds), "image_size": self.cfg.image_size,
                "image_bytes": len(ds) * self.cfg.image_size ** 2 * 3}
        if "input_ids" in ds.column_names:
            info["tokens"] = len(ds.data.column("input_ids").combine_chunks().flatten())
        return info

    def collator(self, meta: dict):
        return ImageTextCollator(meta["pad_token_id"], self.image_mean, self.image_std, self.text_length,
                                 augment=self.cfg.augment)


@dataclass
class ImageTextCollator:
    """Stack images (augmented when training) into pixel_values (B, 3, H, W), normalised by image_mean and
    image_std, and pad the texts: input_ids (B, T) with attention_mask, or to text_length without a mask."""

    pad_token_id: int
    image_mean: tuple  # per channel, of the pixels in [0, 1]
    image_std: tuple
    text_length: int | None = None
    augment: bool = False  # a random mild crop of each image (no flips or colour changes, which captions describe)
    fixed_seed: int | None = None  # DEBUG=1 sets it: no augmentation, so the batch holds still

    def for_evaluation(self) -> "ImageTextCollator":
        return replace(self, augment=False)

    def __call__(self, examples: list[dict]) -> dict:
        # datasets hands uint8 columns over as int64 tensors; the crop wants uint8
        pixels = torch.stack([torch.as_tensor(e["pixel_values"]).to(torch.uint8) for e in examples])  # (B, H, W, 3)
        pixels = pixels.permute(0, 3, 1, 2)  # (B, 3, H, W)
        if self.augment and self.fixed_seed is None:
            from torchvision.transforms import v2

            crop = v2.RandomResizedCrop(pixels.shape[-1], scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True)
            pixels = torch.stack([crop(p) for p in pixels])  # a different crop per image
        input_ids, attention_mask = pad_texts([e["input_ids"] for e in examples], self.pad_token_id, self.text_length)
        batch = {"pixel_values": normalize(pixels, self.image_mean, self.image_std), "input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        return batch
