"""The run's record: what rafale writes down about a run, kept true across resumes, re-runs and evaluations.

A run folder, RUN = run.output_dir/run.name, holds

    config.yaml    the resolved config (every default filled in) that the latest segment ran with
    summary.json   the whole run: its status, where it stands (batches, tokens), where the time went (inside
                   training batches, evaluation, checkpoints, start-up), tokens/s and MFU over the time inside
                   training batches, the first and the latest validation, and one entry per segment
    metrics.jsonl  every logged metric, one row per step, steps increasing
    evals/<time>/  each `training.eval_only` evaluation's own config.yaml, summary.json and metrics.jsonl

A *segment* is one process's share of a run: a fresh start, then each resume. A segment ends complete, stopped
by a signal (its checkpoint saved), failed, or killed; the record is saved with every checkpoint, so a killed
segment's entry ends at its last checkpoint, which is where the next segment resumes. A resume drops the rows of
metrics.jsonl past that checkpoint (the killed process logged them, and the resumed one logs those steps again).
A re-run of a complete run changes nothing; an evaluation never writes into the training run's own files.

The resume guard (`resume_changes`) decides key by key what a resumed run may change: the keys in
APPLIED_ON_RESUME apply from the batch it resumes at, and the new segment lists them; anything else that differs
refuses the resume, naming the key: the data's content (a digest of every cached split) and its tokenizer,
model.type, model.task, model.pretrained and every field of the model as built (model.json), the optimizer and
its schedule (training.lr, weight_decay, optimizer, warmup, ...), the batch size, the seed.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger

from rafale.config import Config, load_config, parse_time, save_config, to_dict
from rafale.errors import RafaleError
from rafale.export import MODEL_FILE
from rafale.loggers import MetricsFile
from rafale.plots import METRICS_FILE, SUMMARY_FILE, best_validation
from rafale.resilience import decided_on_rank_zero

EVALS_DIR = "evals"

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
    "training.keep_best", "training.early_stopping",
}
# data keys the collators read while training; every other data key is judged by the cache it builds (its
# content digest and tokenizer), so a moved file or another spelling of the same data still resumes
DATA_READ_WHILE_TRAINING = {"data.mlm_probability", "data.augment"}
# model keys compared by value; the model's fields are compared as built (model.json), whatever preset or
# overrides gave them
MODEL_KEYS = {"model.type", "model.task", "model.pretrained"}
# where the run folder is: a folder moved or copied elsewhere is the same run
WHERE_KEYS = {"run.name", "run.output_dir"}
LOSS_METRICS = ("LanguageCrossEntropy", "CrossEntropy", "ContrastiveLoss")


class ResumeConflict(RafaleError):
    pass


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


def saved_config(run_dir: Path) -> Config | None:
    path = run_dir / "config.yaml"
    return load_config(path, saved_run=True) if path.is_file() else None


def resume_changes(run_dir: Path, cfg: Config, data, model_cfg) -> dict[str, list]:
    """The config changes a resume of `run_dir` applies (key -> [was, now]); a ResumeConflict naming everything
    else that changed. `data` is the PreparedData the run trains on, `model_cfg` the model's config as built."""
    old = saved_config(run_dir)
    differences = config_differences(old, cfg) if old is not None else {}
    applied = {key: change for key, change in differences.items() if key in APPLIED_ON_RESUME}
    data_keys = {key: change for key, change in differences.items()
                 if key.startswith("data.") and key not in APPLIED_ON_RESUME | DATA_READ_WHILE_TRAINING}
    refused = [f"{key} was {_short(was)}, now {_short(now)}" for key, (was, now) in differences.items()
               if key not in applied and key not in data_keys]
    refused += data_conflicts(run_dir, data, data_keys)
    refused += model_differences(run_dir, model_cfg)
    if refused:
        raise ResumeConflict(
            f"cannot resume {run_dir}: its checkpoints were trained with other inputs ({'; '.join(refused)}). "
            f"Use a new run.name, or start over with --restart (or run.restart: true), which keeps the old "
            f"folder as {run_dir.name}.old-<time>"
        )
    return applied


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
    old = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
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
    if (run_dir / "tokenizer.json").is_file():
        same = json.loads((run_dir / "tokenizer.json").read_text()) == json.loads((data.path / "tokenizer.json").read_text())
        conflicts += [] if same else ["the tokenizer differs from the run's tokenizer.json"]
    return conflicts


