"""A run's metrics in pictures and tables, read from RUN/metrics.jsonl (written by rafale.run.loggers.MetricsFile).

`plot_run` draws RUN/metrics.png: train and validation loss, perplexity or accuracy (bits per byte on an axis of
its own), learning rate and throughput, against steps (bottom axis) and tokens (top axis); the run draws it at each
evaluation, `rafale plot` on demand. This module imports neither torch nor Composer, so `rafale plot` and
`rafale runs` (rafale/commands/runs.py) answer at once. `rafale runs` lists runs of different tasks or data
sources in separate tables (`comparable_groups`), each fitted to the terminal's width (`fitting_columns`). The run folder is read through rafale/run_folder/__init__.py.

Comparing runs starts from what differs between them: `what_differs` reads each run's config.yaml, flattens it
to dotted keys (`training.optimizer.name`) and keeps the keys whose values are not the same in every run,
named without their section where that is unambiguous (`optimizer.name`, `lr`). Those are the extra columns
of `rafale runs` and the legend of an overlay (`lr=3e-3 optimizer.name=soap`).
"""

import csv
import io
import itertools
import json
import operator
import os
import re
from pathlib import Path

from rafale.errors import RafaleError
from rafale.run_folder import PLOT_FILE, SUMMARY_FILE, VAL_LOSSES, read_config, read_metrics

TRAIN_LOSS = "loss/train/total"
VAL_QUALITY = ("metrics/eval/LanguagePerplexity", "metrics/eval/BitsPerByte", "metrics/eval/Accuracy",
               "metrics/eval/MaskedAccuracy", "metrics/eval/F1", "metrics/eval/ZeroShotAccuracy",
               "metrics/eval/ZeroShotHeldOutAccuracy", "metrics/eval/ImageToTextRecall@1",
               "metrics/eval/TextToImageRecall@1")
PERPLEXITY, BITS_PER_BYTE = "metrics/eval/LanguagePerplexity", "metrics/eval/BitsPerByte"


def tokens_per_step(series) -> float | None:
    points = series.get("time/token")
    if not points or points[-1][0] == 0:
        return None
    return points[-1][1] / points[-1][0]


def pyplot():
    """matplotlib.pyplot on the Agg backend, which draws to files and needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_axis(axis) -> None:
    """A log-scale axis whose labels read 8, 20, 0.5 (matplotlib's default writes 8x10^0 at the minor ticks of a
    loss axis that spans less than a decade); which ticks get a label is still matplotlib's choice."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def draw_curves(ax, series, curves, color=None) -> list:
    """Plot against steps each (metric, label) of `curves` that the run logged; returns the lines drawn."""
    lines = []
    for name, label in curves:
        if series.get(name):
            steps, values = zip(*series[name])
            lines += ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label, color=color)
    return lines


def draw_validation(ax, series) -> list:
    """Perplexity (log scale) or accuracy on `ax`, and bits per byte on an axis of its own at the right: on
    perplexity's log scale a fall from 3.1 to 1.8 bits per byte would look flat. Returns the lines drawn."""
    lines = draw_curves(ax, series, [(name, name.rsplit("/", 1)[-1]) for name in VAL_QUALITY if name != BITS_PER_BYTE])
    if series.get(PERPLEXITY):
        ax.set_yscale("log")  # perplexity falls by orders of magnitude
        plain_log_axis(ax.yaxis)
        ax.set_ylabel("perplexity")
    if series.get(BITS_PER_BYTE):
        bits_ax = ax.twinx() if lines else ax
        lines += draw_curves(bits_ax, series, [(BITS_PER_BYTE, "bits per byte")], color=f"C{len(lines)}")
        bits_ax.set_ylabel("bits per byte")
    return lines


