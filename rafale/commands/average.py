"""`rafale average RUN --last K`: the mean of the model weights of a run's last K checkpoints, as an export.

A tail average of checkpoints (modded-nanogpt's, torchtitan's and Megatron's asks) costs no training: the run has
saved the checkpoints already (keep them with training.checkpoints_to_keep: K or -1). Each checkpoint is read with
torch.load(weights_only=True) through rafale/run_folder (read_checkpoint_weights: nothing in it is unpickled beyond
tensors and plain data); the float tensors are averaged in float64 and stored in their own dtype; any other tensor
(an integer buffer) must be the same in every checkpoint. The average is written through the run folder's
export_model, so transformers loads it back and gives the same outputs before it is called done, like every export.
(training.ema is the other weight average: kept while training, see rafale/run/ema.py.)
"""

import argparse
from pathlib import Path

from rafale.errors import RafaleError, WeightsError
from rafale.models.hf import export_refusal
from rafale.run_folder import export_model, load_run_model, read_checkpoint_weights, saved_checkpoints

AVERAGE_DIR = "export-average-last{k}"  # RUN/export-average-last5 by default


def average_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale average", description="Average the model weights of a run's last checkpoints into a Hugging "
        "Face export (checked by transformers like every export).",
        epilog="example: rafale average runs/pythia-tiny-stories --last 2")
    parser.add_argument("path", help="a run folder")
    parser.add_argument("--last", type=int, default=5, help="how many of the newest checkpoints to average (default 5)")
    parser.add_argument("--out", help="output folder (default: RUN/export-average-last<K>)")
    args = parser.parse_args(argv)
    run_dir = Path(args.path).expanduser()
    if not run_dir.is_dir():
        raise RafaleError(f"no such run folder: {run_dir}")
    if args.last < 1:
        raise RafaleError(f"--last: expected at least 1 checkpoint, got {args.last}")
    chosen = last_checkpoints(run_dir, args.last)
    _, data, model = load_run_model(run_dir, chosen[-1])
    refusal = export_refusal(model)
    if refusal is not None:
        raise WeightsError(f"{run_dir}: no Hugging Face export: {refusal}; its checkpoints hold the weights")
    model.load_state_dict(average_weights(chosen), strict=True)
    out = Path(args.out).expanduser() if args.out else run_dir / AVERAGE_DIR.format(k=args.last)
    try:
        out = export_model(model, out, data)
    except WeightsError as err:
        raise WeightsError(f"{run_dir}: no Hugging Face export of the average: {err}") from None
    from rafale.run_folder.checkpoints import batch_number

    batches = ", ".join(str(batch_number(c)) for c in chosen)
    print(f"rafale: averaged the weights of {len(chosen)} checkpoints (batches {batches}) into {out}")
    return 0


def last_checkpoints(run_dir: Path, k: int) -> list[Path]:
    """The newest `k` checkpoints of the run, oldest first; a RafaleError saying how many there are when fewer."""
    saved = saved_checkpoints(run_dir)
    if len(saved) < k:
        training = saved_training(run_dir)
        raise RafaleError(f"{run_dir} has {len(saved)} checkpoint{'' if len(saved) == 1 else 's'}, fewer than --last "
                          f"{k}: it keeps training.checkpoints_to_keep: {training.get('checkpoints_to_keep', '?')} "
                          f"(-1 keeps all), one every training.save_interval: {training.get('save_interval', '?')}")
    return saved[-k:]


def saved_training(run_dir: Path) -> dict:
    """The training section of the run's config.yaml, as written ({} when unreadable: only for a message)."""
    import yaml

    from rafale.run_folder import CONFIG_FILE

    try:
        return (yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}).get("training") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}


def average_weights(checkpoints: list[Path]) -> dict:
    """The element-wise mean of the checkpoints' model tensors (float ones accumulated in float64, then cast back);
    a non-float tensor must be equal in all of them."""
    import torch

    total, first = None, None
    for path in checkpoints:
        weights = read_checkpoint_weights(path)
        if total is None:
            first = weights
            total = {name: t.double() if t.is_floating_point() else t for name, t in weights.items()}
            continue
        if weights.keys() != first.keys():
            raise RafaleError(f"{path} holds other tensors than {checkpoints[0]}: not the same model")
        for name, t in weights.items():
            if t.is_floating_point():
                total[name] += t.double()
            elif not torch.equal(t, first[name]):
                raise RafaleError(f"{path}: {name} (not a float tensor) differs from {checkpoints[0]}'s; "
                                  "it cannot be averaged")
    return {name: (t / len(checkpoints)).to(first[name].dtype) if t.is_floating_point() else t
            for name, t in total.items()}
