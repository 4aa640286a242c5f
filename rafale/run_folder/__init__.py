"""The run folder, RUN = run.output_dir/run.name: its files, how a run is read back, the resume guard, and what the
run writes there before training. The run writes its folder through here; every command reads a run through here.

    config.yaml tokenizer.json data.json model.json (labels.json)   rebuild the model without the data
    summary.json metrics.jsonl metrics.png    the record (rafale.run.record, rafale.run.loggers.MetricsFile, rafale.run_folder.plots)
    checkpoints/   ep<epoch>-ba<batch>-rank<rank>.pt and latest-rank0.pt, read with weights_only (rafale.run_folder.checkpoints)
    export/ export-best/   the Hugging Face export at the end of training, and training.keep_best's (export.refused/
                           when transformers computes it otherwise)
    evals/<time>/          each training.eval_only evaluation's own config.yaml, summary.json and metrics.jsonl

The resume guard (`resume_changes`) decides key by key what a resumed run may change: the keys in
APPLIED_ON_RESUME apply from the batch it resumes at, and the new segment lists them; anything else that differs
refuses the resume, naming the key: the data's content (a digest of every cached split) and its tokenizer,
model.type, model.task, model.pretrained and every field of the model as built (model.json), the optimizer and
its schedule (training.lr, weight_decay, optimizer, warmup, ...), the batch size, the seed.

Loading this module imports neither torch, Composer nor the models (the functions that need them do), so
`rafale runs` and `rafale plot` answer at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from rafale.config import Config, build_dataclass, is_local_source, load_config, parse_time, save_config, to_dict
from rafale.errors import ConfigError, RafaleError

if TYPE_CHECKING:
    import torch

    from rafale.data.cache import PreparedData

CONFIG_FILE = "config.yaml"  # the run's resolved config, written by rafale.config.save_config
TOKENIZER_FILE = "tokenizer.json"
DATA_FILE = "data.json"
LABELS_FILE = "labels.json"
MODEL_FILE = "model.json"  # the nn.Module's config (sizes, vocabulary, padding id) as the run built it
SUMMARY_FILE = "summary.json"  # written by rafale.run.record.RunRecord (a training run) or write_eval_record
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
BEST_DIR = "export-best"  # training.keep_best: the weights of the best evaluation
REFUSED_SUFFIX = ".refused"  # an export transformers computes otherwise, kept to look into
REFUSED_FILE = "REFUSED.txt"
EVALS_DIR = "evals"
VAL_LOSSES = ("metrics/eval/LanguageCrossEntropy", "metrics/eval/CrossEntropy", "metrics/eval/ContrastiveLoss")

# Config keys a resumed run may change. Each applies from the batch the run resumes at: a longer max_duration
# trains further (a cosine schedule then stretches to the new end from there), the intervals, loggers and the
# way batches are computed (device, precision, microbatches, compile, activation checkpointing) change how the
# rest runs. The segment that starts there lists them in summary.json.
APPLIED_ON_RESUME = {
    "run.device", "run.autoresume", "run.resume_fallback", "run.restart", "run.loggers", "run.wandb_project",
    "data.num_proc", "data.num_workers", "data.cache_dir",
    "training.max_duration", "training.eval_interval", "training.eval_batches", "training.save_interval",
    "training.checkpoints_to_keep", "training.log_interval", "training.compile", "training.activation_checkpointing",
    "training.microbatch_size", "training.precision", "training.trust_checkpoint", "training.fsdp",
    "training.keep_best", "training.early_stopping", "training.cooldowns",
}
# data keys the collators read while training; every other data key is judged by the cache it builds (its
# content digest and tokenizer), so a moved file or another spelling of the same data still resumes
DATA_READ_WHILE_TRAINING = {"data.mlm_probability", "data.augment", "data.document_mask"}
# model keys compared by value; the model's fields are compared as built (model.json), whatever preset or
# overrides gave them
MODEL_KEYS = {"model.type", "model.task", "model.pretrained"}
# where the run folder is: a folder moved or copied elsewhere is the same run
WHERE_KEYS = {"run.name", "run.output_dir"}


class ResumeConflict(RafaleError):
    pass


# ----------------------------------------------------------------------------------------------------
# where things are, and reading a run back


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint autoresume would load: Composer's latest-rank0.pt link, else the highest batch number."""
    from rafale.run_folder.checkpoints import LATEST_CHECKPOINT, batch_number  # torch

    folder = run_dir / CHECKPOINTS_DIR
    if (folder / LATEST_CHECKPOINT).exists():
        return (folder / LATEST_CHECKPOINT).resolve()
    checkpoints = sorted(folder.glob("ep*-ba*-rank0.pt"), key=batch_number) if folder.is_dir() else []
    if not checkpoints:
        raise RafaleError(f"{run_dir}: no checkpoints in {folder}")
    return checkpoints[-1]