def run_figure(run_dir: Path):
    """The figure of RUN/metrics.png: loss, validation quality, learning rate and throughput, against steps
    (bottom axis) and tokens (top axis)."""
    plt = pyplot()
    run_dir = Path(run_dir)
    series = read_metrics(run_dir)
    panels = [
        ("loss", [(TRAIN_LOSS, "train")] + [(name, "validation") for name in VAL_LOSSES]),
        ("validation", None),  # drawn by draw_validation
        ("learning rate", [(name, name.split("/", 1)[0]) for name in series if name.startswith("lr-")][:1]),
        ("tokens / s", [("throughput/tokens_per_sec", "throughput")]),
    ]
    per_step = tokens_per_step(series)
    # fixed margins: matplotlib's constrained layout measures every label to place them, half of the drawing's
    # CPU (0.7 of 1.4 s), and a run draws this at its end and at evaluations a minute apart
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    fig.subplots_adjust(left=0.08, right=0.93, top=0.87, bottom=0.07, hspace=0.55, wspace=0.3)
    for ax, (title, curves) in zip(axes.flat, panels):
        lines = draw_validation(ax, series) if curves is None else draw_curves(ax, series, curves)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(handles=lines, fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        if per_step:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step / 1e6, lambda t: t * 1e6 / per_step))
            top.set_xlabel("tokens (millions)")
    fig.suptitle(run_dir.name)
    return fig


