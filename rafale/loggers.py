"""Where a run's metrics go while it trains: Composer logger destinations.

`MetricsFile` appends every logged metric to RUN/metrics.jsonl, one JSON object per step ({"step": 120,
"time/token": 491520, "loss/train/total": 2.3, ...}), and redraws RUN/metrics.png after each evaluation and at
the end. `ConsoleLog` is what a person reads: one line per log interval and one per evaluation,

    [ 120/400  30%] loss 2.3412 | 10,030 tok/s | MFU 37.1% | lr 9.1e-04 | 1.2 min elapsed, 2.9 min left
    [ 200/400  50%] validation: loss 1.0100 | perplexity 2.75 | bits/byte 0.412

and on a terminal a progress bar that carries the same fields. Both only read what Composer's callbacks
(SpeedMonitor, LRMonitor, RuntimeEstimator) and the evaluation already log; neither changes it.
"""

import json
import math
import sys
from pathlib import Path

from composer.core import Event, State, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils.misc import create_interval_scheduler

from rafale.plots import METRICS_FILE, plot_run


class MetricsFile(LoggerDestination):
    """Collects each step's metrics in memory and appends them to RUN/metrics.jsonl every `flush_every` steps,
    at each evaluation and at the end (no file I/O in most training steps)."""

    def __init__(self, run_dir: Path, flush_every: int = 50):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.flush_every = flush_every
        self.pending: dict[int, dict] = {}

    def log_metrics(self, metrics: dict, step=None) -> None:
        row = self.pending.setdefault(step, {})
        for name, value in metrics.items():
            try:
                row[name] = float(value)
            except (TypeError, ValueError):
                continue  # not a number (Composer logs a few strings)

    def flush(self) -> None:
        if self.pending:
            lines = [json.dumps({"step": step, **row}) for step, row in self.pending.items() if row]
            with self.path.open("a") as f:
                f.write("".join(line + "\n" for line in lines))
            self.pending.clear()

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.flush_every == 0:
            self.flush()

    def eval_end(self, state: State, logger: Logger) -> None:
        self.flush()
        plot_run(self.run_dir)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.flush()
        plot_run(self.run_dir)

    def close(self, state: State, logger: Logger) -> None:
        self.flush()


# validation metric -> its label in the console line, in the order printed
EVAL_LABELS = {
    "LanguageCrossEntropy": "loss", "CrossEntropy": "loss", "LanguagePerplexity": "perplexity",
    "BitsPerByte": "bits/byte", "MaskedAccuracy": "masked accuracy", "Accuracy": "accuracy",
}


def total_batches(state: State) -> int | None:
    """The run's length in batches, when it is known before the end."""
    limit = state.max_duration
    if limit is None:
        return None
    if limit.unit == TimeUnit.BATCH:
        return int(limit.value)
    if limit.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return int(limit.value) * int(state.dataloader_len)
    return None


def format_train_line(metrics: dict, elapsed_s: float) -> str:
    """'loss 2.3412 | 10,030 tok/s | MFU 37.1% | lr 9.1e-04 | 1.2 min elapsed, 2.9 min left' from what was logged."""
    parts = []
    if "loss/train/total" in metrics:
        parts.append(f"loss {metrics['loss/train/total']:.4f}")
    if "throughput/tokens_per_sec" in metrics:
        parts.append(f"{metrics['throughput/tokens_per_sec']:,.0f} tok/s")
    if "throughput/device/mfu" in metrics:
        parts.append(f"MFU {metrics['throughput/device/mfu']:.1%}")
    lr = next((v for k, v in metrics.items() if k.startswith("lr-")), None)
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    timing = f"{elapsed_s / 60:.1f} min elapsed"
    if "time/remaining_estimate" in metrics:  # RuntimeEstimator logs hours
        timing += f", {metrics['time/remaining_estimate'] * 60:.1f} min left"
    return " | ".join(parts + [timing])


def format_eval_line(metrics: dict) -> str:
    """'validation: loss 1.0100 | perplexity 2.75 | bits/byte 0.412' from the logged eval metrics."""
    values = {name.rsplit("/", 1)[-1]: value for name, value in metrics.items() if name.startswith("metrics/eval/")}
    parts = []
    for name, label in EVAL_LABELS.items():
        if name in values:
            value = values[name]
            parts.append(f"{label} {value:.2f}" if name == "LanguagePerplexity" and math.isfinite(value) else f"{label} {value:.4f}")
    parts += [f"{name} {value:.4f}" for name, value in values.items() if name not in EVAL_LABELS]
    return "validation: " + " | ".join(parts)


class ConsoleLog(LoggerDestination):
    """A person's view of the run: a line every `interval` (a Composer time string, training.log_interval) and one
    at each evaluation. On a terminal (`bar`), a tqdm progress bar shows the same fields and the lines go above it."""

    def __init__(self, interval: str, stream=None, bar: bool | None = None):
        self.stream = stream or sys.stdout
        self.bar_wanted = self.stream.isatty() if bar is None else bar
        self.due = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False)
        self.latest: dict[str, float] = {}
        self.bar = None
        self.total = None  # the run's length in batches, set once the training loader is (after_load)

    def log_metrics(self, metrics: dict, step=None) -> None:
        for name, value in metrics.items():
            try:
                self.latest[name] = float(value)
            except (TypeError, ValueError):
                continue

    def after_load(self, state: State, logger: Logger) -> None:
        # read now, with the training loader set: during an evaluation, state.dataloader_len is the validation one's
        self.total = total_batches(state)

    def _prefix(self, state: State) -> str:
        step, total = int(state.timestamp.batch), self.total
        if total:
            return f"[{step:>{len(str(total))}}/{total} {step / total:4.0%}]"
        return f"[step {step}]"

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.bar_wanted:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=int(state.timestamp.batch), unit="step",
                            file=self.stream, dynamic_ncols=True, leave=True)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.bar is not None:
            self.bar.update(int(state.timestamp.batch) - self.bar.n)
        if self.due(state, Event.BATCH_END):
            line = format_train_line(self.latest, state.timestamp.total_wct.total_seconds())
            if self.bar is not None:
                self.bar.set_postfix_str(line, refresh=True)
            else:
                self._print(f"{self._prefix(state)} {line}")

    def eval_end(self, state: State, logger: Logger) -> None:
        self._print(f"{self._prefix(state)} {format_eval_line(self.latest)}")
        for name in [n for n in self.latest if n.startswith("metrics/eval/")]:
            del self.latest[name]  # the next evaluation prints only its own values

    def fit_end(self, state: State, logger: Logger) -> None:
        self.close(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
