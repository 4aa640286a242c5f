"""`rafale export RUN`: a run's weights in Hugging Face format (the end of training writes RUN/export itself).

The run is read back through rafale/run_folder/__init__.py (load_run_model: its config.yaml, model.json, tokenizer.json,
data.json and the checkpoint's weights, read with torch.load(weights_only=True), so a checkpoint can never run code).
"""

import argparse
from pathlib import Path

from rafale.errors import RafaleError, WeightsError
from rafale.models.hf import export_refusal
from rafale.run_folder import EXPORT_DIR, export_model, latest_checkpoint, load_run_model


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
    cfg, data, model = load_run_model(run_dir, checkpoint)
    refusal = export_refusal(model)
    if refusal is not None:  # the reason the run gave before it trained
        raise WeightsError(f"{run_dir}: no Hugging Face export: {refusal}; its checkpoints hold the weights")
    try:
        out = export_model(model, Path(args.out).expanduser() if args.out else run_dir / EXPORT_DIR, data,
                           cfg.data.document_mask)
    except WeightsError as err:  # the same reason the end of the run gave
        raise WeightsError(f"{run_dir}: no Hugging Face export: {err}; its checkpoints hold the weights") from None
    print(f"rafale: exported {checkpoint or latest_checkpoint(run_dir)} to {out}")
    return 0
