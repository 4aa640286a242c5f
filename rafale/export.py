"""A run's weights in Hugging Face format: written at the end of training, and by `rafale export`.

A run folder holds what is needed to rebuild its model without the data, the pretrained weights or the
directory it was started from: the resolved `config.yaml`, `model.json` (the model's sizes as built), the
`tokenizer.json`, and `data.json` (the data cache's description: vocabulary size, special token ids, class
names). Composer checkpoints are read with `torch.load(weights_only=True)`, allowing only the plain data types
Composer stores beside the tensors, so a checkpoint can never run code.
"""

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer

from rafale.config import Config, build_dataclass, load_config
from rafale.data.cache import PreparedData
from rafale.errors import RafaleError, WeightsError
from rafale.resolve import family_of, head_of, resolve_model_config
from rafale.models.hf import export_refusal, replace_folder, save_pretrained
from rafale.checkpoints import LATEST_CHECKPOINT, batch_number, read_checkpoint  # (rafale.resilience imports Composer)

EXPORT_DIR = "export"
BEST_DIR = "export-best"  # training.keep_best: the weights of the best evaluation
MODEL_FILE = "model.json"  # the nn.Module's config (sizes, vocabulary, padding id) as the run built it


def export_model(model: torch.nn.Module, folder: Path, data: PreparedData) -> Path:
    """Write `model` (the nn.Module, not its Composer wrapper) with the run's tokenizer to `folder`, once
    transformers has loaded it back and computed the same outputs (rafale/export_proof.py).

    The files are written to a hidden folder beside `folder` and checked there; only a proven export is renamed
    into place. A refused one becomes `folder`.refused/ with a REFUSED.txt saying why, any previous `folder` (not
    these weights) is removed, and the ExportRefused says both."""
    from rafale.export_proof import REFUSED_FILE, ExportRefused, prove_export

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.unchecked.", dir=folder.parent))
    try:
        save_pretrained(
            model, staging, tokenizer=data.tokenizer, vocab_size=data.vocab_size, overwrite=True,
            label_names=data.meta.get("label_names"),
        )
        proof = prove_export(model, staging)
    except ExportRefused as err:
        refused = folder.with_name(folder.name + ".refused")
        (staging / REFUSED_FILE).write_text(
            f"rafale refused this export: {err}\nIt is kept to look into, not to use: transformers loads these "
            "files as a model that computes something else than the one rafale trained.\n")
        replace_folder(staging, refused)
        stale = f"; the previous {folder} was removed (not these weights)" if folder.exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        raise ExportRefused(f"{err}; the refused files are in {refused} ({REFUSED_FILE} says why){stale}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, folder)
    print(f"rafale: export checked: {proof.line()}")
    return folder


def say_if_no_export(model: torch.nn.Module) -> str | None:
    """Before training: one line saying why `model` (the nn.Module) will have no Hugging Face export, if it will
    not (a research variant still trains; its checkpoints hold the weights), and the reason; None otherwise. The
    end of the run, which tries the export anyway, says the same."""
    refusal = export_refusal(model)
    if refusal is not None:
        print(f"rafale: no Hugging Face export for this run: {refusal}; the checkpoints will hold the weights")
    return refusal


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint autoresume would load: Composer's latest-rank0.pt link, else the highest batch number."""
    folder = run_dir / "checkpoints"
    if (folder / LATEST_CHECKPOINT).exists():
        return (folder / LATEST_CHECKPOINT).resolve()
    checkpoints = sorted(folder.glob("ep*-ba*-rank0.pt"), key=batch_number) if folder.is_dir() else []
    if not checkpoints:
        raise RafaleError(f"{run_dir}: no checkpoints in {folder}")
    return checkpoints[-1]


def read_checkpoint_weights(path: Path) -> dict:
    """The model's tensors from a Composer checkpoint, named as in the nn.Module (no `model.` prefix)."""
    weights = read_checkpoint(path)["state"]["model"]
    return {k.removeprefix("model."): v for k, v in weights.items()}


def write_model_file(model: torch.nn.Module, run_dir: Path) -> None:
    """Save the built model's config, so the run's model can be rebuilt from its folder alone."""
    path = run_dir / MODEL_FILE  # written whole or not at all: another process may read it
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    tmp.replace(path)


def run_model_config(run_dir: Path, cfg: Config):
    """The model config a run was built with: its model.json, or (folders written before it) resolved again."""
    if not (run_dir / MODEL_FILE).is_file():
        return resolve_model_config(cfg)
    return build_dataclass(family_of(cfg).config, json.loads((run_dir / MODEL_FILE).read_text()), "model.")


def load_run_model(run_dir: Path, checkpoint: Path | None = None):
    """(config, data description, nn.Module with the checkpoint's weights) of a run folder.

    Needs only the folder: the saved config is read without looking for its data, tokenizer or pretrained files
    (they may have moved, be relative to another directory, or be on the hub while offline)."""
    for name in ("config.yaml", "tokenizer.json", "data.json"):
        if not (run_dir / name).is_file():
            raise RafaleError(f"{run_dir} is not a rafale run folder: it has no {name}")
    cfg: Config = load_config(run_dir / "config.yaml", saved_run=True)
    data = PreparedData(
        splits=None,
        tokenizer=Tokenizer.from_file(str(run_dir / "tokenizer.json")),
        path=run_dir,
        meta=json.loads((run_dir / "data.json").read_text()),
    )
    model_cfg, family = run_model_config(run_dir, cfg), family_of(cfg)
    # built without model.pretrained's weights: the checkpoint has all of them. model.json has the sizes as built,
    # so the bare module is built directly; without Composer, whose import takes longer than the rest of a command
    if (run_dir / MODEL_FILE).is_file() and family.hf is not None:
        module = family.hf.module(model_cfg, head_of(cfg))
    else:  # a folder from before model.json: the Composer model's build resolves the sizes from data.json
        module = family.build(model_cfg, head_of(cfg), data.meta, data.tokenizer).model
    module.load_state_dict(read_checkpoint_weights(checkpoint or latest_checkpoint(run_dir)), strict=True)
    return cfg, data, module.eval()


def export_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="rafale export", description="Write a run's checkpoint in Hugging Face format.",
                                     epilog="example: rafale export runs/pythia-tiny-stories --out pythia-hf")
    parser.add_argument("path", help="a run folder (its latest checkpoint) or a checkpoint file in one")
    parser.add_argument("--out", help="output folder (default: RUN/export)")
    args = parser.parse_args(argv)
    path = Path(args.path).expanduser()
    if path.is_file():
        run_dir, checkpoint = path.parent.parent, path
    elif path.is_dir():
        run_dir, checkpoint = path, None
    else:
        raise RafaleError(f"no such run folder or checkpoint: {path}")
    _, data, model = load_run_model(run_dir, checkpoint)
    refusal = export_refusal(model)
    if refusal is not None:  # the reason the run gave before it trained
        raise WeightsError(f"{run_dir}: no Hugging Face export: {refusal}; its checkpoints hold the weights")
    try:
        out = export_model(model, Path(args.out).expanduser() if args.out else run_dir / EXPORT_DIR, data)
    except WeightsError as err:  # the same reason the end of the run gave
        raise WeightsError(f"{run_dir}: no Hugging Face export: {err}; its checkpoints hold the weights") from None
    print(f"rafale: exported {checkpoint or latest_checkpoint(run_dir)} to {out}")
    return 0