def save_figure(fig, out: Path) -> Path:
    """Write `fig` to the PNG `out` through a temporary file, so a reader never sees half a picture."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    tmp.replace(out)
    return out


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the run's curves into RUN/metrics.png (or `out`)."""
    return save_figure(run_figure(run_dir), Path(out) if out else Path(run_dir) / PLOT_FILE)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's name in a legend: the hyperparameters that differ between the runs (`lr=3e-3
    optimizer.name=soap`), or its folder name where nothing differs (or it has no config.yaml)."""
    return [" ".join(f"{key}={value}" for key, value in settings.items() if value) or Path(run_dir).name
            for run_dir, settings in zip(run_dirs, what_differs(run_dirs))]


def runs_figure(run_dirs: list[Path]):
    """The train and validation losses of several runs against tokens, each run labelled by what differs; a series
    of one or two points (a run evaluated once, at its end) is drawn as markers, not joined."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    colours = plt.get_cmap("tab10" if len(run_dirs) <= 10 else "tab20").colors  # one colour per run, never reused
    for run_dir, label, colour in zip(run_dirs, run_labels(run_dirs), itertools.cycle(colours)):
        series = read_metrics(run_dir)
        per_step = tokens_per_step(series) or 1.0
        for names, style, kind, alpha in (([TRAIN_LOSS], "-", "train", 0.35), (VAL_LOSSES, "o--", "validation", 1.0)):
            for name in names:
                if series.get(name):
                    steps, values = zip(*series[name])
                    # a run's training loss in a lighter shade of its colour, labelled once (by its validation);
                    # one or two points are markers alone: a line from the first to the last would read as a curve
                    ax.plot([s * per_step for s in steps], values, style if len(steps) > 2 else "o", ms=4,
                            color=colour, alpha=alpha, label=label if kind == "validation" else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="validation (dots); training (light line)", title_fontsize=8)
    return fig


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Overlay the train and validation losses of several runs against tokens, into the PNG `out`."""
    return save_figure(runs_figure(run_dirs), out)


# columns of `rafale runs`: header -> the summary's validation metric it shows
TABLE_METRICS = {"val loss": ("LanguageCrossEntropy", "CrossEntropy", "ContrastiveLoss"),
                 "ppl": ("LanguagePerplexity",), "bits/byte": ("BitsPerByte",),
                 "accuracy": ("Accuracy", "MaskedAccuracy", "ZeroShotAccuracy")}


# config keys that say where and how a run was kept, not what was trained: never a column or a legend
NOT_HYPERPARAMETERS = {"run.name", "run.output_dir", "run.autoresume", "run.restart", "run.resume_fallback",
                       "run.loggers", "run.wandb_project", "data.num_proc", "data.num_workers", "data.cache_dir",
                       "training.log_interval", "training.checkpoints_to_keep", "training.trust_checkpoint"}
# the columns that rank runs, best first: a validation loss, lowest first; else an accuracy, highest first
RANKING_COLUMNS = ("val loss", "accuracy")
HIGHEST_FIRST = {"accuracy"}


def short_names(keys: list[str]) -> dict[str, str]:
    """Dotted key -> the key without its section ('training.optimizer.name' -> 'optimizer.name'), or the whole
    key where two keys would then read the same ('run.seed' and 'data.seed' stay as they are)."""
    rest = {key: key.partition(".")[2] or key for key in keys}
    return {key: short if list(rest.values()).count(short) == 1 else key for key, short in rest.items()}


def format_value(value) -> str:
    """A config value as the command line would spell it: 3e-3, 0.95, true, null, [0.9,0.95], soap."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    return escaped(str(value))


def escaped(text: str) -> str:
    """`text` on one line: a line break, a tab or another control character as its escape (data.doc_separator
    "\n" reads `\n`), so that a table row stays one line; other characters (accents, emoji) as they are."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def differing_keys(configs: list[dict | None]) -> list[str]:
    """The hyperparameters (dotted keys, in config order) whose values are not the same in all the configs given
    (None: a run without config.yaml, left out); a key that only some configs have counts as differing."""
    known = [config for config in configs if config is not None]
    return [key for key in dict.fromkeys(key for config in known for key in config) if key not in NOT_HYPERPARAMETERS
            and len({json.dumps(config.get(key), sort_keys=True) for config in known}) > 1]


def what_differs(run_dirs: list[Path], leave_out: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """For each run, short key -> its value of every hyperparameter that is not the same in all the runs with a
    config.yaml (see differing_keys), in config order, but the dotted keys `leave_out`. A run without a
    config.yaml, or without that key, has '' there."""
    configs = [read_config(run_dir) for run_dir in run_dirs]
    keys = [key for key in differing_keys(configs) if key not in leave_out]
    names = short_names(keys)
    return [{names[key]: format_value(config[key]) if config is not None and key in config else "" for key in keys}
            for config in configs]


def run_summary(run_dir: Path) -> dict:
    """The run's summary.json, or for a run that never wrote one, its name, tokens and last logged evaluation."""
    if (run_dir / SUMMARY_FILE).is_file():
        return json.loads((run_dir / SUMMARY_FILE).read_text())
    series = read_metrics(run_dir)
    last = {name.rsplit("/", 1)[-1]: points[-1][1] for name, points in series.items() if name.startswith("metrics/eval/")}
    tokens = series.get("time/token", [(0, 0)])[-1][1]
    return {"name": run_dir.name, "model": "(unfinished)", "tokens": int(tokens), "validation": last}


def run_row(run_dir: Path) -> dict:
    """One run's line of the table: its summary.json, or for a run that never finished, its last logged values."""
    summary = run_summary(run_dir)
    status = summary.get("status", "complete")  # a summary of a run that stopped or failed says where it stands
    model = summary.get("model", "?") + ("" if status == "complete" else f" ({status} at batch {summary.get('batches')})")
    row = {"run": summary["name"], "model": model,
           "params": f"{summary['parameters'] / 1e6:.2f}M" if summary.get("parameters") else "",
           "N": short_number(summary.get("non_embedding_parameters")),
           "tokens": f"{summary.get('tokens', 0):,}",
           "C": short_number(summary.get("training_flops")),
           "wall": f"{summary['wall_time_s'] / 60:.1f} min" if summary.get("wall_time_s") else "",
           "tok/s": f"{summary['tokens_per_s']:,.0f}" if summary.get("tokens_per_s") else ""}
    validation = summary.get("validation", {})
    for header, names in TABLE_METRICS.items():
        value = next((validation[n] for n in names if n in validation), None)
        row[header] = "" if value is None else f"{value:.4f}"
    return row


def short_number(value) -> str:
    """6.63e4 for 66,304: three digits, in a spelling float() reads back (for --sort and --where)."""
    if value is None:
        return ""
    return f"{value:.2e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def ranking_column(rows: list[dict]) -> str | None:
    """The column that ranks these runs: their final validation loss, or accuracy where no run has a loss."""
    return next((header for header in RANKING_COLUMNS if any(row.get(header) for row in rows)), None)


def sort_value(text: str):
    """A cell as it sorts: by its leading number where it has one ('10,240', '0.17M', '2.5 min', '3e-3'), else
    by its text."""
    try:
        return 0, float(text.split()[0].replace(",", "").rstrip("M")), ""
    except ValueError:
        return 1, 0.0, text


def sort_rows(rows: list[dict], column: str, reverse: bool = False) -> list[dict]:
    """Rows by `column`, lowest first (highest first for an accuracy; `reverse` turns either round); the rows
    with nothing in that column last."""
    filled = [row for row in rows if row.get(column)]
    descending = (column in HIGHEST_FIRST) != reverse
    return sorted(filled, key=lambda row: sort_value(row[column]), reverse=descending) + [
        row for row in rows if not row.get(column)]


COLUMN_ALIASES = {"D": "tokens"}  # a scaling law's name for a column


def find_column(key: str, headers: list[str], option: str = "--sort") -> str:
    """The column `--sort key` means: a header, or a dotted config key whose short name is one ('training.lr')."""
    for header in (key, key.partition(".")[2], COLUMN_ALIASES.get(key)):
        if header in headers:
            return header
    raise RafaleError(f"{option} {key}: no such column; the columns are {', '.join(headers)}")


WHERE = re.compile(r"\s*(.+?)\s*(<=|>=|!=|==|=|<|>)\s*(.+?)\s*")
COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "=": operator.eq,
           "==": operator.eq, "!=": operator.ne}


def where_rows(rows: list[dict], condition: str) -> list[dict]:
    """The rows that meet `condition`, 'COLUMN OP VALUE' (N>1e6, C<=3e12, optimizer.name=soap, val loss<2): numbers
    compared as numbers (a cell by its leading number, as --sort reads it), anything else as text. A row with
    nothing in that column is left out."""
    match = WHERE.fullmatch(condition)
    if match is None:
        raise RafaleError(f"--where {condition!r}: expected COLUMN OP VALUE with OP one of < <= > >= = != "
                          "(e.g. 'N>1e6')")
    key, op, wanted = match.groups()
    column = find_column(key, list(rows[0]) if rows else [], "--where")
    (wanted_kind, wanted_number, _) = sort_value(wanted)
    kept = []
    for row in rows:
        cell = row.get(column, "")
        if not cell:
            continue
        kind, number, text = sort_value(cell)
        if kind == 0 and wanted_kind == 0:
            keep = COMPARE[op](number, wanted_number)
        elif op in ("=", "==", "!="):
            keep = COMPARE[op](cell, wanted)
        else:
            raise RafaleError(f"--where {condition!r}: {column} holds {cell!r}, which {op} cannot compare with "
                              f"{wanted!r}")
        if keep:
            kept.append(row)
    return kept


def table_rows(run_dirs: list[Path], sort: str | None = None, reverse: bool = False,
               where: list[str] = ()) -> tuple[list[str], list[dict]]:
    """The headers (those with a value in some run) and the rows of `rafale runs`: run, the hyperparameters that
    differ, then run_row's columns; only the rows that meet every `where` condition (see where_rows); best final
    validation first, or by the column `sort`."""
    rows = [{"run": row.pop("run"), **settings, **row, "_dir": run_dir}
            for row, settings, run_dir in zip(map(run_row, run_dirs), what_differs(run_dirs), run_dirs)]
    for row, name in zip(rows, names_apart(run_dirs, [row["run"] for row in rows])):
        row["run"] = name
    for condition in where:
        rows = where_rows(rows, condition)
    if not rows:
        raise RafaleError(f"no run meets --where {' and '.join(where)}")
    column = find_column(sort, list(rows[0])) if sort else ranking_column(rows)
    if column:
        rows = sort_rows(rows, column, reverse)
    elif reverse:
        rows = rows[::-1]
    return [header for header in rows[0] if not header.startswith("_") and any(row[header] for row in rows)], rows


def names_apart(run_dirs: list[Path], names: list[str]) -> list[str]:
    """The runs' names, but a name two runs share (one in runs/law, one in runs/old) is the run's path relative to
    the folder that holds all the runs (law/law-hs48, old/law-hs48)."""
    if len(set(names)) == len(names):
        return names
    top = Path(os.path.commonpath([Path(run_dir).absolute().parent for run_dir in run_dirs]))
    return [str(Path(run_dir).absolute().relative_to(top)) if names.count(name) > 1 else name
            for run_dir, name in zip(run_dirs, names)]


def comparable_groups(run_dirs: list[Path]) -> list[tuple[str, list[Path]]]:
    """The runs in groups whose figures compare: the same task (a classifier's loss is not a language model's)
    on the same data source. (title, runs) in the order the groups first appear; a run without config.yaml joins
    the first group of its summary's task, one without either the first group."""
    found = []  # (task, data or None, run)
    for run_dir in run_dirs:
        config = read_config(run_dir)
        summary = json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).is_file() else {}
        task = summary.get("task") or (config or {}).get("model.task")
        source = {key: value for key, value in (config or {}).items() if key.startswith("data.source")}
        data = None if config is None else format_value(source.get("data.source")) if list(source) == ["data.source"] \
            else json.dumps({key.removeprefix("data.source."): value for key, value in source.items()})
        found.append((task, data, run_dir))
    groups: dict[tuple[str, str], list[Path]] = {}
    for task, data, run_dir in found:
        if task is None:  # neither summary.json nor config.yaml (a run killed early): with the first runs
            task, data = next(((t, d) for t, d, _ in found if t is not None), ("unknown task", "unknown data"))
        if data is None:
            data = next((d for t, d, _ in found if t == task and d is not None), "unknown data")
        groups.setdefault((task, data), []).append(run_dir)
    return [(f"{task} on {data}", runs) for (task, data), runs in groups.items()]


# the columns kept first when a table must fit the terminal: the run, its final validation, what differs between
# the runs (in config order), then the rest in this order
KEPT_FIRST = ("run", "val loss", "accuracy", "bits/byte", "ppl")
KEPT_LAST = ("model", "params", "tokens", "wall", "tok/s")


def fitting_columns(headers: list[str], rows: list[dict], width: int | None, wanted: list[str] | None = None) -> list[str]:
    """The headers shown: `wanted` (with run) when given; else all that fit in `width` characters, dropping the
    columns of least use first (KEPT_LAST from its end, then the hyperparameters from the last); None: all."""
    if wanted:
        return [header for header in headers if header == "run" or header in wanted]
    if width is None:
        return headers
    priority = ([h for h in KEPT_FIRST if h in headers] + [h for h in headers if h not in KEPT_FIRST + KEPT_LAST]
                + [h for h in KEPT_LAST if h in headers])
    shown = list(headers)
    while len(shown) > 1 and _table_width(shown, rows) > width:
        shown.remove(next(h for h in reversed(priority) if h in shown))
    return shown


MIN_RUN_WIDTH = 24  # the run column is never cut shorter than this


def fit_run_names(rows: list[dict], headers: list[str], width: int | None) -> tuple[list[dict], str | None]:
    """The rows with their run names short enough that the final validation columns (KEPT_FIRST) fit beside them
    in `width` characters, and the line that says so above the table (None when nothing was shortened): the
    prefix every name shares (up to a `-`) is dropped and said once, and a name still longer than half the width
    (or than the room the metrics leave) loses its middle, marked `…`. Names are kept whole where shortening
    would make two alike, and with `width` None (--all)."""
    names = [row["run"] for row in rows]
    metrics = [header for header in KEPT_FIRST if header in headers and header != "run"]
    if width is None or not rows:
        return rows, None
    room = max(MIN_RUN_WIDTH, min(width // 2, width - (_table_width(metrics, rows) + 2 if metrics else 0)))
    if max(map(len, names)) <= room:
        return rows, None
    prefix = common_prefix(names)
    short = [middle_cut(name[len(prefix):], room) for name in names]
    if len(set(short)) < len(set(names)):
        return rows, None
    said = "; ".join([f"run: without the start every name shares, {prefix}"] * bool(prefix)
                     + ["run: … marks a long name's middle left out"] * any("…" in name for name in short)
                     + ["--all shows whole names"]).replace("; run:", ";")
    return [{**row, "run": name} for row, name in zip(rows, short)], said


def common_prefix(names: list[str]) -> str:
    """What every name starts with, up to and with its last `-` or `_` ('law-' for law-hs48 and law-hs64); '' for
    one name."""
    if len(names) < 2:
        return ""
    shared = os.path.commonprefix(names)
    prefix = shared[:max(shared.rfind("-"), shared.rfind("_")) + 1]
    return prefix if all(len(name) > len(prefix) for name in names) else ""


def middle_cut(name: str, room: int) -> str:
    """`name` in at most `room` characters: its start and its end (where sweeps put cooldowns and seeds), `…`
    between."""
    if len(name) <= room:
        return name
    tail = (room - 1) // 2
    return name[:room - 1 - tail] + "…" + name[len(name) - tail:]


def _column_width(header: str, rows: list[dict]) -> int:
    return max(len(header), *(len(escaped(row.get(header, ""))) for row in rows))


def _table_width(headers: list[str], rows: list[dict]) -> int:
    return sum(_column_width(header, rows) for header in headers) + 2 * (len(headers) - 1)


def _fixed_width(headers: list[str], rows: list[dict]) -> list[str]:
    """Lines of a table: the headers, a rule, one row a line (every cell escaped onto one line)."""
    widths = {h: _column_width(h, rows) for h in headers}
    lines = ["  ".join(h.ljust(widths[h]) for h in headers), "  ".join("-" * widths[h] for h in headers)]
    lines += ["  ".join(escaped(r.get(h, "")).ljust(widths[h]) for h in headers) for r in rows]
    return [line.rstrip() for line in lines]


def runs_meeting(run_dirs: list[Path], where: list[str]) -> list[Path]:
    """The runs whose row meets every `where` condition (see where_rows), read against the whole table's columns."""
    kept = {row["_dir"] for row in table_rows(run_dirs, where=where)[1]}
    return [run_dir for run_dir in run_dirs if run_dir in kept]


def runs_table(run_dirs: list[Path], sort: str | None = None, reverse: bool = False, as_csv: bool = False,
               width: int | None = None, columns: list[str] | None = None, where: list[str] = ()) -> str:
    """A fixed-width table of runs, one line each (columns with no value in any run are left out), or CSV.

    Runs of different tasks or data sources get a table each, under a title, with the columns that differ inside
    it, ranked among themselves. `width`: the columns that fit in so many characters (None: all), the others named
    below the table; `columns`: those columns (and run) only. CSV is one table of every run and column, with the
    task and data of each. `where`: only the runs that meet every condition (see where_rows)."""
    groups = comparable_groups(runs_meeting(run_dirs, where) if where else run_dirs)
    if as_csv:
        return _csv_table(groups, sort, reverse)
    known = {header for _, runs in groups for header in table_rows(runs)[0]}
    for key in ([sort] if sort else []) + list(columns or []):
        find_column(key, sorted(known))  # an error naming the columns when no table has it
    blocks = []
    for title, runs in groups:
        headers, rows = table_rows(runs, sort if sort and _has_column(sort, runs) else None, reverse)
        wanted = [find_column(key, sorted(known)) for key in columns] if columns else None
        title_line = f"{title} ({len(runs)} run{'' if len(runs) == 1 else 's'})" if len(groups) > 1 else None
        blocks.append(table_block(title_line, headers, rows, width, wanted))
    return "\n\n".join(blocks)


def table_block(title: str | None, headers: list[str], rows: list[dict], width: int | None,
                wanted: list[str] | None) -> str:
    """One table of `rafale runs` (of runs, or of arms): its title, the names' shared start when they were shortened
    to fit, the columns that fit in `width` (or `wanted`), and a line naming the columns left out."""
    rows, shortened = fit_run_names(rows, headers, None if wanted else width)
    shown = fitting_columns(headers, rows, width, wanted)
    lines = [escaped(title)] if title else []
    lines += [f"({escaped(shortened)})"] if shortened else []
    lines += _fixed_width(shown, rows)
    hidden = [h for h in headers if h not in shown]
    if hidden and not wanted:
        lines.append(f"({len(hidden)} more column{'' if len(hidden) == 1 else 's'} than fit in {width} characters: "
                     f"{', '.join(hidden)}; --columns {','.join(hidden[:2])} or --all shows them)")
    return "\n".join(lines)


def _has_column(key: str, runs: list[Path]) -> bool:
    try:
        find_column(key, table_rows(runs)[0])
    except RafaleError:
        return False
    return True


# CSV: the table's human columns as plain numbers in base units, the unit in the header (summary.json's key)
CSV_NUMBERS = {"params": ("params", "parameters"), "N": ("N_params", "non_embedding_parameters"),
               "tokens": ("tokens", "tokens"), "C": ("C_flops", "training_flops"), "wall": ("wall_s", "wall_time_s"),
               "tok/s": ("tok_per_s", "tokens_per_s")}


def plain(value) -> str:
    """A number as CSV gets it: 204800, 444.0, 2.3456789 (float's shortest exact spelling); '' for None."""
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def csv_headers(headers: list[str], runs: list[Path]) -> list[str]:
    """The CSV's columns for the table's `headers`: the numbers renamed with their unit (CSV_NUMBERS), status after
    model, and mfu_pct after tok_per_s where a run has an MFU."""
    out = []
    for header in headers:
        out.append(CSV_NUMBERS.get(header, (header,))[0])
        out += ["status"] * (header == "model")
        out += ["mfu_pct"] * (header == "tok/s" and any(run_summary(run).get("mfu") is not None for run in runs))
    return out


def csv_cells(row: dict) -> dict:
    """A table row's CSV cells: the hyperparameters as the table spells them (3e-3), the numbers plain, from the
    run's summary.json (see CSV_NUMBERS; the metrics at full precision; mfu_pct = 100 x mfu), the model and its
    status apart."""
    summary = run_summary(row["_dir"])
    validation = summary.get("validation", {})
    cells = {**row, "model": summary.get("model", ""), "status": summary.get("status", "complete"),
             "mfu_pct": plain(summary["mfu"] * 100 if summary.get("mfu") is not None else None)}
    cells.update({name: plain(summary.get(key)) for name, key in CSV_NUMBERS.values()})
    for header, names in TABLE_METRICS.items():
        cells[header] = plain(next((validation[n] for n in names if n in validation), None))
    return cells


def _csv_table(groups: list[tuple[str, list[Path]]], sort: str | None, reverse: bool) -> str:
    """Every run in one CSV table: run, the group it is in (task and data), the hyperparameters that differ, the
    model, status and numbers (plain, in base units: tokens 204800, wall_s 444.0; see csv_cells); within each
    group, ranked as the fixed-width table ranks it. CSV quotes what needs it."""
    runs = [run_dir for _, group in groups for run_dir in group]
    headers, _ = table_rows(runs)
    headers = csv_headers(headers[:1] + ["group"] * (len(groups) > 1) + headers[1:], runs)
    text = io.StringIO()
    writer = csv.DictWriter(text, headers, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    by_dir = {row["_dir"]: row for row in table_rows(runs)[1]}  # each run's cells, in the whole table's columns
    for title, group in groups:
        _, rows = table_rows(group, sort if sort and _has_column(sort, group) else None, reverse)
        writer.writerows({**csv_cells(by_dir[row["_dir"]]), "group": title} for row in rows)
    return text.getvalue().rstrip("\n")
