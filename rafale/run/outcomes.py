"""How a run ends besides reaching training.max_duration: training.keep_best (the weights of the best evaluation,
exported to RUN/export-best/) and training.early_stopping (Composer's EarlyStopper), and what the summary says of
both, carried across a resume.
"""

from pathlib import Path

import torch
from composer import Trainer
from composer.callbacks import EarlyStopper
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger

from rafale.config import Config
from rafale.errors import ConfigError
from rafale.run.ema import EMA_LABEL
from rafale.run.resilience import decided_on_rank_zero
from rafale.run_folder import BEST_DIR, evaluations


def validation_metric(model, name: str, key: str) -> bool:
    """Whether higher is better for the model's validation metric `name`; a ConfigError naming `key` and the
    model's metrics when it has none of that name. (Composer's metrics leave higher_is_better unset: by name then,
    accuracies, recalls and F1 up, losses, perplexity and bits per byte down.)"""
    metrics = model.get_metrics(is_train=False)
    if name not in metrics:
        raise ConfigError(key, f"{name!r} is not a validation metric of this model; it has {', '.join(metrics)}")
    higher = getattr(metrics[name], "higher_is_better", None)
    return higher if higher is not None else any(word in name for word in ("Accuracy", "Recall", "F1"))


class KeepBest(Callback):
    """training.keep_best: after each evaluation that improves `metric`, the weights go to RUN/export-best/ (the
    Hugging Face format, as RUN/export/). `best` says which evaluation it was: {metric, value, step, export}.
    `label`: the evaluator it chooses on: "eval", or with training.ema.export the EMA's (rafale.run.ema.EMA_LABEL),
    whose weights the export then takes; the best then also says {"weights": "ema"}."""

    def __init__(self, metric: str, higher_is_better: bool, export, label: str = "eval"):
        self.metric, self.higher, self.export, self.label = metric, higher_is_better, export, label
        self.best: dict | None = None
        self.news: str | None = None  # said once every evaluator has run: after the validation line it refers to

    def eval_end(self, state: State, logger: Logger) -> None:
        if state.dataloader_label != self.label:
            return
        value = float(state.eval_metrics[self.label][self.metric].compute())
        if self.best is not None and (value <= self.best["value"] if self.higher else value >= self.best["value"]):
            return
        step = int(state.timestamp.batch)
        folder = self.export(state) if self.export is not None else None
        self.best = {"metric": self.metric, "value": value, "step": step, "export": str(folder) if folder else None}
        ema = self.label != "eval"
        if ema:
            self.best["weights"] = "ema"
        if folder is not None:
            self.news = (f"rafale: best {'EMA ' if ema else ''}{self.metric} so far ({value:.4f} at step {step}): "
                         f"exported to {folder}")

    def eval_after_all(self, state: State, logger: Logger) -> None:
        # the console's validation line is printed at eval_end by a logger, which Composer calls after the callbacks
        if self.news is not None:
            print(self.news, flush=True)
            self.news = None

    def fit_end(self, state: State, logger: Logger) -> None:
        self.eval_after_all(state, logger)


class EarlyStopping(EarlyStopper):
    """Composer's EarlyStopper, which also says whether it ended the run: `stopped_at` is the batch where it
    stopped training (None while it has not). The run's timestamp cannot say it: a run stopped by a signal also
    ends before training.max_duration, and so does every record saved at a checkpoint."""

    stopped_at: int | None = None

    def _update_stopper_state(self, state: State):
        before = state.max_duration
        super()._update_stopper_state(state)
        if self.stopped_at is None and state.max_duration != before:  # it called state.stop_training()
            self.stopped_at = int(state.timestamp.batch)


def outcome_callbacks(cfg: Config, model, export_best) -> list:
    """training.keep_best and training.early_stopping (Composer's EarlyStopper), their metrics checked first.
    export_best(state) writes the weights to RUN/export-best/ and returns that folder; None for a model that cannot
    be exported (its best step is still recorded)."""
    t, callbacks = cfg.training, []
    if t.keep_best is not None:
        higher = validation_metric(model, t.keep_best, "training.keep_best")
        label = EMA_LABEL if t.ema and t.ema.get("export", False) else "eval"
        callbacks.append(KeepBest(t.keep_best, higher, export_best, label))
    if t.early_stopping is not None:
        metric = t.early_stopping["metric"]
        higher = validation_metric(model, metric, "training.early_stopping.metric")
        callbacks.append(EarlyStopping(metric, "eval", comp=torch.greater if higher else torch.less,
                                       patience=t.early_stopping.get("patience", "1ep")))
    return callbacks


