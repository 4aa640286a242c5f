"""What a CLIP or SigLIP run's zero-shot accuracy on the coloured shapes is made of: the colour and the shape.

    python bench/zero_shot_breakdown.py runs/clip-shapes [runs/siglip-shapes ...]

Each run's latest checkpoint classifies the shapes' zero-shot images (the ones its data.num_zero_shot_images,
split_seed and image_size give, written to PNG files and read back as `rafale zero-shot` reads a folder) among all
36 colour-shape classes with its data.prompt_templates. Printed: the accuracy (all images, seen classes, held-out
classes) and how often the predicted class has the right colour, and the right shape. Chance: 1/36 for the
class, 1/6 for the colour or the shape alone; a model that knows only the colour scores 1/6 on the class.
"""

import sys
import tempfile
from pathlib import Path

import torch

from rafale.data import shapes
from rafale.config import load_config
from rafale.commands.zero_shot import classify, load_contrastive


def breakdown(run: Path) -> str:
    cfg = load_config(run / "config.yaml", saved_run=True)
    model, tokenizer, eos, pad, _ = load_contrastive(run)
    pairs = shapes.zero_shot_set(cfg.data.num_zero_shot_images, seed=cfg.data.split_seed,
                                 image_size=cfg.data.image_size)
    templates = cfg.data.prompt_templates or list(shapes.PROMPT_TEMPLATES)
    with tempfile.TemporaryDirectory() as folder:
        files = [Path(folder) / f"{i:05d}.png" for i in range(len(pairs))]
        for (image, _), path in zip(pairs, files):
            image.save(path)
        predicted, _ = classify(model, tokenizer, eos, pad, cfg.data.block_size, files,
                                list(shapes.ZERO_SHOT_CLASSES), templates)
    names = [shapes.ZERO_SHOT_CLASSES[i].split(" ") for i in predicted.tolist()]  # [colour, shape] each
    truth = [shapes.ZERO_SHOT_CLASSES[label].split(" ") for _, label in pairs]
    held = torch.tensor([label in shapes.HELD_OUT_CLASSES for _, label in pairs])
    right = torch.tensor([p == t for p, t in zip(names, truth)], dtype=torch.float)
    colour = torch.tensor([p[0] == t[0] for p, t in zip(names, truth)], dtype=torch.float)
    shape = torch.tensor([p[1] == t[1] for p, t in zip(names, truth)], dtype=torch.float)
    return (f"{run.name}: class {right.mean():.1%} (seen {right[~held].mean():.1%}, held-out {right[held].mean():.1%}; "
            f"chance {1 / 36:.1%}), colour {colour.mean():.1%}, shape {shape.mean():.1%} (held-out: colour "
            f"{colour[held].mean():.1%}, shape {shape[held].mean():.1%}; chance {1 / 6:.1%})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        print(breakdown(Path(path).expanduser()))
