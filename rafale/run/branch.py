"""Cooldown branches: the loss at many token budgets from one warmup-stable-decay run.

A WSD run's rate is constant through its stable phase, so its checkpoint at batch S is where any run of the same
setup with a decay starting at S stands too. A branch (`training.branch_from: {run: RUN, at: S}`) starts in its own
run folder from RUN's checkpoint at S, with its whole state (weights, optimizer moments, data order, random
generators), and decays from S to 0 at its own max_duration; one long run then gives the loss at each budget for
the price of its decays (Hägele et al. 2024, "Scaling laws and compute-optimal training beyond fixed training
durations"). `training.cooldowns: [B1, B2, ...]` on the long run trains one branch per budget once it is complete.

How a branch starts: its folder gets a copy of the parent's checkpoint at S, the parent's metrics.jsonl rows up to
S and the parent's summary.json cut at S (each earlier segment marked with the run it ran in), plus
`branched_from: {run, at_batch, at_tokens}`; the branch then resumes from that checkpoint as any interrupted run
does (rafale.run_folder, rafale.run.record), so its record is its whole history. The parent's folder is only read.
"""

import dataclasses
import json
import shutil
from pathlib import Path

from rafale.config import Config, load_config
from rafale.errors import ConfigError
from rafale.run.optim import wsd_batches
from rafale.run.record import cut
from rafale.run_folder.checkpoints import LATEST_CHECKPOINT
from rafale.run_folder import (CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_summary,
                               resume_refusals, write_json)

BRANCH_KEYS = ("training.max_duration", "training.branch_from", "training.cooldowns", "training.decay_fraction",
               "training.decay_shape", "training.schedule")  # what a branch may set otherwise than its parent


def cooldown_name(run_name: str, budget: str) -> str:
    return f"{run_name}-cooldown-{budget}"


def cooldown_config(cfg: Config, run_dir: Path, budget: str) -> Config:
    """The config of the branch of the run in run_dir (trained with cfg) that decays to `budget`."""
    run = dataclasses.replace(cfg.run, name=cooldown_name(cfg.run.name, budget), restart=False)
    training = dataclasses.replace(cfg.training, max_duration=budget, branch_from={"run": str(run_dir)}, cooldowns=[])
    return dataclasses.replace(cfg, run=run, training=training)


def decay_start(cfg: Config, batches_per_epoch: int) -> int:
    return wsd_batches(cfg.training, batches_per_epoch, cfg.data.block_size)[1]


def branch_points(cfg: Config, batches_per_epoch: int) -> list[int]:
    """The batches where the run's cooldowns branch off: where each budget's decay starts."""
    return [decay_start(cooldown_config(cfg, Path("."), budget), batches_per_epoch) for budget in cfg.training.cooldowns]


def checkpoints_at(parent: Path, batch: int) -> list[Path]:
    return sorted((parent / CHECKPOINTS_DIR).glob(f"*-ba{batch}-rank*.pt"))


