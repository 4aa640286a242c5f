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

Where these files are, how a run is read back, and the resume guard (what a resumed run may change) are in
rafale/run_folder.py.
"""

import json
import math
import time
from pathlib import Path

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger

from rafale.config import Config, save_config
from rafale.hardware import machine_load
from rafale.loggers import MetricsFile
from rafale.resilience import decided_on_rank_zero
from rafale.run_folder import (METRICS_FILE, PLOT_FILE, SUMMARY_FILE, best_validation, evaluations, metrics_rows,
                               read_summary, write_json)

LOSS_METRICS = ("LanguageCrossEntropy", "CrossEntropy", "ContrastiveLoss")


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
        self.loads: list[float] = []  # the machine's 1-minute load average, read at most once a second while training
        self.cores: int | None = None
        self._load_read_at = 0.0
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
        now = time.perf_counter()
        if now - self._load_read_at >= 1.0 and (load := machine_load()) is not None:
            self._load_read_at = now
            self.loads.append(load[0])
            self.cores = load[1]

    def machine_load(self) -> dict | None:
        """{"mean", "max", "cores"}: the machine's load average while this segment trained, or None unread."""
        if not self.loads:
            return None
        return {"mean": round(sum(self.loads) / len(self.loads), 2), "max": round(max(self.loads), 2), "cores": self.cores}

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


def compact_metrics(run_dir: Path, last_step: int | None = None) -> None:
    """Rewrite RUN/metrics.jsonl with one row per step, in step order (a step's metrics may have been written in
    several flushes), keeping only the steps up to `last_step` when it is given (a resume's checkpoint)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    rows: dict[int, dict] = {}
    for row in metrics_rows(path):  # without a line cut short when the process was killed
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
        self.flops_per_token: int | None = None  # a training step's FLOPs per token (rafale.record.compute_figures)
        self.non_embedding_params: int | None = None
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
            for name in (METRICS_FILE, SUMMARY_FILE, PLOT_FILE) if self.writes else ():
                (self.run_dir / name).unlink(missing_ok=True)
            return
        self.previous = decided_on_rank_zero(self._read_previous) or {}
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

    def _read_previous(self) -> dict:
        """The record this segment continues. Resumed before its latest evaluation (run.resume_fallback onto an
        older checkpoint), its `validation` would be one of batches the run no longer has, and would stay in the
        summary until this segment evaluates: it is the latest in metrics.jsonl up to the resume batch instead."""
        previous = read_summary(self.run_dir) or {}
        step = previous.get("validation_step")
        if step is not None and step > self.start_batch:
            kept = evaluations(self.run_dir, self.start_batch)
            previous["validation_step"], previous["validation"] = kept[-1] if kept else (None, {})
        return previous

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
            "machine_load": clock.machine_load(),
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
            "non_embedding_parameters": self.non_embedding_params,
            "flops_per_token": self.flops_per_token,
            "training_flops": (self.flops_per_token * int(state.timestamp.token)
                               if self.flops_per_token is not None else None),
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
            "machine_load": latest.get("machine_load"),  # this segment's, as tokens/s is mostly its own
            "first_batch_s": latest["first_batch_s"],
            "batch_s_median": latest["batch_s_median"],
            "validation_loss_start": (validation_loss(first_eval[1]) if first_eval and first_eval[0] == 0
                                      else self.previous.get("validation_loss_start")),
            "validation": last_eval[1] if last_eval else self.previous.get("validation", {}),
            "validation_step": last_eval[0] if last_eval else self.previous.get("validation_step"),
            "export": str(self.export_dir) if self.export_dir else None,
            "segments": segments,
            **({"branched_from": self.previous["branched_from"]} if "branched_from" in self.previous else {}),
            **self.outcome(),
            **extra,
        }
        return summary

    def save(self, state: State, status: str, **extra) -> dict:
        summary = self.summary(state, status, **extra)
        if self.writes:
            write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary


def non_embedding_parameters(module) -> int:
    """The parameters outside the vocabulary matrices, N of a scaling law (Kaplan et al. 2020): every parameter but
    the embedding tables (nn.Embedding: token, and position where a model has one) and the output projection onto
    the vocabulary, tied or not. Shared ones count once.

    The projection is the one the model names (`output_head()`: the decoder's head, the MLM decoder), never
    guessed from its shape: a hidden Linear as wide as the vocabulary (an MLP's up projection when the padded
    vocabulary equals intermediate_size) is a layer like any other."""
    from torch import nn

    left_out = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    output_head = getattr(module, "output_head", None)
    if output_head is not None:
        left_out |= {id(p) for p in output_head().parameters()}
    counted = {id(p): p.numel() for p in module.parameters() if id(p) not in left_out}
    return sum(counted.values())


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
    if summary.get("training_flops"):
        lines.append(f"compute: N = {summary['non_embedding_parameters']:,} non-embedding parameters, D = "
                     f"{summary['tokens']:,} tokens, C = {summary['training_flops']:.3g} training FLOPs "
                     f"({summary['flops_per_token']:,} per token)")
    if summary.get("eval_only"):
        lines.append(f"evaluated {summary['checkpoint']} (batch {summary['batches']}) in {summary['eval_time_s']:.2f} s")
    if summary.get("precision"):
        lines.append(f"precision: {summary['precision']}")
    # the first batch against the next ones measures what compiling cost; without compiling it measures nothing
    if summary.get("compile") and summary.get("first_batch_s") is not None and summary.get("batch_s_median") is not None:
        lines.append(f"torch.compile: on; first batch {summary['first_batch_s']:.2f} s, the next ones "
                     f"{summary['batch_s_median']:.3f} s (median): about "
                     f"{summary['first_batch_s'] - summary['batch_s_median']:.1f} s of compiling")
    segments = summary.get("segments", [])
    if summary.get("tokens") and summary.get("train_time_s"):
        mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
        load = summary.get("machine_load") or {}
        busy = (f"; the machine's load averaged {load['mean']:.1f} on its {load['cores']} cores while it trained: "
                "other processes shared them, so these figures are below what it gives alone"
                if load.get("cores") and load["mean"] > load["cores"] else "")
        lines.append(f"tokens trained: {summary['tokens']:,} in {summary['wall_time_s']:.1f} s, "
                     f"{summary['train_time_s']:.1f} s of it training ({summary['tokens_per_s']:,.0f} tokens/s "
                     f"while training{mfu}{busy})")
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
