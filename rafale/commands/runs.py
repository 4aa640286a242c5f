"""`rafale runs` and `rafale plot`: compare run folders (rafale/run_folder/plots.py draws the pictures and the table).

    rafale plot RUN [RUN ...] [--out FILE]     overlay several runs' losses against tokens
    rafale runs [DIR ...] [--sort KEY] [--reverse] [--csv] [--columns A,B] [--all] [--where 'N>1e6']
                                               one line per run (every run folder under DIR, at any
                                               depth; default runs/), best final validation first, a table
                                               per task and data source, as wide as the terminal; N (non-embedding
                                               parameters), tokens (D) and C (training FLOPs) among the columns;
                                               runs that differ only in run.seed are one line, their arm
                                               (rafale/run_folder/arms.py: mean, 95% interval, sd, n), unless --runs

Neither imports torch nor Composer, so both answer at once.
"""

import argparse
import shutil
from pathlib import Path

from rafale.run_folder.arms import arms_table, has_seeds
from rafale.errors import RafaleError
from rafale.run_folder.plots import plot_run, plot_runs, runs_table
from rafale.run_folder import METRICS_FILE, SUMMARY_FILE


def is_run_folder(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / SUMMARY_FILE).is_file()


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders among `paths`: each path is a run folder, or a folder holding run folders at any depth
    (runs/, with a sweep's runs in runs/law/; see nested_run_folders)."""
    found = []
    for path in paths:
        if is_run_folder(path):
            found.append(path)
        elif path.is_dir():
            found += nested_run_folders(path)
        else:
            raise RafaleError(f"no such run folder: {path}")
    if not found:
        raise RafaleError(f"no run folders in {', '.join(map(str, paths))} or below (a run folder holds {METRICS_FILE})")
    return found


def nested_run_folders(folder: Path) -> list[Path]:
    """The run folders below `folder`, at any depth, sorted by path. A run folder's own sub-folders (checkpoints/,
    export/, evals/<time>/, which hold a summary.json of their own) are not searched, nor linked folders that are
    not run folders (a link can loop)."""
    found = []
    for child in sorted(path for path in folder.iterdir() if path.is_dir()):
        if is_run_folder(child):
            found.append(child)
        elif not child.is_symlink():
            found += nested_run_folders(child)
    return found


def runs_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale runs", description="One line per run: the hyperparameters that differ between the runs (from "
        "each config.yaml), model, size, tokens, time and final validation metrics; best final validation first. "
        "Runs of different tasks or data sources are listed in separate tables, each ranked on its own. The table "
        "fits the terminal: the columns left out are named below it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  rafale runs runs/                              every run folder under runs/, best final validation first\n"
        "  rafale runs runs/ --sort tokens                by tokens trained, fewest first\n"
        "  rafale runs runs/ --columns tokens,bits/byte   only these columns (and run)\n"
        "  rafale runs runs/ --runs                       one line per run, where runs differ only in their seed")
    parser.add_argument("paths", nargs="*", default=["runs"], help="run folders, or folders holding run folders at "
                        "any depth (default: runs, with runs/law/* and the like)")
    parser.add_argument("--sort", metavar="KEY", help="sort by this column: a hyperparameter that differs between "
                        "the runs (lr, optimizer.name, or its whole key) or a metric (val loss, bits/byte, tok/s, "
                        "...); lowest first, accuracy highest first")
    parser.add_argument("--reverse", action="store_true", help="the other way round")
    parser.add_argument("--where", action="append", default=[], metavar="COND",
                        help="only the runs where COND holds: COLUMN OP VALUE, OP one of < <= > >= = != (e.g. "
                        "'N>1e6', 'C<3e12', 'optimizer.name=soap'); repeatable, all must hold. N: non-embedding "
                        "parameters, D: tokens, C: training FLOPs (flops_per_token x D)")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of a fixed-width table: every column, "
                        "plain numbers in base units, the unit in the header (tokens, wall_s, params, tok_per_s, ...)")
    parser.add_argument("--columns", metavar="A,B", help="show these columns (and run), comma-separated, however wide")
    parser.add_argument("--all", action="store_true", help="show every column, however wide the table")
    parser.add_argument("--runs", action="store_true", help="one line per run where runs differ only in run.seed "
                        "(by default such runs are one line, their arm: the mean final validation, its 95%% "
                        "interval, sd, n and seeds; with --csv, as plain numbers)")
    args = parser.parse_args(argv)
    runs = run_folders([Path(p).expanduser() for p in args.paths])
    width = None if args.all else shutil.get_terminal_size().columns
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    table = arms_table if has_seeds(runs) and not args.runs else runs_table  # some runs are seeds of one arm
    print(table(runs, args.sort, args.reverse, args.csv, width, columns, args.where))
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
