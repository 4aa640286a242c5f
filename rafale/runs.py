"""`rafale runs` and `rafale plot`: compare run folders (rafale/plots.py draws the pictures and the table).

    rafale plot RUN [RUN ...] [--out FILE]     overlay several runs' losses against tokens
    rafale runs DIR [DIR ...] [--sort KEY] [--reverse] [--csv]
                                               one line per run, best final validation first

Neither imports torch nor Composer, so both answer at once.
"""

import argparse
from pathlib import Path

from rafale.errors import RafaleError
from rafale.plots import plot_run, plot_runs, runs_table
from rafale.run_folder import METRICS_FILE, SUMMARY_FILE


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


def runs_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale runs", description="One line per run: the hyperparameters that differ between the runs (from "
        "each config.yaml), model, size, tokens, time and final validation metrics; best final validation first.",
        epilog="example: rafale runs runs/ --sort lr     (every run folder under runs/, by training.lr)")
    parser.add_argument("paths", nargs="*", default=["runs"], help="run folders, or folders of runs (default: runs)")
    parser.add_argument("--sort", metavar="KEY", help="sort by this column: a hyperparameter (lr, optimizer.name, "
                        "or its whole key) or a metric (val loss, bits/byte, tok/s, ...); lowest first, accuracy "
                        "highest first")
    parser.add_argument("--reverse", action="store_true", help="the other way round")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of a fixed-width table")
    args = parser.parse_args(argv)
    runs = run_folders([Path(p).expanduser() for p in args.paths])
    print(runs_table(runs, args.sort, args.reverse, args.csv))
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