def saved_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints (rank 0's files), oldest first by batch; links and files set aside are left out."""
    from rafale.run_folder.checkpoints import batch_number  # torch

    folder = run_dir / CHECKPOINTS_DIR
    found = [p for p in folder.glob("ep*-ba*-rank0.pt") if not p.is_symlink()] if folder.is_dir() else []
    return sorted(found, key=batch_number)


def eval_folder(run_dir: Path) -> Path:
    """RUN/evals/<time>/ for a training.eval_only run: never the training run's own files."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = run_dir / EVALS_DIR / stamp, 1
    while folder.exists():
        n += 1
        folder = run_dir / EVALS_DIR / f"{stamp}-{n}"
    return folder


def read_summary(folder: Path) -> dict | None:
    path = Path(folder) / SUMMARY_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None  # cut short by a crash while it was written (it is written to a temporary name first)


def saved_config(run_dir: Path) -> Config | None:
    path = run_dir / CONFIG_FILE
    return load_config(path, saved_run=True) if path.is_file() else None


def read_config(run_dir: Path) -> dict | None:
    """The run's config.yaml as dotted keys ('training.lr' -> 0.003), or None for a run folder without one."""
    path = Path(run_dir) / CONFIG_FILE
    return flatten(yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'training': {'optimizer': {'name': 'soap'}}} -> {'training.optimizer.name': 'soap'}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def metrics_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl ({"step": 120, name: value, ...}), in file order: the one reader of the file
    (the tables, the plots, the resume's compaction). A line cut short when a process was killed mid-write is
    skipped (a resume compacts the file, so it is never followed by more rows)."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)], sorted by step; a resumed run's repeated steps keep their last value."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RafaleError(f"{run_dir}: no {METRICS_FILE} (is it a rafale run folder?)")
    series: dict[str, dict[int, float]] = {}
    for row in metrics_rows(path):
        step = row.pop("step")
        for name, value in row.items():
            series.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in series.items()}


def evaluations(run_dir: Path, up_to: int, label: str = "eval") -> list[tuple[int, dict[str, float]]]:
    """(step, {metric: value}) of each evaluation in RUN/metrics.jsonl up to and including batch `up_to`, in file
    order: what a run resumed at that batch still has of its evaluations (a resume onto a checkpoint older than the
    record's latest evaluation, with run.resume_fallback or in a cooldown branch, takes its figures from these).
    `label`: the evaluator's, "eval", or "eval_ema" for training.ema's evaluation of the EMA weights."""
    path, prefix = Path(run_dir) / METRICS_FILE, f"metrics/{label}/"
    found = [(row["step"], {name.removeprefix(prefix): value for name, value in row.items()
                            if name.startswith(prefix)})
             for row in (metrics_rows(path) if path.is_file() else []) if row["step"] <= up_to]
    return [(step, metrics) for step, metrics in found if metrics]


def best_validation(run_dir: Path) -> tuple[str, float, int] | None:
    """(metric, best value, step) of the run's validation loss (lowest), or accuracy (highest) if no loss."""
    if not (Path(run_dir) / METRICS_FILE).is_file():
        return None
    series = read_metrics(run_dir)
    for name in VAL_LOSSES + ("metrics/eval/Accuracy", "metrics/eval/MaskedAccuracy"):
        if series.get(name):
            pick = min if "Accuracy" not in name else max
            step, value = pick(series[name], key=lambda point: point[1])
            return name.rsplit("/", 1)[-1], value, step
    return None


# data keys that say how the data was prepared, not what it is; the tokenizer's, which bits per byte does not see
NOT_THE_DATA = {"data.num_proc", "data.num_workers", "data.cache_dir"}
TOKENIZER_KEYS = {"data.tokenizer", "data.vocab_size"}


def data_identity(run_dir: Path, with_tokenizer: bool = True) -> dict:
    """What must be the same in runs whose figures compare: the task, the data (config.yaml's data section, but for
    how it was prepared) and, `with_tokenizer`, the tokenizer (tokenizer.json's digest and the keys that choose
    it; bits per byte is comparable without them). (rafale law and rafale compare
    both ask it.)"""
    config = read_config(run_dir) or {}
    ignored = NOT_THE_DATA | (set() if with_tokenizer else TOKENIZER_KEYS)
    identity = {"task": (read_summary(run_dir) or {}).get("task") or config.get("model.task")}
    identity |= {key: value for key, value in config.items() if key.startswith("data.") and key not in ignored}
    if with_tokenizer:
        tokenizer = Path(run_dir) / TOKENIZER_FILE
        identity["tokenizer"] = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:12] if tokenizer.is_file() else None
    return identity