def resume_outcome(trainer: Trainer, previous: dict, run_dir: Path, eval_interval: str) -> None:
    """A resumed run's best evaluation so far (training.keep_best) and early stopping's best, from its summary: the
    callbacks start a segment knowing nothing, and would otherwise take the segment's first evaluation as the best.

    The summary may hold a best from after the batch the run resumes at: after run.resume_fallback (the summary
    was saved at the newest checkpoint, now set aside) one from the lost batches, trained again now; in a cooldown
    branch (rafale.run.branch) one from its parent's batches past the branch point. That best is not in the run's
    history, so each such best is taken again from the run's metrics rows up to the resume batch
    (lost_bests_forgotten); early stopping then counts its patience from a best the run really had."""
    start = int(trainer.state.timestamp.batch)
    keep_best = next((c for c in trainer.state.callbacks if isinstance(c, KeepBest)), None)
    stopper = next((c for c in trainer.state.callbacks if isinstance(c, EarlyStopper)), None)
    best, stopping = previous.get("best"), previous.get("early_stopping")
    best = best if keep_best is not None and best and best["metric"] == keep_best.metric else None
    stopping = stopping if stopper is not None and stopping and stopping["metric"] == stopper.monitor else None
    lost = {}  # what was lost -> (its metric, whether higher is better, the lost best's step, its evaluator)
    if best and best["step"] > start:
        lost["training.keep_best"] = (best["metric"], keep_best.higher, best["step"], keep_best.label)
    if stopping and stopping["best_step"] > start:
        lost["training.early_stopping"] = (stopping["metric"], stopper.comp_func is torch.greater,
                                           stopping["best_step"], "eval")
    if lost:  # (every rank has the same summary: they all take this road, and all get rank 0's reading)
        found = decided_on_rank_zero(lambda: lost_bests_forgotten(run_dir, start, lost))
        if "training.keep_best" in lost:
            value, step = found["training.keep_best"] or (None, None)
            best = ({"metric": best["metric"], "value": value, "step": step, "export": None}
                    | ({"weights": "ema"} if keep_best.label == EMA_LABEL else {})) if step is not None else None
        if "training.early_stopping" in lost:
            value, step = found["training.early_stopping"] or (None, None)
            stopping = (None if step is None else {
                "metric": stopping["metric"], "best": value, "best_step": step,
                "best_epoch": evaluation_epoch(step, len(trainer.state.train_dataloader), eval_interval)})
    if best:
        keep_best.best = best
    if stopping:
        stopper.best = torch.tensor(stopping["best"])
        stopper.best_occurred = trainer.state.timestamp.copy(batch=Time(stopping["best_step"], "ba"),
                                                             epoch=Time(stopping["best_epoch"], "ep"))


def lost_bests_forgotten(run_dir: Path, start: int, lost: dict[str, tuple[str, bool, int, str]]) -> dict:
    """On rank 0, for a run resumed at batch `start` before the best evaluations in `lost` ({what: (metric, higher is
    better, its step, its evaluator's label: "eval", or training.ema's)}): the best evaluation of each metric in
    RUN/metrics.jsonl up to and including `start` (the evaluation at the resume batch ran before its checkpoint was
    saved), as {what: (value, step) or None}, the
    earliest of equal ones (as the callbacks keep the first). It says so in one line, and sets RUN/export-best/
    aside as export-best.lost-<step>: it holds the weights of a lost step that the run no longer has, and is not
    left under the name that means "the best weights of this run". The retrained batches export again when they
    beat the best found here; until then the summary's best has no export (the weights of an earlier step are in
    its checkpoint, if one was kept there)."""
    found, said = {}, {}  # what happened -> the keys it happened to
    for what, (metric, higher, lost_step, label) in lost.items():
        values = [(metrics[metric], step) for step, metrics in evaluations(run_dir, start, label) if metric in metrics]
        ranked = sorted(values, key=lambda e: (-e[0] if higher else e[0], e[1]))  # best first, then earliest
        found[what] = ranked[0] if ranked else None
        now = f"{found[what][0]:.4f} at step {found[what][1]}" if found[what] else "none: no evaluation up to there"
        said.setdefault(f"the best {metric} up to batch {start} ({now}), not the one at step {lost_step}",
                        []).append(what)
    aside = None
    if "training.keep_best" in lost and (run_dir / BEST_DIR).is_dir():
        aside = run_dir / f"{BEST_DIR}.lost-{lost['training.keep_best'][2]}"
        n = 1
        while aside.exists():  # a folder set aside by an earlier fallback is kept too
            n += 1
            aside = run_dir / f"{BEST_DIR}.lost-{lost['training.keep_best'][2]}-{n}"
        (run_dir / BEST_DIR).rename(aside)
    said = "; ".join(f"{' and '.join(keys)} start{'s' if len(keys) == 1 else ''} from {what}" for what, keys in said.items())
    print(f"rafale: resuming at batch {start}, before the record's best evaluation, in batches this run no longer "
          f"has: {said}" + (f"; {BEST_DIR}/ held that step's weights and is set aside as {aside.name}" if aside else ""),
          flush=True)
    return found


def evaluation_epoch(step: int, batches_per_epoch: int, eval_interval: str) -> int:
    """The epoch on Composer's clock at the evaluation after batch `step` (early stopping's patience in epochs counts
    from it): an eval_interval in epochs evaluates at an epoch's end, once the clock has moved on to the next epoch;
    any other at the end of a batch, still in that batch's epoch. A fresh run's first evaluation is at 0."""
    if Time.from_input(eval_interval, TimeUnit.EPOCH).unit == TimeUnit.EPOCH:
        return step // batches_per_epoch
    return max(step - 1, 0) // batches_per_epoch


def outcome(trainer: Trainer, cfg: Config) -> dict:
    """What the summary adds for training.keep_best (the best evaluation) and training.early_stopping (its best, and
    where it stopped the run when it did)."""
    found = {}
    for callback in trainer.state.callbacks:
        if isinstance(callback, KeepBest) and callback.best is not None:
            found["best"] = callback.best
        if isinstance(callback, EarlyStopper) and callback.best is not None:
            found["early_stopping"] = {"metric": callback.monitor, "best": float(callback.best),
                                       "best_step": int(callback.best_occurred.batch),
                                       "best_epoch": int(callback.best_occurred.epoch)}
            if getattr(callback, "stopped_at", None) is not None:  # it ended the run (not a signal, not the end)
                found["early_stopped"] = {"metric": callback.monitor, "best": float(callback.best),
                                          "best_step": int(callback.best_occurred.batch),
                                          "patience": cfg.training.early_stopping.get("patience", "1ep"),
                                          "at_batch": callback.stopped_at}
    return found