def check_parent(cfg: Config, data, model_cfg, batches_per_epoch: int) -> tuple[Path, Config, int]:
    """(the parent's folder, its config, the batch the branch starts at), after checking that the branch is the
    parent's run up to that batch: the same config but for BRANCH_KEYS (and what a resume may change), the same
    data, tokenizer and model, a wsd or constant parent still in its stable phase there, and its checkpoint there."""
    parent = Path(cfg.training.branch_from["run"]).expanduser()
    key = "training.branch_from.run"
    if not (parent / CONFIG_FILE).is_file():
        raise ConfigError(key, f"{parent} is not a run folder (no config.yaml)")
    parent_cfg = load_config(parent / CONFIG_FILE, saved_run=True)
    at = decay_start(cfg, batches_per_epoch)
    p = parent_cfg.training
    if p.schedule not in ("wsd", "constant"):
        raise ConfigError(key, f"{parent} trained with schedule {p.schedule!r}; a branch needs a wsd or constant "
                          "parent, whose rate is constant where it branches")
    parent_decay = decay_start(parent_cfg, batches_per_epoch) if p.schedule == "wsd" else float("inf")
    if at > parent_decay:
        raise ConfigError("training.branch_from.at", f"batch {at} is in {parent}'s own decay (from batch "
                          f"{parent_decay}); a branch starts in the stable phase")
    # compare as if the branch had the parent's schedule keys: everything else must be what the parent trained with
    same_schedule = dataclasses.replace(cfg.training, **{k.split(".")[1]: getattr(p, k.split(".")[1])
                                                        for k in BRANCH_KEYS})
    _, refused = resume_refusals(parent, dataclasses.replace(cfg, training=same_schedule), data, model_cfg)
    if refused:
        raise ConfigError(key, f"this branch would not continue {parent}'s run: {'; '.join(refused)}")
    if not checkpoints_at(parent, at):
        kept = sorted({int(f.stem.split("-ba")[1].split("-")[0]) for f in (parent / CHECKPOINTS_DIR).glob("*-ba*-rank*.pt")})
        raise ConfigError("training.branch_from.at", f"{parent} has no checkpoint at batch {at} (it has "
                          f"{', '.join(map(str, kept)) or 'none'}); branch where it saved one (training.save_interval, "
                          "or training.cooldowns on the parent, which saves at each branch point)")
    return parent, parent_cfg, at


def start_branch(cfg: Config, data, model_cfg, run_dir: Path, batches_per_epoch: int) -> None:
    """A new branch's folder: the parent's checkpoint at the branch point, its metrics up to there and its summary
    cut there (see the module's docstring), once the parent is checked. Does nothing for a branch that has
    checkpoints of its own already (a resumed branch resumes from them). With several processes, rank 0 alone
    runs this and the others get its result or its refusal (rafale.run.resilience.decided_on_rank_zero, in
    rafale.run.train.open_run_folder): one process reads the parent's folder and the branch's, so they all act on one reading."""
    if list((run_dir / CHECKPOINTS_DIR).glob("*.pt")):
        return
    parent, _, at = check_parent(cfg, data, model_cfg, batches_per_epoch)
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    for checkpoint in checkpoints_at(parent, at):
        tmp = run_dir / CHECKPOINTS_DIR / (checkpoint.name + ".tmp")
        shutil.copyfile(checkpoint, tmp)
        tmp.replace(run_dir / CHECKPOINTS_DIR / checkpoint.name)
        rank = checkpoint.stem.rsplit("-rank", 1)[1]
        (run_dir / CHECKPOINTS_DIR / LATEST_CHECKPOINT.replace("rank0", f"rank{rank}")).symlink_to(checkpoint.name)  # what a resume loads
    rows = []
    if (parent / METRICS_FILE).is_file():
        for line in (parent / METRICS_FILE).read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= at:
                rows.append(line + "\n")
    (run_dir / METRICS_FILE).write_text("".join(rows))
    summary = read_summary(parent) or {}
    segments = []
    for segment in summary.get("segments", []):
        if segment["batches"][0] >= at:
            continue
        kept = cut(segment, at)
        if segment["batches"][1] > at:
            kept["ended"] = f"branched at batch {at}"
        segments.append({"run": parent.name, **kept})
    at_tokens = round(sum(s["tokens"] for s in segments))
    write_json(run_dir / SUMMARY_FILE, {**summary, "name": run_dir.name, "status": "in progress", "batches": at,
                                        "tokens": at_tokens, "validation": {}, "validation_step": None,
                                        "segments": segments, "export": None,
                                        "branched_from": {"run": str(parent), "at_batch": at, "at_tokens": at_tokens}})
    print(f"rafale: branching {run_dir.name} from {parent} at batch {at}: a {cfg.training.decay_shape} decay to 0 at "
          f"{cfg.training.max_duration}")