def read_checkpoint_weights(path: Path) -> dict:
    """The model's tensors from a Composer checkpoint, named as in the nn.Module (no `model.` prefix)."""
    from rafale.run_folder.checkpoints import read_checkpoint  # torch

    weights = read_checkpoint(path)["state"]["model"]
    return {k.removeprefix("model."): v for k, v in weights.items()}


def run_model_config(run_dir: Path, cfg: Config):
    """The model config a run was built with: its model.json, or (folders written before it) resolved again."""
    from rafale.resolve import family_of, resolve_model_config  # torch: the model files

    if not (run_dir / MODEL_FILE).is_file():
        return resolve_model_config(cfg)
    return build_dataclass(family_of(cfg).config, json.loads((run_dir / MODEL_FILE).read_text()), "model.")


def load_run_model(run_dir: Path, checkpoint: Path | None = None):
    """(config, data description, nn.Module with the checkpoint's weights) of a run folder.

    Needs only the folder: the saved config is read without looking for its data, tokenizer or pretrained files
    (they may have moved, be relative to another directory, or be on the hub while offline)."""
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData
    from rafale.resolve import family_of, head_of

    for name in (CONFIG_FILE, TOKENIZER_FILE, DATA_FILE):
        if not (run_dir / name).is_file():
            raise RafaleError(f"{run_dir} is not a rafale run folder: it has no {name}")
    cfg: Config = load_config(run_dir / CONFIG_FILE, saved_run=True)
    data = PreparedData(
        splits=None,
        tokenizer=Tokenizer.from_file(str(run_dir / TOKENIZER_FILE)),
        path=run_dir,
        meta=json.loads((run_dir / DATA_FILE).read_text()),
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


# ----------------------------------------------------------------------------------------------------
# the resume guard


def flat_config(cfg: Config) -> dict:
    """'section.key' -> value, as config.yaml spells it (tuples as lists)."""
    sections = json.loads(json.dumps(to_dict(cfg)))
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def config_differences(old: Config, new: Config, whole_model: bool = False) -> dict[str, list]:
    """key -> [was, now] for every config key whose value differs; the model's fields (preset, overrides) only
    with whole_model, since a resume compares them as built (model.json)."""
    before, after = flat_config(old), flat_config(new)
    keys = sorted(before.keys() | after.keys())
    return {key: [before.get(key), after.get(key)] for key in keys
            if before.get(key) != after.get(key) and key not in WHERE_KEYS
            and (whole_model or not key.startswith("model.") or key in MODEL_KEYS)}


def differences_not_applied_on_resume(old: Config, new: Config) -> list[str]:
    """'key was X, now Y' for each difference a resume would not apply, every data key compared by value (what
    `rafale sweep` checks before it runs anything, when the data is not prepared yet)."""
    differences = config_differences(old, new, whole_model=True)
    return [f"{key} was {_short(was)}, now {_short(now)}" for key, (was, now) in differences.items()
            if key not in APPLIED_ON_RESUME]


def resume_changes(run_dir: Path, cfg: Config, data, model_cfg) -> dict[str, list]:
    """The config changes a resume of `run_dir` applies (key -> [was, now]); a ResumeConflict naming everything
    else that changed. `data` is the PreparedData the run trains on, `model_cfg` the model's config as built."""
    applied, refused = resume_refusals(run_dir, cfg, data, model_cfg)
    if refused:
        raise ResumeConflict(
            f"cannot resume {run_dir}: its checkpoints were trained with other inputs ({'; '.join(refused)}). "
            f"Use a new run.name, or start over with --restart (or run.restart: true), which keeps the old "
            f"folder as {run_dir.name}.old-<time>"
        )
    return applied


def resume_refusals(run_dir: Path, cfg: Config, data, model_cfg) -> tuple[dict[str, list], list[str]]:
    """(the config changes a resume of `run_dir` applies, 'key was X, now Y' for everything else that differs:
    config keys, the data's content and tokenizer, the model as built). A cooldown branch asks it of its parent."""
    old = saved_config(run_dir)
    differences = config_differences(old, cfg) if old is not None else {}
    applied = {key: change for key, change in differences.items() if key in APPLIED_ON_RESUME}
    data_keys = {key: change for key, change in differences.items()
                 if key.startswith("data.") and key not in APPLIED_ON_RESUME | DATA_READ_WHILE_TRAINING}
    refused = [f"{key} was {_short(was)}, now {_short(now)}" for key, (was, now) in differences.items()
               if key not in applied and key not in data_keys]
    refused += data_conflicts(run_dir, data, data_keys)
    refused += model_differences(run_dir, model_cfg)
    return applied, refused


def model_differences(run_dir: Path, model_cfg) -> list[str]:
    """Each field of the model as built (`model_cfg`) that differs from the run's model.json."""
    if not (run_dir / MODEL_FILE).is_file():
        return []
    built = json.loads(json.dumps(dataclasses.asdict(model_cfg)))
    saved = json.loads((run_dir / MODEL_FILE).read_text())
    return [f"the model's {key} was {_short(saved.get(key))}, now {_short(built.get(key))}"
            for key in sorted(saved.keys() | built.keys()) if saved.get(key) != built.get(key)]


def tokenizer_difference(saved: dict, now: dict) -> str | None:
    """What differs between two tokenizer.json files, in a few words (None: they are the same)."""
    if saved == now:
        return None
    old, new = saved.get("model", {}).get("vocab"), now.get("model", {}).get("vocab")
    if isinstance(old, dict) and isinstance(new, dict) and old != new:
        changed = sum(old.get(token) != new.get(token) for token in old.keys() | new.keys())
        return f"{changed} of its {len(old)} vocabulary entries differ or are missing (now {len(new)} entries)"
    parts = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
    return f"its {', '.join(parts)} differ"


def evaluation_conflicts(checkpoint: Path, cfg: Config, data, model_cfg) -> list[str]:
    """What an evaluation of `checkpoint` (training.eval_only) would score with that the checkpoint was not trained
    with: another tokenizer than its run folder's tokenizer.json, or another model than its model.json (the folder
    that holds its checkpoints/). Another text is what an evaluation is for, so the data's content may differ. A
    checkpoint outside a run folder cannot be checked: a message says so."""
    run_dir = checkpoint.resolve().parent.parent
    if checkpoint.resolve().parent.name != "checkpoints" or not (run_dir / "tokenizer.json").is_file():
        print(f"rafale: {checkpoint} is not in a run folder (RUN/checkpoints/, beside RUN/tokenizer.json): its "
              "tokenizer cannot be checked; data.tokenizer must be the one it was trained with")
        return []
    conflicts = model_differences(run_dir, model_cfg)
    what = tokenizer_difference(json.loads((run_dir / "tokenizer.json").read_text()),
                                json.loads((data.path / "tokenizer.json").read_text()))
    if what is not None:
        old = saved_config(run_dir)
        causes = [f"{key} was {_short(was)}, now {_short(now)}"
                  for key, (was, now) in (config_differences(old, cfg) if old else {}).items()
                  if key.startswith("data.") and key not in APPLIED_ON_RESUME]
        conflicts.append(f"the tokenizer differs from the run's {run_dir / 'tokenizer.json'}: {what}"
                         + (f" ({'; '.join(causes)})" if causes else "")
                         + f"; evaluate with data.tokenizer={run_dir / 'tokenizer.json'}")
    return conflicts


def data_conflicts(run_dir: Path, data, data_keys: dict[str, list]) -> list[str]:
    """What differs between the data the run's checkpoints saw (RUN/data.json, RUN/tokenizer.json) and `data`:
    each split's content digest, then the tokenizer. When the contents differ, the data keys that changed are
    named with them, as the likely cause."""
    old = json.loads((run_dir / DATA_FILE).read_text()) if (run_dir / DATA_FILE).is_file() else {}
    old_splits, new_splits = old.get("splits", {}), data.meta["splits"]
    conflicts = []
    if old_splits and all("sha256" in split for split in (*old_splits.values(), *new_splits.values())):
        for name in sorted(old_splits.keys() | new_splits.keys()):
            was, now = (old_splits.get(name) or {}).get("sha256"), (new_splits.get(name) or {}).get("sha256")
            if was != now:
                conflicts.append(f"the data's {name} split has other content (sha256 {str(was)[:12]}, now "
                                 f"{str(now)[:12]})")
        if conflicts:
            conflicts += [f"{key} was {_short(was)}, now {_short(now)}" for key, (was, now) in data_keys.items()]
    elif "fingerprint_inputs" in old:  # a run folder written before rafale kept content digests
        conflicts += legacy_data_conflicts(old, data.meta)
    if (run_dir / TOKENIZER_FILE).is_file():
        same = json.loads((run_dir / TOKENIZER_FILE).read_text()) == json.loads((data.path / TOKENIZER_FILE).read_text())
        conflicts += [] if same else ["the tokenizer differs from the run's tokenizer.json"]
    return conflicts


def legacy_data_conflicts(old: dict, meta: dict) -> list[str]:
    """The cache's fingerprint inputs; a local file by what it yields (tokens, blocks or examples per split), since
    its identity is its path and modification time, which moving or copying it changes."""
    def changed(what: str, before: dict, after: dict) -> list[str]:
        after = json.loads(json.dumps(after))
        return [f"{what} {key} was {_short(before.get(key))}, now {_short(after.get(key))}"
                for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]

    old_inputs, new_inputs = dict(old["fingerprint_inputs"]), dict(meta["fingerprint_inputs"])
    conflicts = []
    if is_local_source(meta["config"]["source"]):
        del old_inputs["source"], new_inputs["source"]
        strip = lambda splits: {name: {k: v for k, v in info.items() if k != "sha256"} for name, info in splits.items()}
        conflicts += changed("data split", strip(old.get("splits", {})), strip(meta["splits"]))
    return conflicts + changed("data", old_inputs, new_inputs)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reached(max_duration: str, summary: dict) -> bool:
    """Whether a run that stands where `summary` says has trained for max_duration (a Composer time string)."""
    value, unit = parse_time(max_duration)
    counts = {"ba": "batches", "ep": "epochs", "sp": "samples", "tok": "tokens"}
    return unit in counts and summary.get(counts[unit], 0) >= value


# ----------------------------------------------------------------------------------------------------
# before training: set aside, checked, written


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
    (resume_changes: a ResumeConflict for anything it may not). Returns (the config changes a resume applies, the
    run's summary when it is already complete under this config, else None)."""
    from rafale.run_folder.checkpoints import batch_number  # torch

    previous = read_summary(run_dir)
    if not save or not list((run_dir / CHECKPOINTS_DIR).glob("*.pt")):
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


def write_run_folder(cfg: Config, data: PreparedData, model, run_dir: Path) -> None:
    """What rebuilds the model without the data: the resolved config, the tokenizer, the data's description and
    the model's sizes (and a classifier's class names)."""
    from composer.utils import dist

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("run.output_dir", f"cannot create the run folder {run_dir}: {err}") from None
    if dist.get_global_rank() != 0:
        return
    # restart is what this command did, not a setting of the run: rerunning config.yaml must resume it
    save_config(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, restart=False)), run_dir / CONFIG_FILE)
    shutil.copyfile(data.path / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
    write_json(run_dir / DATA_FILE, data.meta)  # to rebuild the model without the data
    write_model_file(model.model, run_dir)  # ... and without model.pretrained
    if "label_names" in data.meta:  # class id -> name, for whoever reads the predictions
        write_json(run_dir / LABELS_FILE, data.meta["label_names"])


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def write_model_file(model: torch.nn.Module, run_dir: Path) -> None:
    """Save the built model's config, so the run's model can be rebuilt from its folder alone."""
    path = run_dir / MODEL_FILE  # written whole or not at all: another process may read it
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    tmp.replace(path)


# what an export of a run trained with data.document_mask says (the proof runs one sequence a row, as transformers does)
DOCUMENT_MASK_NOTE = (
    "rafale: this model was trained with data.document_mask (each packed document attended only to itself, "
    "positions from 0 at each): transformers computes the same for one document a row, as the check above did; it "
    "does not reproduce the packing (several documents in one row would see each other there)")


def export_model(model: torch.nn.Module, folder: Path, data: PreparedData, document_mask: bool = False) -> Path:
    """Write `model` (the nn.Module, not its Composer wrapper) with the run's tokenizer to `folder` (RUN/export,
    RUN/export-best, or `rafale export --out`), once transformers has loaded it back and computed the same outputs
    (rafale/run_folder/export_proof.py). document_mask: the run's data.document_mask, which the export then says
    (`DOCUMENT_MASK_NOTE`): the weights are the same, packing was a training-time choice.

    The files are written to a hidden folder beside `folder` and checked there; only a proven export is renamed
    into place (and an earlier `folder`.refused/ removed). A refused one becomes `folder`.refused/ with a REFUSED.txt
    saying why, any previous `folder` (not these weights) is removed, and the ExportRefused says both."""
    from rafale.run_folder.export_proof import ExportRefused, prove_export
    from rafale.models.hf import replace_folder, save_pretrained

    refused = folder.with_name(folder.name + REFUSED_SUFFIX)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.unchecked.", dir=folder.parent))
    try:
        save_pretrained(
            model, staging, tokenizer=data.tokenizer, vocab_size=data.vocab_size, overwrite=True,
            label_names=data.meta.get("label_names"),
        )
        proof = prove_export(model, staging)
    except ExportRefused as err:
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
    shutil.rmtree(refused, ignore_errors=True)  # an earlier refusal, of other weights or code
    print(f"rafale: export checked: {proof.line()}")
    if document_mask:
        print(DOCUMENT_MASK_NOTE)
    return folder
