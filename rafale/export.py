"""A run's weights in Hugging Face format: written at the end of training, and by `rafale export`.

A run folder holds what is needed to rebuild its model without the data: the resolved `config.yaml`, the
`tokenizer.json`, and `data.json` (the data cache's description: vocabulary size, special token ids, class
names). Composer checkpoints are read with `torch.load(weights_only=True)`, allowing only the plain data types
Composer stores beside the tensors, so a checkpoint can never run code.
"""

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from rafale.config import Config, RafaleError, load_config, resolve_model_config
from rafale.datapipes import PreparedData
from rafale.models.hf import save_pretrained

EXPORT_DIR = "export"
# what a Composer checkpoint holds besides tensors: timings, the torch version, numpy RNG states
CHECKPOINT_SAFE_GLOBALS = [
    datetime.timedelta,
    torch.torch_version.TorchVersion,
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
]


def export_model(model: torch.nn.Module, folder: Path, data: PreparedData) -> Path:
    """Write `model` (the nn.Module, not its Composer wrapper) with the run's tokenizer to `folder`."""
    save_pretrained(
        model, folder, tokenizer=data.tokenizer, vocab_size=data.vocab_size, overwrite=True,
        label_names=data.meta.get("label_names"),
    )
    return folder


def latest_checkpoint(run_dir: Path) -> Path:
    folder = run_dir / "checkpoints"
    checkpoints = sorted(folder.glob("ep*-ba*-rank0.pt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not checkpoints:
        raise RafaleError(f"{run_dir}: no checkpoints in {folder}")
    return checkpoints[-1]


def read_checkpoint_weights(path: Path) -> dict:
    """The model's tensors from a Composer checkpoint, named as in the nn.Module (no `model.` prefix)."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
        weights = state["state"]["model"]
    except Exception as err:  # a truncated file raises one of several types
        raise RafaleError(f"{path}: not a readable Composer checkpoint ({type(err).__name__}: {err})") from None
    return {k.removeprefix("model."): v for k, v in weights.items()}


def load_run_model(run_dir: Path, checkpoint: Path | None = None):
    """(config, data description, nn.Module with the checkpoint's weights) of a run folder."""
    from rafale.main import model_config_dict

    for name in ("config.yaml", "tokenizer.json", "data.json"):
        if not (run_dir / name).is_file():
            raise RafaleError(f"{run_dir} is not a rafale run folder: it has no {name}")
    cfg: Config = load_config(run_dir / "config.yaml")
    data = PreparedData(
        splits=None,
        tokenizer=Tokenizer.from_file(str(run_dir / "tokenizer.json")),
        path=run_dir,
        meta=json.loads((run_dir / "data.json").read_text()),
    )
    model_cfg = resolve_model_config(cfg)
    cfg.model.pretrained = None  # the checkpoint has all the weights
    composer_model, _ = model_config_dict[cfg.model.type](model_cfg, data, cfg)
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    composer_model.model.load_state_dict(read_checkpoint_weights(checkpoint), strict=True)
    return cfg, data, composer_model.model.eval()


def export_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="rafale export", description="Write a run's checkpoint in Hugging Face format.")
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
    out = export_model(model, Path(args.out).expanduser() if args.out else run_dir / EXPORT_DIR, data)
    print(f"rafale: exported {checkpoint or latest_checkpoint(run_dir)} to {out}")
    return 0
