"""Where a run's metrics go while it trains: Composer logger destinations.

`MetricsFile` appends every logged metric to RUN/metrics.jsonl, one JSON object per step ({"step": 120,
"time/token": 491520, "loss/train/total": 2.3, ...}), and redraws RUN/metrics.png at the end and after an
evaluation when the last drawing is a minute old (a drawing takes a second or two of CPU: at every evaluation it was
a fifth of a short run). `ConsoleLog` is what a person reads: one line per log interval and one per evaluation,

    [ 120/400  30%] loss 2.3412 | 10,030 tok/s | MFU 37.1% | lr 9.1e-04 | 1.2 min elapsed, 2.9 min left
    [ 140/400  35%] loss 2.2981 | 2,010 tok/s | MFU 7.4% (load 5.3 on 2 cores) | lr 9.0e-04 | 1.4 min elapsed, ...
    [ 200/400  50%] validation: loss 1.0100 | perplexity 2.75 | bits/byte 0.412

and on a terminal a progress bar that carries the same fields. The time left is from the last 50 batches
(`RecentPace`); the machine's load shows next to the throughput when it is above its cores (other processes
share them). Both only read what the callbacks and the
evaluation log; neither changes it. Two of those callbacks are here:

- `LearningRates` logs the learning rate each batch was trained at: `lr-base`, training.lr as scheduled (the
  console's `lr`), and every param group's under a name that says which group it is (`lr-AdamW/group0-decay`,
  `lr-Muon/group0-muon-decay`, `lr-AdamW/group2-block0-decay` under layer decay), as applied: a schedule-free
  optimizer's warmup included.
- `CheckedSpeedMonitor` is Composer's SpeedMonitor (tokens/s, FLOP/s, MFU over a window of batches) whose MFU
  never goes above 100% unremarked: a window faster than the peak probes the CPU again (rafale.run.hardware.check_peak).
"""

import collections
import json
import math
import os
import sys
import time
from pathlib import Path

from composer.callbacks import SpeedMonitor
from composer.core import Callback, Event, State, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from rafale.run.hardware import check_peak, describe_load, machine_load
from rafale.run.optim import layer_depth, num_blocks
from rafale.run_folder.plots import plot_run
from rafale.run_folder import METRICS_FILE


