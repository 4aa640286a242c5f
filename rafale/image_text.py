"""Image-text pairs for CLIP and SigLIP: the datapipe, its collator, and the image and text preprocessing that
training, evaluation and `rafale zero-shot` share.

Sources (data.source):
    shapes                    the embedded coloured-shapes generator (rafale/shapes.py), with its zero-shot set
    captions.jsonl / .csv     a captions file: one row per pair, data.image_column (a path relative to the file)
                              and data.text_column; a folder holding captions.jsonl or captions.csv works too
    hf:<name>                 a hub image-text dataset (online only): data.image_column holds images
Zero-shot classification (every evaluation) uses the shapes' 36 colour-shape classes, or data.zero_shot_source:
a folder with one sub-folder of images per class (the folder name is the class name, '_' read as a space).

What is cached (the same fingerprinted, atomic cache as the text datapipes): each image resized (shorter side)
and centre-cropped to data.image_size, stored as uint8 (H, W, 3) in the Arrow dataset (3 bytes a pixel, 12 KB a
64 px image), and each caption's token ids ending with the end-of-text token, at most data.block_size of them.
Per batch, the collator applies the light training augmentation, converts to float with the family's
normalisation constants, and pads the texts: CLIP to the longest with an attention mask; SigLIP always to
data.block_size without a mask, as its published checkpoints were trained (its text is pooled at the last
position, so padding changes the embedding: one way, used everywhere).
"""

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Array3D, Dataset, DatasetDict, Features, Sequence, Value, concatenate_datasets
from PIL import Image
from tokenizers import Tokenizer
from torchvision.transforms import v2

from rafale.config import Config, ConfigError, DataConfig
from rafale.datapipes import PIPELINE_VERSION, DataError, DataPipe, PreparedData, _file_identity, tokenizer_identity

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
# per-channel mean and std of the pixels in [0, 1]: OpenAI CLIP's (from its training set), and SigLIP's (to [-1, 1])
NORMALIZATION = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
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


def normalize(pixels: torch.Tensor, family: str) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) with the family's normalisation constants."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[family])
    return (pixels.float() / 255 - mean) / std


# ----------------------------------------------------------------------------------------------------
# texts


def encode_texts(tokenizer: Tokenizer, texts: list[str], eos_token_id: int, max_len: int) -> list[list[int]]:
    """Token ids of each text, ending with the end-of-text token (CLIP pools there), at most max_len of them.
    The tokenizer's own special tokens are kept (an HF CLIP tokenizer adds its start and end tokens)."""
    out = []
    for encoding in tokenizer.encode_batch(list(texts)):
        ids = encoding.ids
        if not ids or ids[-1] != eos_token_id:
            ids = ids + [eos_token_id]
        if len(ids) > max_len:
            ids = ids[: max_len - 1] + [eos_token_id]
        out.append(ids)
    return out


def pad_texts(sequences: list, pad_token_id: int, fixed_length: int | None):
    """input_ids (B, T) right-padded, and attention_mask (B, T), or None with fixed_length (SigLIP: every text
    padded to fixed_length, no mask)."""
    T = fixed_length or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.as_tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return input_ids, None if fixed_length else attention_mask


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


# ----------------------------------------------------------------------------------------------------
# the datapipe


class ImageTextDataPipe(DataPipe):
    """Contrastive image-text pairs: uint8 images and token ids, plus a `zero_shot` split of labelled images."""

    name = "contrastive"

    def __init__(self, cfg: DataConfig, family: str = "clip", num_proc: int = 0):
        super().__init__(cfg, num_proc)
        self.family = family

    def fingerprint_inputs(self) -> dict:
        cfg = self.cfg
        if cfg.source == "shapes":
            generator = Path(__file__).with_name("shapes.py").read_bytes()
            source = ["shapes", cfg.num_train_images, cfg.num_val_images, cfg.num_zero_shot_images,
                      hashlib.sha256(generator).hexdigest()]
        elif cfg.source.startswith("hf:"):
            source = [cfg.source, cfg.hub_config]
        else:  # the captions file's folder: the file and the images it names
            path = Path(cfg.source).expanduser()
            source = _file_identity(path if path.is_dir() else path.parent)
        zero_shot = None if cfg.zero_shot_source is None else _file_identity(Path(cfg.zero_shot_source).expanduser())
        return {
            "pipeline": [self.name, PIPELINE_VERSION],
            "source": [source, cfg.image_column, cfg.text_column, cfg.val_fraction, cfg.split_seed],
            "tokenizer": tokenizer_identity(cfg, self.tokenizer_kind),
            "block_size": cfg.block_size,
            "images": [cfg.image_size, zero_shot, cfg.prompt_templates],
        }

    def load_raw(self) -> DatasetDict:
        """The captions as a DatasetDict of texts (what the tokenizer trains on); the images wait in self.images."""
        cfg = self.cfg
        pairs = shapes_pairs(cfg) if cfg.source == "shapes" else hub_pairs(cfg) if cfg.source.startswith("hf:") \
            else local_pairs(cfg)
        self.images = {split: images for split, (_, images) in pairs.items()}
        return DatasetDict({split: Dataset.from_dict({"text": texts}) for split, (texts, _) in pairs.items()})

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        size, eos = self.cfg.image_size, meta["eos_token_id"]
        out = {}
        for split, ds in raw.items():
            ids = encode_texts(tokenizer, ds["text"], eos, self.cfg.block_size)
            features = pixel_features(size, input_ids=Sequence(Value("int32")))
            out[split] = images_dataset(self.images[split], {"input_ids": ids}, features, size)
        zero_shot = zero_shot_source(self.cfg)
        if zero_shot is not None:
            features = pixel_features(size, label=Value("int64"))
            labels = {"label": zero_shot.pop("labels")}
            out["zero_shot"] = images_dataset(zero_shot.pop("images"), labels, features, size)
            meta["zero_shot"] = zero_shot
        meta["image_size"] = size
        return DatasetDict(out)

    def _describe(self, ds: Dataset) -> dict:
        info = {"examples": len(ds), "images": len(ds), "image_size": self.cfg.image_size,
                "image_bytes": len(ds) * self.cfg.image_size ** 2 * 3}
        if "input_ids" in ds.column_names:
            info["tokens"] = len(ds.data.column("input_ids").combine_chunks().flatten())
        return info


