"""The run folder before training: set aside on run.restart, checked as shared by every node, checked against what a
resume would change (rafale.record.resume_changes), written (config.yaml, tokenizer.json, data.json, model.json),
and the checkpoint the run resumes from, the same on every process.
"""

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
from composer.utils import dist

from rafale.config import Config, save_config
from rafale.data.cache import PreparedData
from rafale.errors import ConfigError
from rafale.export import latest_checkpoint, write_model_file
from rafale.record import ResumeConflict, read_summary, reached, resume_changes, write_json
from rafale.resilience import batch_number, check_resume_checkpoint


def set_run_folder_aside(run_dir: Path) -> None:
    """run.restart: keep the old run folder as NAME.old-<time> and start with an empty one."""
    if not run_dir.exists():
        return
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        run_dir.rename(aside)
    except OSError as err:
        raise ConfigError("run.restart", f"cannot set the run folder {run_dir} aside as {aside}: {err}") from None
    print(f"rafale: restarting {run_dir.name}; the previous run folder is now {aside}")


def check_run_folder(cfg: Config, data: PreparedData, model, run_dir: Path, save: bool) -> tuple[dict, dict | None]:
    """Before anything in RUN is written: check what a resume of its checkpoints would change
    (rafale.record.resume_changes: a ResumeConflict for anything it may not). Returns (the config changes a resume
    applies, the run's summary when it is already complete under this config, else None)."""
    previous = read_summary(run_dir)
    if not save or not list(run_dir.glob("checkpoints/*.pt")):
        if save and previous is not None and previous.get("status") == "complete":
            raise ResumeConflict(f"{run_dir} holds a complete run (its summary.json) but no checkpoint to resume "
                                 "from; train it again with --restart (the old folder is kept as "
                                 f"{run_dir.name}.old-<time>) or use a new run.name")
        return {}, None
    changes = resume_changes(run_dir, cfg, data, model.model.cfg)
    complete = (previous is not None and previous.get("status") == "complete"
                and batch_number(latest_checkpoint(run_dir)) >= previous["batches"]  # its checkpoints reach its end
                and (reached(cfg.training.max_duration, previous) or "early_stopped" in previous))
    return changes, previous if complete else None


def check_shared_run_folder(run_dir: Path) -> None:
    """Several processes train one run: they must all see one run folder. Rank 0 writes a marker file there and
    every process looks for it; one that cannot see it is on a node with a disk of its own, where a resume would
    find no checkpoint (they are on node 0's disk) and silently start over. Every process then stops with the
    same error. (Also the first collective of the run: the process group starts here, before the Trainer.)"""
    import secrets

    dist.initialize_dist("gpu" if torch.cuda.is_available() else "cpu")
    token = [secrets.token_hex(8) if dist.get_global_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = run_dir / f".shared-by-every-node-{token[0]}"
    if dist.get_global_rank() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(token[0])
        except OSError:
            pass  # the run folder's own error comes from write_run_folder, on every process
    dist.barrier()
    seen = dist.all_gather_object((marker.is_file(), os.environ.get("NODE_RANK", "0"), dist.get_global_rank()))
    dist.barrier()
    if dist.get_global_rank() == 0:
        marker.unlink(missing_ok=True)
    blind = sorted({f"node {node} (rank {rank})" for sees, node, rank in seen if not sees})
    if blind:
        raise ConfigError("run.output_dir", f"{run_dir} is not shared by every node: {', '.join(blind)} cannot see "
                          "what rank 0 writes there (a disk of its own?). Resuming needs a run.output_dir on a disk "
                          "every node shares (a cluster's /scratch or /project), where node 0's checkpoints are")


def write_run_folder(cfg: Config, data: PreparedData, model, run_dir: Path) -> None:
    """What rebuilds the model without the data: the resolved config, the tokenizer, the data's description and
    the model's sizes (and a classifier's class names)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("run.output_dir", f"cannot create the run folder {run_dir}: {err}") from None
    if dist.get_global_rank() != 0:
        return
    # restart is what this command did, not a setting of the run: rerunning config.yaml must resume it
    save_config(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, restart=False)), run_dir / "config.yaml")
    shutil.copyfile(data.path / "tokenizer.json", run_dir / "tokenizer.json")
    write_json(run_dir / "data.json", data.meta)  # to rebuild the model without the data
    write_model_file(model.model, run_dir)  # ... and without model.pretrained
    if "label_names" in data.meta:  # class id -> name, for whoever reads the predictions
        write_json(run_dir / "labels.json", data.meta["label_names"])


def resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint of run_dir/checkpoints this run resumes from (None: a fresh start), the same on every process.

    Rank 0 picks the latest one and checks it (rafale.resilience.check_resume_checkpoint: readable, nothing to
    unpickle but Composer's plain types, run.resume_fallback), then hands its path to every process, which load it
    as Composer's load_path. Composer's own autoresume is not used: on a run folder that several nodes share it
    crashes, because it names the signal file each node's first process writes and removes after node 0 on every
    node (llm-foundry issues 417 and 1736, Composer PR 2363 still open), so the nodes remove each other's file.
    Loading the same checkpoint through load_path restores exactly what autoresume would."""
    chosen = None
    if dist.get_global_rank() == 0:
        chosen = check_resume_checkpoint(run_dir / "checkpoints", cfg.run.resume_fallback, cfg.training.trust_checkpoint)
    if dist.get_world_size() > 1:
        shared = [str(chosen) if chosen is not None else None]
        dist.broadcast_object_list(shared, src=0)
        chosen = Path(shared[0]) if shared[0] is not None else None
    return chosen