class MetricsFile(LoggerDestination):
    """Collects each step's metrics in memory and appends them to RUN/metrics.jsonl every `flush_every` steps,
    at each evaluation and at the end (no file I/O in most training steps); redraws RUN/metrics.png at the end, at
    an evaluation `redraw_s` seconds after the last drawing, and on closing (an interrupted run) if it evaluated
    since."""

    def __init__(self, run_dir: Path, flush_every: int = 50, redraw_s: float = 60.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.flush_every = flush_every
        self.pending: dict[int, dict] = {}
        self.redraw_s = redraw_s
        self.drawn_at = time.monotonic()
        self.evaluated_since_drawn = False

    def draw(self) -> None:
        plot_run(self.run_dir)
        self.drawn_at = time.monotonic()
        self.evaluated_since_drawn = False

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
        self.evaluated_since_drawn = True
        if time.monotonic() - self.drawn_at >= self.redraw_s:
            self.draw()

    def fit_end(self, state: State, logger: Logger) -> None:
        self.flush()
        self.draw()

    def close(self, state: State, logger: Logger) -> None:
        self.flush()
        if self.evaluated_since_drawn:
            self.draw()


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


# what a narrow progress bar leaves out first: the load remark, the time elapsed, the lr, the MFU, the throughput;
# the loss and the time left stay
DROPPED_FIRST = ("load", "elapsed", "lr", "mfu", "throughput")


def format_train_line(metrics: dict, elapsed_s: float, left_s: float | None = None,
                      load: tuple[float, int] | None = None, width: int | None = None) -> str:
    """'loss 2.3412 | 10,030 tok/s | MFU 37.1% | lr 9.1e-04 | 1.2 min elapsed, 2.9 min left' from what was logged,
    the time left (`left_s`, see RecentPace) and, when it is above the cores, the machine's `load` (load, cores)
    after the throughput: 'MFU 0.1% (load 5.3 on 2 cores)'. Given a `width` (a progress bar's room), the parts in
    DROPPED_FIRST go one by one until the line fits: 'loss 2.3412 | 10,030 tok/s | 2.9 min left'."""
    line = ""
    for k in range(len(DROPPED_FIRST) + 1):
        line = _train_line(metrics, elapsed_s, left_s, load, set(DROPPED_FIRST[:k]))
        if width is None or len(line) <= width:
            return line
    return line[:max(width, 0)]  # narrower than the loss and the time left: nothing better to show


def _train_line(metrics: dict, elapsed_s: float, left_s: float | None, load: tuple[float, int] | None,
                dropped: set) -> str:
    parts = []
    if "loss/train/total" in metrics:
        parts.append(f"loss {metrics['loss/train/total']:.4f}")
    measured = False  # a throughput figure shown, which the load remark qualifies
    if "throughput/tokens_per_sec" in metrics and "throughput" not in dropped:
        parts.append(f"{metrics['throughput/tokens_per_sec']:,.0f} tok/s")
        measured = True
    if "throughput/device/mfu" in metrics and "mfu" not in dropped:
        parts.append(f"MFU {metrics['throughput/device/mfu']:.1%}")
        measured = True
    busy = describe_load(*load) if load and "load" not in dropped else ""
    if busy and measured:
        parts[-1] += f" ({busy})"  # what the figure before it is measured under
    elif busy:
        parts.append(busy)
    # training.lr as scheduled (LearningRates); a group's rate only where nothing logs the base one
    lr = metrics.get(BASE_LR, next((v for k, v in metrics.items() if k.startswith("lr-")), None))
    if lr is not None and "lr" not in dropped:
        parts.append(f"lr {lr:.1e}")
    times = [] if left_s is not None and "elapsed" in dropped else [f"{elapsed_s / 60:.1f} min elapsed"]
    if left_s is not None:
        times.append(f"{left_s / 60:.1f} min left")
    return " | ".join(parts + [", ".join(times)])


BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {desc}"  # the figures after the bar, fitted to the width
UNSIZED_BAR_FORMAT = "{n_fmt} steps {desc}"  # a run whose length in batches is not known before the end


def bar_format(total: int | None) -> str:
    return BAR_FORMAT if total else UNSIZED_BAR_FORMAT


def bar_room(step: int, total: int | None, width: int) -> int:
    """The columns a progress bar of `width` leaves its figures, beside its counts and a bar of tqdm's 10 columns."""
    from tqdm import tqdm

    return width - len(tqdm.format_meter(step, total, 0, bar_format=bar_format(total), prefix=""))


def terminal_width(stream) -> int | None:
    """The columns of the terminal `stream` writes to; None when it is no terminal, or one whose size is unknown
    (it says 0 columns or 0 lines: `stty size` 0 0, some CI logs), where tqdm would draw nothing: such a stream
    gets the plain lines a log does."""
    try:
        if not stream.isatty():
            return None
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return size.columns if size.columns > 0 and size.lines > 0 else None


class RecentPace:
    """The time left, from the last `window` batches.

    Their wall time (evaluations and checkpoints among them included) gives the pace. The pace of the whole segment
    would count start-up and compiling, and a resumed run's remaining batches against the time of this process
    alone (Composer's RuntimeEstimator said 0.3 min left for a run that took 3.6 more)."""

    def __init__(self, window: int = 50):
        self.seen: collections.deque = collections.deque(maxlen=window + 1)  # (time.monotonic(), batch)

    def add(self, batch: int, now: float | None = None) -> None:
        self.seen.append((time.monotonic() if now is None else now, batch))

    def seconds_left(self, total: int | None) -> float | None:
        if total is None or len(self.seen) < 2:
            return None
        (start, first), (end, last) = self.seen[0], self.seen[-1]
        if last <= first:
            return None
        return (end - start) / (last - first) * max(total - last, 0)


def format_eval_line(metrics: dict, label: str = "eval") -> str:
    """'validation: loss 1.0100 | perplexity 2.75 | bits/byte 0.412' from the logged eval metrics (label "eval_ema",
    training.ema's evaluation: 'validation (EMA): ...')."""
    values = {name.rsplit("/", 1)[-1]: value for name, value in metrics.items() if name.startswith(f"metrics/{label}/")}
    parts = []
    for name, shown in EVAL_LABELS.items():
        if name in values:
            value = values[name]
            parts.append(f"{shown} {value:.2f}" if name == "LanguagePerplexity" and math.isfinite(value) else f"{shown} {value:.4f}")
    parts += [f"{name} {value:.4f}" for name, value in values.items() if name not in EVAL_LABELS]
    return ("validation: " if label == "eval" else "validation (EMA): ") + " | ".join(parts)


def eval_subset_batches(eval_batches: int | None, available: int) -> int:
    """Composer's `eval_subset_num_batches` for training.eval_batches: -1 (all) when unset, and never more than the
    validation loader's `available` batches, said once here (Composer would warn and clamp on its own)."""
    if eval_batches is None:
        return -1
    if eval_batches > available:
        if dist.get_global_rank() == 0:
            print(f"rafale: training.eval_batches is {eval_batches} but the validation split has {available} "
                  f"batch{'' if available == 1 else 'es'}: evaluating on {available}")
        return available
    return eval_batches


class ConsoleLog(LoggerDestination):
    """A person's view of the run: a line every `interval` (a Composer time string, training.log_interval) and one
    at each evaluation. On a terminal of known width (`columns`, read again at each line: a resized window), a tqdm
    progress bar shows the same fields, as many as fit (format_train_line's width), and the evaluation lines go above
    it; elsewhere (a log, a terminal of unknown size) the lines are printed."""

    def __init__(self, interval: str, stream=None, columns=None):
        self.stream = stream or sys.stdout
        self.columns = columns or (lambda: terminal_width(self.stream))  # () -> the width, None: no bar
        self.bar_wanted = self.columns() is not None
        self.due = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False)
        self.latest: dict[str, float] = {}
        self.bar = None
        self.total = None  # the run's length in batches, set once the training loader is (after_load)
        self.pace = RecentPace()

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

            self.bar = tqdm(total=self.total, initial=int(state.timestamp.batch), unit="step", file=self.stream,
                            ncols=self.columns(), bar_format=bar_format(self.total), leave=True)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.bar is not None:
            self.bar.update(int(state.timestamp.batch) - self.bar.n)
        self.pace.add(int(state.timestamp.batch))
        if self.due(state, Event.BATCH_END):
            figures = (self.latest, state.timestamp.total_wct.total_seconds(), self.pace.seconds_left(self.total),
                       machine_load())
            width = self.columns() if self.bar is not None else None
            if width is not None:  # the bar's figures fitted to the terminal, so that tqdm cuts nothing off
                self.bar.ncols = width
                room = bar_room(int(state.timestamp.batch), self.total, width)
                self.bar.set_description_str(format_train_line(*figures, width=room), refresh=True)
            else:  # no bar, or the terminal's size became unknown: the lines a log gets
                self._print(f"{self._prefix(state)} {format_train_line(*figures)}")
            # SpeedMonitor's figures are over its window as of the batch that logged them: a line shows fresh ones
            # only (no MFU from before CheckedSpeedMonitor found the peak wrong)
            for name in [n for n in self.latest if n.startswith("throughput/")]:
                del self.latest[name]

    def eval_end(self, state: State, logger: Logger) -> None:
        label = state.dataloader_label or "eval"  # "eval_ema": training.ema's evaluation (rafale/run/ema.py)
        self._print(f"{self._prefix(state)} {format_eval_line(self.latest, label)}")
        for name in [n for n in self.latest if n.startswith(f"metrics/{label}/")]:
            del self.latest[name]  # the next evaluation prints only its own values

    def fit_end(self, state: State, logger: Logger) -> None:
        self.close(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------------------------------
# callbacks that log what the console shows


BASE_LR = "lr-base"  # training.lr as scheduled, what the console's `lr` shows


def applied_lr(group: dict) -> float:
    """The rate a param group's last step applied. Schedule-free optimizers warm up inside step(), from the group's
    `lr` (which rafale's schedule holds constant for them), and record what they applied as `scheduled_lr`."""
    return float(group.get("scheduled_lr", group["lr"]))


def base_group(optimizer) -> dict:
    """The param group that learns at training.lr itself: the highest initial rate among the groups that are not
    Muon's (layer decay only lowers rates, training.layer_decay being at most 1, and leaves the head at training.lr;
    Muon's own groups, at its 0.02, are marked use_muon)."""
    groups = [g for g in optimizer.param_groups if not g.get("use_muon", False)] or optimizer.param_groups
    return max(groups, key=lambda g: g.get("initial_lr", g["lr"]))


def group_label(group: dict, names: list[str], num_layers: int) -> str:
    """Which parameters a group holds, in a few words joined by '-': Muon's part or AdamW's (under Muon); the
    embeddings, block i or the head when they are all at one depth (layer decay); decayed or not."""
    parts = ["muon" if group["use_muon"] else "adamw"] if "use_muon" in group else []
    depths = {layer_depth(name, num_layers) for name in names}
    if len(depths) == 1:
        depth = depths.pop()
        parts.append("embeddings" if depth == 0 else "head" if depth == num_layers + 1 else f"block{depth - 1}")
    parts.append("decay" if group.get("weight_decay") else "no_decay")
    return "-".join(parts)


class LearningRates(Callback):
    """After each batch, the learning rates it was trained at: `lr-base` (training.lr as scheduled, the console's
    `lr`) and each param group's applied rate as `lr-<optimizer class>/group<i>-<group_label>`.

    (Composer's LRMonitor logs each group's `lr` by its index only: a schedule-free warmup read as a flat rate, and
    the console's `lr`, group 0's, was the embeddings' reduced rate under layer decay and Muon's 0.02 under Muon.)"""

    def __init__(self):
        self.names: list[list[str]] | None = None  # per optimizer, per group: its metric name

    def group_names(self, state: State) -> list[list[str]]:
        model = getattr(state.model, "module", state.model)  # under DDP, the wrapped model
        param_names = {id(p): name for name, p in model.named_parameters()}
        num_layers = num_blocks(model)
        return [[f"lr-{type(optimizer).__name__}/group{i}-"
                 + group_label(group, [param_names[id(p)] for p in group["params"] if id(p) in param_names], num_layers)
                 for i, group in enumerate(optimizer.param_groups)]
                for optimizer in state.optimizers]

    def batch_end(self, state: State, logger: Logger) -> None:
        if not state.optimizers:
            return
        if self.names is None:
            self.names = self.group_names(state)
        metrics = {BASE_LR: applied_lr(base_group(state.optimizers[0]))}
        for optimizer, names in zip(state.optimizers, self.names):
            metrics.update((name, applied_lr(group)) for name, group in zip(names, optimizer.param_groups))
        logger.log_metrics(metrics)


class _Collect:
    """A stand-in for Composer's Logger that keeps what is logged (CheckedSpeedMonitor checks it before it goes on)."""

    def __init__(self):
        self.metrics: dict = {}

    def log_metrics(self, metrics: dict, step=None) -> None:
        self.metrics.update(metrics)


class CheckedSpeedMonitor(SpeedMonitor):
    """Composer's SpeedMonitor (window_size batches per figure) with MFU against `peak`, which it checks: a window
    that computed faster than the peak has rafale.run.hardware.check_peak probe the CPU again (one line), and the MFU
    goes on against the new peak, or stops being logged where the run is still faster (the peak or the FLOPs count
    is wrong; one line says so). So the console never shows an MFU above 100%. `device`: 'cpu' or 'gpu';
    `cache_dir`: the rafale cache whose cpu_peak.json gets the new peak (None: the new peak serves this run only)."""

    def __init__(self, window_size: int, peak: float | None, device: str, cache_dir: Path | None = None):
        super().__init__(window_size=window_size, gpu_flops_available=peak)
        self.device = device
        self.cache_dir = cache_dir

    def batch_end(self, state: State, logger: Logger) -> None:
        window = _Collect()
        super().batch_end(state, window)
        metrics = window.metrics
        achieved = metrics.get("throughput/device/flops_per_sec")
        if achieved is not None and self.gpu_flops_available and achieved > self.gpu_flops_available:
            model = getattr(state.model, "module", state.model)
            # the dtype the probe must multiply in: the model's own CPU autocast (bf16), else fp32
            self.gpu_flops_available = check_peak(achieved, self.gpu_flops_available, self.device,
                                                  getattr(model, "autocast_dtype", None), self.cache_dir)
            metrics.pop("throughput/device/mfu", None)
            if self.gpu_flops_available:
                metrics["throughput/device/mfu"] = achieved / self.gpu_flops_available
            # the next window starts after the probe, whose seconds are no training time
            for history in (self.history_samples, self.history_tokens, self.history_wct, self.history_flops):
                history.clear()
        logger.log_metrics(metrics)
