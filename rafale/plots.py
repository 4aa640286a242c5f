"""A run's metrics in pictures and tables, read from RUN/metrics.jsonl (written by rafale.loggers.MetricsFile).

`plot_run` draws RUN/metrics.png: train and validation loss, perplexity or accuracy, learning rate and
throughput, against steps (bottom axis) and tokens (top axis). This module imports neither torch nor Composer,
so `rafale plot` and `rafale runs` answer at once.

    rafale plot RUN [RUN ...] [--out FILE]     overlay several runs' losses against tokens
"""

import argparse
import itertools
import json
from pathlib import Path

from rafale.errors import RafaleError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TRAIN_LOSS = "loss/train/total"
VAL_LOSSES = ("metrics/eval/LanguageCrossEntropy", "metrics/eval/CrossEntropy", "metrics/eval/ContrastiveLoss")
VAL_QUALITY = ("metrics/eval/LanguagePerplexity", "metrics/eval/BitsPerByte", "metrics/eval/Accuracy",
               "metrics/eval/MaskedAccuracy", "metrics/eval/F1", "metrics/eval/ZeroShotAccuracy",
               "metrics/eval/ZeroShotHeldOutAccuracy", "metrics/eval/ImageToTextRecall@1",
               "metrics/eval/TextToImageRecall@1")


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
    colours = plt.get_cmap("tab10" if len(run_dirs) <= 10 else "tab20").colors  # one colour per run, never reused
    for run_dir, colour in zip(run_dirs, itertools.cycle(colours)):
        series = read_metrics(run_dir)
        per_step = tokens_per_step(series) or 1.0
        for names, style, kind, alpha in (([TRAIN_LOSS], "-", "train", 0.35), (VAL_LOSSES, "o--", "validation", 1.0)):
            for name in names:
                if series.get(name):
                    steps, values = zip(*series[name])
                    # a run's training loss in a lighter shade of its colour, labelled once (by its validation)
                    ax.plot([s * per_step for s in steps], values, style, ms=4, color=colour, alpha=alpha,
                            label=Path(run_dir).name if kind == "validation" else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="validation (dots); training (light line)", title_fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


SUMMARY_FILE = "summary.json"  # written by rafale.record.RunRecord (a training run) or write_eval_record
# columns of `rafale runs`: header -> the summary's validation metric it shows
TABLE_METRICS = {"val loss": ("LanguageCrossEntropy", "CrossEntropy", "ContrastiveLoss"),
                 "ppl": ("LanguagePerplexity",), "bits/byte": ("BitsPerByte",),
                 "accuracy": ("Accuracy", "MaskedAccuracy", "ZeroShotAccuracy")}


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders among `paths`: each path is a run folder, or a folder of them (like runs/)."""
    found = []
    for path in paths:
        if (path / METRICS_FILE).is_file() or (path / SUMMARY_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if (p / METRICS_FILE).is_file() or (p / SUMMARY_FILE).is_file())
        else:
            raise RafaleError(f"no such run folder: {path}")
    if not found:
        raise RafaleError(f"no run folders in {', '.join(map(str, paths))} (a run folder holds {METRICS_FILE})")
    return found


def run_row(run_dir: Path) -> dict:
    """One run's line of the table: its summary.json, or for a run that never finished, its last logged values."""
    if (run_dir / SUMMARY_FILE).is_file():
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    else:
        series = read_metrics(run_dir)
        last = {name.rsplit("/", 1)[-1]: points[-1][1] for name, points in series.items() if name.startswith("metrics/eval/")}
        tokens = series.get("time/token", [(0, 0)])[-1][1]
        summary = {"name": run_dir.name, "model": "(unfinished)", "tokens": int(tokens), "validation": last}
    status = summary.get("status", "complete")  # a summary of a run that stopped or failed says where it stands
    model = summary.get("model", "?") + ("" if status == "complete" else f" ({status} at batch {summary.get('batches')})")
    row = {"run": summary["name"], "model": model,
           "params": f"{summary['parameters'] / 1e6:.2f}M" if summary.get("parameters") else "",
           "tokens": f"{summary.get('tokens', 0):,}",
           "wall": f"{summary['wall_time_s'] / 60:.1f} min" if summary.get("wall_time_s") else "",
           "tok/s": f"{summary['tokens_per_s']:,.0f}" if summary.get("tokens_per_s") else ""}
    validation = summary.get("validation", {})
    for header, names in TABLE_METRICS.items():
        value = next((validation[n] for n in names if n in validation), None)
        row[header] = "" if value is None else f"{value:.4f}"
    return row


def runs_table(run_dirs: list[Path]) -> str:
    """A fixed-width table of runs, one line each (columns with no value in any run are left out)."""
    rows = [run_row(d) for d in run_dirs]
    headers = [h for h in rows[0] if any(r[h] for r in rows)]
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    lines = ["  ".join(h.ljust(widths[h]) for h in headers), "  ".join("-" * widths[h] for h in headers)]
    lines += ["  ".join(r[h].ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def runs_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale runs", description="One line per run: model, size, tokens, time and final validation metrics.",
        epilog="example: rafale runs runs/     (every run folder under runs/)")
    parser.add_argument("paths", nargs="*", default=["runs"], help="run folders, or folders of runs (default: runs)")
    args = parser.parse_args(argv)
    print(runs_table(run_folders([Path(p).expanduser() for p in args.paths])))
    return 0


def plot_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale plot", description="Draw one run's curves, or overlay several runs.",
        epilog="example: rafale plot runs/a runs/b --out both.png")
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
