"""`rafale zero-shot MODEL --images DIR --classes "cat,dog"`: classify a folder of images with a CLIP or SigLIP.

MODEL is a rafale run folder (its latest checkpoint) or a Hugging Face model folder (CLIPModel / SiglipModel with
its tokenizer.json). Each class's embedding is the mean of its prompts ("a photo of a {}.", or --templates),
each image goes to the nearest class; one line per image: path, predicted class, probability. When DIR holds
one sub-folder per class named like the classes (as data.zero_shot_source does), the accuracy is printed too.
"""

import argparse
from pathlib import Path

import torch

from rafale.data.image_text import DEFAULT_TEMPLATES, IMAGE_SUFFIXES, encode_texts, normalize, open_image, pad_texts
from rafale.data.tokenizers import special_token_ids
from rafale.errors import RafaleError
from rafale.models.clip import ContrastiveModel, class_embeddings, zero_shot_probabilities
from rafale.models.families import FAMILIES


def load_contrastive(path: Path):
    """(model, tokenizer, eos id, pad id, longest text) of a run folder or a Hugging Face folder."""
    if (path / "config.yaml").is_file():
        from rafale.run_folder import load_run_model

        cfg, data, model = load_run_model(path)
        tokenizer, eos, pad, max_len = data.tokenizer, data.eos_token_id, data.pad_token_id, cfg.data.block_size
    else:
        from rafale.models.hf import from_pretrained, load_tokenizer_from_folder

        model = from_pretrained(path, dtype=torch.float32)
        tokenizer = load_tokenizer_from_folder(path)
        if tokenizer is None:
            raise RafaleError(f"{path} has no tokenizer.json")
        eos, pad = special_token_ids(tokenizer, f"{path}/tokenizer.json")
        max_len = model.cfg.text.max_position_embeddings
    if not isinstance(model, ContrastiveModel):
        raise RafaleError(f"{path} holds a {type(model).__name__}, not a CLIP or SigLIP")
    return model.eval(), tokenizer, eos, pad, max_len


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise RafaleError(f"--images: no such folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RafaleError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


@torch.no_grad()
def classify(model, tokenizer, eos: int, pad: int, max_len: int, files: list[Path], classes: list[str],
             templates: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class ids (N,), their probabilities (N,)) of the images in `files`."""
    fmt = FAMILIES[model.cfg.family].data  # the text length and pixel normalisation it was trained with
    prompts = [t.format(c) for c in classes for t in templates]  # class-major, as class_embeddings expects
    ids = encode_texts(tokenizer, prompts, eos, max_len)
    input_ids, attention_mask = pad_texts(ids, pad, max_len if fmt["fixed_text_length"] else None)
    class_vectors = class_embeddings(model, input_ids, attention_mask, len(templates))
    size = model.cfg.vision.image_size
    predicted, probability = [], []
    for start in range(0, len(files), batch_size):
        pixels = torch.stack([torch.from_numpy(open_image(p, size).copy()) for p in files[start:start + batch_size]])
        pixel_values = normalize(pixels.permute(0, 3, 1, 2), fmt["image_mean"], fmt["image_std"])  # (B, 3, H, W)
        best = zero_shot_probabilities(model, pixel_values, class_vectors).max(dim=-1)
        predicted.append(best.indices)
        probability.append(best.values)
    return torch.cat(predicted), torch.cat(probability)


def zero_shot_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale zero-shot", description=__doc__.split("\n\n")[0],
        epilog='example: rafale zero-shot runs/clip-shapes --images photos/ --classes "red circle,blue star"')
    parser.add_argument("model", help="a rafale run folder or a Hugging Face CLIP/SigLIP folder")
    parser.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--classes", help="comma-separated class names (default: the sub-folders of --images)")
    parser.add_argument("--templates",
                        help=f"'|'-separated prompts with {{}} for the class (default: {DEFAULT_TEMPLATES[0]!r})")
    args = parser.parse_args(argv)
    folder = Path(args.images).expanduser()
    files = image_files(folder)
    class_dirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else [
        c.replace("_", " ") for c in class_dirs]
    if len(classes) < 2:
        raise RafaleError("--classes: give at least two class names (or sub-folders of --images, one per class)")
    templates = args.templates.split("|") if args.templates else list(DEFAULT_TEMPLATES)
    if not all("{}" in t for t in templates):
        raise RafaleError(f"--templates: each needs '{{}}' for the class name, got {templates}")

    model, tokenizer, eos, pad, max_len = load_contrastive(Path(args.model).expanduser())
    predicted, probability = classify(model, tokenizer, eos, pad, max_len, files, classes, templates)
    correct = known = 0
    for path, label, p in zip(files, predicted.tolist(), probability.tolist()):
        print(f"{path}\t{classes[label]}\t{p:.3f}")
        true = path.parent.name.replace("_", " ") if path.parent != folder else None
        if true in classes:
            known += 1
            correct += classes[label] == true
    if known:
        print(f"rafale: zero-shot accuracy {correct}/{known} = {correct / known:.1%} (images in a folder named by "
              f"their class; chance {1 / len(classes):.1%})")
    return 0