def legacy_data_conflicts(old: dict, meta: dict) -> list[str]:
    """The cache's fingerprint inputs; a local file by what it yields (tokens, blocks or examples per split), since
    its identity is its path and modification time, which moving or copying it changes."""
    from rafale.config import is_local_source

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
# timing a segment


class RunClock(Callback):
    """Where this process's time goes: inside training batches (from asking the loader for a batch to the batch's
    end, as a plain PyTorch loop would time it), in evaluation, and in saving checkpoints; the first batches' own
    times (with training.compile, the first one's excess is what compiling cost); the first and latest evaluation.
    It only reads the clock at a few events; callables in `on_save` run after each checkpoint is written."""

    KEEP = 21  # batch times kept for the compile figures

    def __init__(self):
        self.train_s = self.eval_s = self.checkpoint_s = 0.0
        self.batch_seconds: list[float] = []
        self.first_batch_at: float | None = None  # when the first trained batch asked for its data
        self.eval_s_before_first_batch = 0.0
        self.first_eval: tuple[int, dict] | None = None  # (batch, metrics) of this segment's first evaluation
        self.last_eval: tuple[int, dict] | None = None
        self.on_save: list = []
        self._batch_start = self._eval_start = 0.0

    def fit_start(self, state: State, logger: Logger) -> None:
        for saver in (c for c in state.callbacks if isinstance(c, CheckpointSaver)):
            if not getattr(saver._save_checkpoint, "timed_by_rafale", False):
                saver._save_checkpoint = self._timed(saver._save_checkpoint)

    def _timed(self, save):
        def timed_save(state: State, logger: Logger):
            start = time.perf_counter()
            save(state, logger)
            self.checkpoint_s += time.perf_counter() - start
            for then in self.on_save:
                then(state, logger)

        timed_save.timed_by_rafale = True
        return timed_save

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self._batch_start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        seconds = time.perf_counter() - self._batch_start
        self.train_s += seconds
        if self.first_batch_at is None:
            self.first_batch_at, self.eval_s_before_first_batch = self._batch_start, self.eval_s
        if len(self.batch_seconds) < self.KEEP:
            self.batch_seconds.append(seconds)

    def eval_start(self, state: State, logger: Logger) -> None:
        self._eval_start = time.perf_counter()

    def eval_end(self, state: State, logger: Logger) -> None:
        self.eval_s += time.perf_counter() - self._eval_start
        metrics = {name: float(m.compute()) for name, m in state.eval_metrics.get("eval", {}).items()}
        self.last_eval = (int(state.timestamp.batch), metrics)
        if self.first_eval is None:
            self.first_eval = self.last_eval

    def first_and_median(self) -> tuple[float | None, float | None]:
        if len(self.batch_seconds) < 2:
            return None, None
        rest = sorted(self.batch_seconds[1:])
        return self.batch_seconds[0], rest[len(rest) // 2]


# ----------------------------------------------------------------------------------------------------
# the run folder's record


def read_summary(folder: Path) -> dict | None:
    path = Path(folder) / SUMMARY_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None  # cut short by a crash while it was written (it is written to a temporary name first)


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def compact_metrics(run_dir: Path, last_step: int | None = None) -> None:
    """Rewrite RUN/metrics.jsonl with one row per step, in step order (a step's metrics may have been written in
    several flushes), keeping only the steps up to `last_step` when it is given (a resume's checkpoint)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short when the process was killed
        step = row.pop("step")
        if last_step is None or step <= last_step:
            rows.setdefault(step, {}).update(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"step": step, **rows[step]}) + "\n" for step in sorted(rows)))
    tmp.replace(path)


class RunRecord:
    """summary.json and metrics.jsonl of one training run over its segments (see the module's docstring).

    `begin(state)` once the Trainer has loaded any checkpoint; `save(state, status)` at every checkpoint
    (through RunClock.on_save), when the run stops and at its end. Only the process that `writes` (rank 0)
    touches files. `mfu(tokens_per_s)` turns the run's throughput into MFU (None where there is no peak)."""

    def __init__(self, run_dir: Path, cfg: Config, num_params: int, clock: RunClock, started: float,
                 writes: bool, mfu=None, precision: str | None = None, changes: dict | None = None):
        self.run_dir, self.cfg, self.num_params, self.clock = run_dir, cfg, num_params, clock
        self.started, self.writes, self.mfu, self.precision = started, writes, mfu, precision
        self.changes = changes or {}
        self.earlier: list[dict] = []  # the segments before this one, up to where this one starts
        self.previous: dict = {}
        self.start_batch = self.start_tokens = 0
        self.export_dir: Path | None = None
        self.outcome = dict  # () -> what the summary adds (training.keep_best's best evaluation, an early stop)
        clock.on_save.append(self.checkpointed)

    def begin(self, state: State) -> None:
        """Start this segment where the Trainer stands: at batch 0 the folder's record starts empty; a resume keeps
        the earlier segments up to its batch and drops the metrics rows logged past it. Rank 0 reads the record and
        every process gets what it read: the earlier best evaluations it holds drive keep_best and early stopping,
        whose decisions every process must take alike (rafale.resilience.decided_on_rank_zero)."""
        self.start_batch, self.start_tokens = int(state.timestamp.batch), int(state.timestamp.token)
        if self.start_batch == 0:
            for name in (METRICS_FILE, SUMMARY_FILE, "metrics.png") if self.writes else ():
                (self.run_dir / name).unlink(missing_ok=True)
            return
        self.previous = decided_on_rank_zero(lambda: read_summary(self.run_dir)) or {}
        self.earlier = [cut(segment, self.start_batch) for segment in self.previous.get("segments", [])
                        if segment["batches"][0] < self.start_batch]
        if self.earlier and self.earlier[-1]["ended"] == "in progress":  # the process died after that checkpoint
            self.earlier[-1]["ended"] = f"killed after its checkpoint at batch {self.earlier[-1]['batches'][1]}"
        recorded = self.earlier[-1]["batches"][1] if self.earlier else 0
        if recorded < self.start_batch:  # a process died while saving, between its checkpoint and its record
            self.earlier.append({
                "batches": [recorded, self.start_batch],
                "tokens": self.start_tokens - sum(segment["tokens"] for segment in self.earlier),
                "wall_time_s": None, "train_time_s": None, "eval_time_s": None, "checkpoint_time_s": None,
                "startup_time_s": None, "first_batch_s": None, "batch_s_median": None, "precision": None,
                "ended": "killed before its record was saved: its times are unknown"})
        if self.writes:
            compact_metrics(self.run_dir, last_step=self.start_batch)

    def checkpointed(self, state: State, logger: Logger) -> None:
        """After each checkpoint: the metrics logged so far and the record go to disk with it, so that a run killed
        later resumes from that checkpoint with a record that ends exactly there."""
        for destination in logger.destinations:
            if isinstance(destination, MetricsFile):
                destination.flush()
        self.save(state, "in progress")

    def segment(self, state: State, ended: str) -> dict:
        clock, now = self.clock, time.perf_counter()
        startup = (clock.first_batch_at - self.started - clock.eval_s_before_first_batch
                   if clock.first_batch_at is not None else None)
        first, median = clock.first_and_median()
        entry = {
            "batches": [self.start_batch, int(state.timestamp.batch)],
            "tokens": int(state.timestamp.token) - self.start_tokens,
            "wall_time_s": round(now - self.started, 3),
            "train_time_s": round(clock.train_s, 3),
            "eval_time_s": round(clock.eval_s, 3),
            "checkpoint_time_s": round(clock.checkpoint_s, 3),
            "startup_time_s": round(startup, 3) if startup is not None else None,
            "first_batch_s": round(first, 4) if first is not None else None,
            "batch_s_median": round(median, 5) if median is not None else None,
            "precision": self.precision,
            "ended": ended,
        }
        if self.changes:
            entry["config_changes"] = self.changes  # applied from this segment's first batch
        return entry

    def summary(self, state: State, status: str, **extra) -> dict:
        segments = self.earlier + [self.segment(state, status)]
        total = {key: round(sum(s[key] or 0 for s in segments), 3)
                 for key in ("wall_time_s", "train_time_s", "eval_time_s", "checkpoint_time_s", "startup_time_s")}
        trained = sum(s["tokens"] for s in segments if s["train_time_s"] is not None)  # the ones that were timed
        tokens_per_s = trained / total["train_time_s"] if trained and total["train_time_s"] > 0 else None
        first_eval = self.clock.first_eval if self.start_batch == 0 else None
        last_eval = self.clock.last_eval
        latest = segments[-1]
        summary = {
            "name": self.run_dir.name,
            "model": self.cfg.model.type + (f" {self.cfg.model.preset}" if self.cfg.model.preset else ""),
            "task": self.cfg.model.task,
            "parameters": self.num_params,
            "status": status,
            "batches": int(state.timestamp.batch),
            "epochs": int(state.timestamp.epoch),
            "samples": int(state.timestamp.sample),
            "tokens": int(state.timestamp.token),
            **total,
            "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
            "mfu": self.mfu(tokens_per_s) if self.mfu and tokens_per_s else None,
            "precision": self.precision,
            "compile": self.cfg.training.compile,
            "first_batch_s": latest["first_batch_s"],
            "batch_s_median": latest["batch_s_median"],
            "validation_loss_start": (validation_loss(first_eval[1]) if first_eval and first_eval[0] == 0
                                      else self.previous.get("validation_loss_start")),
            "validation": last_eval[1] if last_eval else self.previous.get("validation", {}),
            "validation_step": last_eval[0] if last_eval else self.previous.get("validation_step"),
            "export": str(self.export_dir) if self.export_dir else None,
            "segments": segments,
            **self.outcome(),
            **extra,
        }
        return summary

    def save(self, state: State, status: str, **extra) -> dict:
        summary = self.summary(state, status, **extra)
        if self.writes:
            write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary


def cut(segment: dict, batch: int) -> dict:
    """An earlier segment as far as `batch`, where a later one resumed. It normally ends there already (it was
    saved with that checkpoint); after run.resume_fallback it may reach further, and its figures are then scaled
    to the batches kept."""
    start, end = segment["batches"]
    if end <= batch:
        return segment
    kept = (batch - start) / (end - start)
    shorter = dict(segment, batches=[start, batch], tokens=round(segment["tokens"] * kept),
                   ended=f"resumed from its checkpoint at batch {batch} (the batches after it are lost)")
    for key in ("train_time_s", "eval_time_s", "checkpoint_time_s"):
        shorter[key] = round(segment[key] * kept, 3)
    return shorter


def validation_loss(metrics: dict) -> float | None:
    return next((metrics[name] for name in LOSS_METRICS if name in metrics), None)


# ----------------------------------------------------------------------------------------------------
# an evaluation's own record


def eval_folder(run_dir: Path) -> Path:
    """RUN/evals/<time>/ for a training.eval_only run: never the training run's own files."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = run_dir / EVALS_DIR / stamp, 1
    while folder.exists():
        n += 1
        folder = run_dir / EVALS_DIR / f"{stamp}-{n}"
    return folder


def write_eval_record(folder: Path, cfg: Config, state: State, clock: RunClock, started: float,
                      num_params: int, writes: bool = True) -> dict:
    """The evaluation's config.yaml and summary.json (its metrics.jsonl is written by the metrics logger); only
    the process that `writes` (rank 0) writes them."""
    step, metrics = clock.last_eval or (int(state.timestamp.batch), {})
    summary = {
        "name": folder.parent.parent.name,
        "eval_only": True,
        "checkpoint": str(Path(cfg.training.load_path).expanduser().resolve()),
        "batches": step,
        "tokens": int(state.timestamp.token),
        "parameters": num_params,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "eval_time_s": round(clock.eval_s, 3),
        "validation": metrics,
        "validation_step": step,
    }
    if writes:
        save_config(cfg, folder / "config.yaml")
        write_json(folder / SUMMARY_FILE, summary)
    return summary


# ----------------------------------------------------------------------------------------------------
# what a person reads at the end


def describe(summary: dict, run_dir: Path) -> str:
    """The end-of-run lines, from the summary."""
    lines = [f"{'evaluation' if summary.get('eval_only') else 'run'} folder: {run_dir}",
             f"parameters: {summary['parameters']:,}"]
    if summary.get("eval_only"):
        lines.append(f"evaluated {summary['checkpoint']} (batch {summary['batches']}) in {summary['eval_time_s']:.2f} s")
    if summary.get("precision"):
        lines.append(f"precision: {summary['precision']}")
    if summary.get("first_batch_s") is not None and summary.get("batch_s_median") is not None:
        compiled = "on" if summary.get("compile") else "off (training.compile)"
        cost = (f": about {summary['first_batch_s'] - summary['batch_s_median']:.1f} s of compiling"
                if summary.get("compile") else "")
        lines.append(f"torch.compile: {compiled}; first batch {summary['first_batch_s']:.2f} s, the next ones "
                     f"{summary['batch_s_median']:.3f} s (median){cost}")
    segments = summary.get("segments", [])
    if summary.get("tokens") and summary.get("train_time_s"):
        mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
        lines.append(f"tokens trained: {summary['tokens']:,} in {summary['wall_time_s']:.1f} s, "
                     f"{summary['train_time_s']:.1f} s of it training ({summary['tokens_per_s']:,.0f} tokens/s "
                     f"while training{mfu})")
        other = summary["wall_time_s"] - sum(summary.get(k) or 0 for k in
                                             ("train_time_s", "eval_time_s", "checkpoint_time_s", "startup_time_s"))
        lines.append(f"the rest: evaluation {summary['eval_time_s']:.1f} s, checkpoints "
                     f"{summary['checkpoint_time_s']:.1f} s, start-up {summary['startup_time_s'] or 0:.1f} s, "
                     f"other {max(other, 0):.1f} s (plots, logging, export)")
    if len(segments) > 1:
        parts = []
        for s in segments:
            changed = "; ".join(f"{k} {v[0]} -> {v[1]}" for k, v in s.get("config_changes", {}).items())
            parts.append(f"{s['batches'][0]}-{s['batches'][1]}" + (f" ({changed})" if changed else ""))
        lines.append(f"trained in {len(segments)} segments, batches {', '.join(parts)}")
    if summary.get("export"):
        lines.append(f"checkpoints: {run_dir / 'checkpoints'}; Hugging Face export: {summary['export']}")
    metrics = summary.get("validation", {})
    end = validation_loss(metrics)
    labels = (("", end),) if summary.get("eval_only") else (
        (" at start", summary.get("validation_loss_start")), (" at end", end))
    for label, loss in labels:
        if loss is not None:
            perplexity = f" (perplexity {math.exp(min(loss, 50)):.2f})" if "LanguagePerplexity" in metrics else ""
            lines.append(f"validation loss{label}: {loss:.4f}{perplexity}")
    others = {k: v for k, v in metrics.items() if "CrossEntropy" not in k and "Perplexity" not in k}
    if others:
        lines.append("validation " + ", ".join(f"{k}: {v:.4f}" for k, v in others.items()))
    best = best_validation(run_dir) if not summary.get("eval_only") else None
    if best is not None:
        name, value, step = best
        lines.append(f"best validation {name}: {value:.4f} at step {step}; curves: {run_dir / 'metrics.png'}")
    return "\n".join("rafale: " + line for line in lines)
