"""A run's metrics on disk and in pictures.

`MetricsFile` is a Composer logger destination that appends every logged metric to RUN/metrics.jsonl, one JSON
object per step ({"step": 120, "time/token": 491520, "loss/train/total": 2.3, ...}), and redraws RUN/metrics.png
after each evaluation and at the end: train and validation loss, perplexity or accuracy, learning rate and
throughput, against steps (bottom axis) and tokens (top axis).

    rafale plot RUN [RUN ...] [--out FILE]     overlay several runs' losses against tokens
"""

import argparse
import json
from pathlib import Path

from composer.core import State
from composer.loggers import Logger, LoggerDestination

from rafale.config import RafaleError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TRAIN_LOSS = "loss/train/total"
VAL_LOSSES = ("metrics/eval/LanguageCrossEntropy", "metrics/eval/CrossEntropy")
VAL_QUALITY = ("metrics/eval/LanguagePerplexity", "metrics/eval/Accuracy", "metrics/eval/MaskedAccuracy", "metrics/eval/F1")


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


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)], sorted by step; a resumed run's repeated steps keep their last value."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RafaleError(f"{run_dir}: no {METRICS_FILE} (is it a rafale run folder?)")
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        for name, value in row.items():
            series.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in series.items()}


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


def tokens_per_step(series) -> float | None:
    points = series.get("time/token")
    if not points or points[-1][0] == 0:
        return None
    return points[-1][1] / points[-1][0]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the run's curves into RUN/metrics.png (or `out`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series = read_metrics(run_dir)
    panels = [
        ("loss", [(TRAIN_LOSS, "train")] + [(name, "validation") for name in VAL_LOSSES]),
        ("validation", [(name, name.rsplit("/", 1)[-1]) for name in VAL_QUALITY]),
        ("learning rate", [(name, name.split("/", 1)[0]) for name in series if name.startswith("lr-")][:1]),
        ("tokens / s", [("throughput/tokens_per_sec", "throughput")]),
    ]
    per_step = tokens_per_step(series)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, curves) in zip(axes.flat, panels):
        drawn = False
        for name, label in curves:
            if series.get(name):
                steps, values = zip(*series[name])
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
            if title == "validation" and series.get(VAL_QUALITY[0]):
                ax.set_yscale("log")  # perplexity falls by orders of magnitude
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        if per_step:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step / 1e6, lambda t: t * 1e6 / per_step))
            top.set_xlabel("tokens (millions)")
    fig.suptitle(run_dir.name)
    out = Path(out) if out else run_dir / PLOT_FILE
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Overlay the train and validation losses of several runs against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for run_dir in run_dirs:
        series = read_metrics(run_dir)
        per_step = tokens_per_step(series) or 1.0
        for names, style, kind in (([TRAIN_LOSS], "-", "train"), (VAL_LOSSES, "o--", "validation")):
            for name in names:
                if series.get(name):
                    steps, values = zip(*series[name])
                    ax.plot([s * per_step for s in steps], values, style, ms=4, label=f"{Path(run_dir).name} {kind}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="rafale plot", description="Draw one run's curves, or overlay several runs.")
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--out", help="PNG file (default: RUN/metrics.png for one run, runs.png for several)")
    args = parser.parse_args(argv)
    runs = [Path(r).expanduser() for r in args.runs]
    if len(runs) == 1:
        out = plot_run(runs[0], Path(args.out) if args.out else None)
    else:
        out = plot_runs(runs, Path(args.out or "runs.png"))
    print(f"rafale: wrote {out}")
    return 0
