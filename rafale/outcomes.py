"""How a run ends besides reaching training.max_duration: training.keep_best (the weights of the best evaluation,
exported to RUN/export-best/) and training.early_stopping (Composer's EarlyStopper), and what the summary says of
both, carried across a resume.
"""

import torch
from composer import Trainer
from composer.callbacks import EarlyStopper
from composer.core import Callback, State, Time
from composer.loggers import Logger

from rafale.config import Config
from rafale.errors import ConfigError


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
    Hugging Face format, as RUN/export/). `best` says which evaluation it was: {metric, value, step, export}."""

    def __init__(self, metric: str, higher_is_better: bool, export):
        self.metric, self.higher, self.export = metric, higher_is_better, export
        self.best: dict | None = None
        self.news: str | None = None  # said once every evaluator has run: after the validation line it refers to

    def eval_end(self, state: State, logger: Logger) -> None:
        value = float(state.eval_metrics["eval"][self.metric].compute())
        if self.best is not None and (value <= self.best["value"] if self.higher else value >= self.best["value"]):
            return
        step = int(state.timestamp.batch)
        folder = self.export(state) if self.export is not None else None
        self.best = {"metric": self.metric, "value": value, "step": step, "export": str(folder) if folder else None}
        if folder is not None:
            self.news = f"rafale: best {self.metric} so far ({value:.4f} at step {step}): exported to {folder}"

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
        callbacks.append(KeepBest(t.keep_best, higher, export_best))
    if t.early_stopping is not None:
        metric = t.early_stopping["metric"]
        higher = validation_metric(model, metric, "training.early_stopping.metric")
        callbacks.append(EarlyStopping(metric, "eval", comp=torch.greater if higher else torch.less,
                                       patience=t.early_stopping.get("patience", "1ep")))
    return callbacks


def resume_outcome(trainer: Trainer, previous: dict) -> None:
    """A resumed run's best evaluation so far (training.keep_best) and early stopping's best, from its summary: the
    callbacks start a segment knowing nothing, and would otherwise take the segment's first evaluation as the best."""
    for callback in trainer.state.callbacks:
        best = previous.get("best")
        if isinstance(callback, KeepBest) and best and best["metric"] == callback.metric:
            callback.best = best
        stopping = previous.get("early_stopping")
        if isinstance(callback, EarlyStopper) and stopping and stopping["metric"] == callback.monitor:
            callback.best = torch.tensor(stopping["best"])
            callback.best_occurred = trainer.state.timestamp.copy(batch=Time(stopping["best_step"], "ba"),
                                                                  epoch=Time(stopping["best_epoch"], "ep"))


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