def describe_images(split: str, info: dict) -> str:
    """DATA=1's line for a split of images."""
    text = f", {info['tokens']:,} caption tokens" if "tokens" in info else ""
    return (f"rafale:   {split}: {info['images']:,} images of {info['image_size']}x{info['image_size']} "
            f"({info['image_bytes'] / 1e6:.1f} MB as uint8){text}")


# ----------------------------------------------------------------------------------------------------
# batches


AUGMENTATION = v2.RandomResizedCrop  # a mild zoom and shift; no flips or colour changes, which captions describe


@dataclass
class ImageTextCollator:
    """Stack images (augmented when training) into pixel_values (B, 3, H, W), normalised for the family, and pad
    the texts: input_ids (B, T) with attention_mask (CLIP), or to text_length without a mask (SigLIP)."""

    family: str
    pad_token_id: int
    text_length: int | None = None
    augment: bool = False
    fixed_seed: int | None = None  # DEBUG=1: no augmentation, so the batch holds still

    def __post_init__(self):
        self.crop = None

    def __call__(self, examples: list[dict]) -> dict:
        # datasets hands uint8 columns over as int64 tensors; the crop wants uint8
        pixels = torch.stack([torch.as_tensor(e["pixel_values"]).to(torch.uint8) for e in examples])  # (B, H, W, 3)
        pixels = pixels.permute(0, 3, 1, 2)  # (B, 3, H, W)
        if self.augment and self.fixed_seed is None:
            if self.crop is None:
                self.crop = AUGMENTATION(pixels.shape[-1], scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True)
            pixels = torch.stack([self.crop(p) for p in pixels])  # a different crop per image
        input_ids, attention_mask = pad_texts([e["input_ids"] for e in examples], self.pad_token_id, self.text_length)
        batch = {"pixel_values": normalize(pixels, self.family), "input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        return batch


def text_length(family: str, block_size: int) -> int | None:
    """SigLIP's fixed text length (no mask); None for CLIP (pad to the longest, with a mask)."""
    return block_size if family == "siglip" else None


# ----------------------------------------------------------------------------------------------------
# the model builder (rafale.main.model_config_dict)


def build_contrastive(model_cfg, data: PreparedData, cfg: Config):
    """A CLIP or SigLIP model and its collator; the model takes its vocabulary, image size and end-of-text token
    from the data (unless it is pretrained, when they must agree)."""
    from rafale.models.clip import build_model
    from rafale.models.composer_clip import ComposerContrastive, ZeroShotSet
    from rafale.main import model_vocab_size, with_pretrained

    meta = data.meta
    family = model_cfg.family
    model_cfg.text.vocab_size = model_vocab_size(model_cfg.text.vocab_size, data)
    image_size = meta.get("image_size", cfg.data.image_size)
    if cfg.model.pretrained is not None and model_cfg.vision.image_size != image_size:
        raise DataError(f"data.image_size ({image_size}) differs from the pretrained model's image size "
                        f"({model_cfg.vision.image_size}); set data.image_size: {model_cfg.vision.image_size}")
    model_cfg.vision.image_size = image_size
    if family == "clip" and cfg.model.pretrained is None:
        if meta["eos_token_id"] == 2:  # transformers reads a CLIP eos_token_id of 2 as "pool at the highest id"
            raise DataError("data.tokenizer: its end-of-text id is 2, which an exported CLIP cannot express "
                            "(transformers pools at the highest id then); use a tokenizer with another id")
        model_cfg.text.eos_token_id = meta["eos_token_id"]
    try:
        model_cfg.validate()
    except ValueError as err:
        raise ConfigError("data.image_size" if "image_size" in str(err) else "model", str(err)) from None
    model = with_pretrained(build_model(model_cfg), cfg)
    zero_shot = None
    if data.splits is not None and "zero_shot" in data.splits and "zero_shot" in meta:
        info = meta["zero_shot"]
        prompts = [t.format(c) for c in info["classes"] for t in info["templates"]]  # class-major
        prompt_ids = encode_texts(data.tokenizer, prompts, meta["eos_token_id"], cfg.data.block_size)
        images = data.splits["zero_shot"][:]  # the whole split, as tensors
        zero_shot = ZeroShotSet(
            pixels=images["pixel_values"].to(torch.uint8).permute(0, 3, 1, 2),  # (N, 3, H, W)
            normalization=NORMALIZATION[family],
            labels=images["label"],
            prompts=pad_texts(prompt_ids, meta["pad_token_id"], text_length(family, cfg.data.block_size)),
            num_templates=len(info["templates"]),
            held_out=info["held_out"],
        )
    collator = ImageTextCollator(family, meta["pad_token_id"], text_length(family, cfg.data.block_size),
                                 augment=cfg.data.augment)
    return ComposerContrastive(model, zero_shot), collator
