"""Arms: runs that differ only in their seed, and the figures a table gives one.

A result is a difference between arms (an optimizer, a learning rate, a width), and one run cannot tell it from the
noise of the seed, so an arm is trained at several seeds (`rafale sweep --seeds 3`). The runs of one arm share
every hyperparameter but `run.seed` (where and how a run was kept, run.name and the like, never counts; see
rafale.run_folder.plots.NOT_HYPERPARAMETERS). `group_arms` finds the arms among run folders, `read_arm` reads one arm's final
values by seed, and `arms_table` is `rafale runs`' table of them: per arm the mean of the final validation metric
with its 95% t interval (rafale.stats), the standard deviation, n and the seeds. A run that is not complete is
not averaged in: it is named under "left out", and n counts the runs averaged ("2 of 3").
"""

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rafale.errors import RafaleError
from rafale.run_folder.plots import (TABLE_METRICS, comparable_groups, differing_keys, find_column, run_row, sort_rows,
                                     table_block, what_differs, where_rows)
from rafale.run_folder import read_config, read_summary
from rafale.stats import Summary, summarize

SEED_KEY = "run.seed"
LOSS_METRICS = TABLE_METRICS["val loss"]  # summary.json's validation names, lowest is best
ACCURACY_METRICS = TABLE_METRICS["accuracy"]  # highest is best
HIGHER_IS_BETTER_WORDS = ("Accuracy", "F1", "Recall", "tokens_per_s", "mfu")


def seed_of(run_dir: Path) -> str:
    """The run's run.seed (config.yaml) as text, or '?NAME' for a run without one (a seed of its own)."""
    config = read_config(run_dir) or {}
    return str(config[SEED_KEY]) if SEED_KEY in config else f"?{Path(run_dir).name}"


def group_arms(run_dirs: list[Path]) -> list[list[Path]]:
    """The runs in arms, in the order each arm first appears: runs whose config.yaml agree on every hyperparameter
    that differs among `run_dirs` but run.seed. A run without config.yaml is an arm of its own."""
    configs = [read_config(run_dir) for run_dir in run_dirs]
    keys = [key for key in differing_keys(configs) if key != SEED_KEY]
    arms: dict[str, list[Path]] = {}
    for run_dir, config in zip(run_dirs, configs):
        identity = (json.dumps([config.get(key) for key in keys], sort_keys=True) if config is not None
                    else f"no config.yaml: {run_dir}")
        arms.setdefault(identity, []).append(run_dir)
    return list(arms.values())


def has_seeds(run_dirs: list[Path]) -> bool:
    """Whether some arm among the runs ran more than one seed (runs alike in every key, seed too, are not seeds; nor
    are runs whose config.yaml has no run.seed, which seed_of tells apart by name only)."""
    return any(len({seed for seed in map(seed_of, arm) if not seed.startswith("?")}) > 1
               for arm in group_arms(run_dirs))


def ranking_metric(run_dirs: list[Path]) -> str | None:
    """The final validation metric that ranks these runs (summary.json's name): a loss where any run has one,
    else an accuracy; None when no run has either."""
    validations = [(read_summary(run_dir) or {}).get("validation", {}) for run_dir in run_dirs]
    for names in (LOSS_METRICS, ACCURACY_METRICS):
        found = next((name for name in names if any(name in validation for validation in validations)), None)
        if found:
            return found
    return None


def higher_is_better(metric: str) -> bool:
    return any(word in metric for word in HIGHER_IS_BETTER_WORDS)


def final_value(summary: dict, metric: str) -> float | None:
    """The run's final `metric`: a validation metric (LanguageCrossEntropy, BitsPerByte, Accuracy, ...), or a
    number at summary.json's top level (tokens_per_s, wall_time_s, ...)."""
    value = summary.get("validation", {}).get(metric, summary.get(metric))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def not_complete(run_dir: Path, summary: dict | None) -> str | None:
    """'NAME (stopped by SIGTERM at batch 5)' for a run that is not complete; None for one that is."""
    status = (summary or {}).get("status")
    if summary is not None and status in (None, "complete"):
        return None
    how = f"stopped by {summary['stopped_by']}" if (summary or {}).get("stopped_by") else (status or "no summary.json")
    return f"{Path(run_dir).name} ({how} at batch {(summary or {}).get('batches', 0)})"


@dataclass
class Arm:
    """One arm's runs and their final `metric`, by seed: only complete runs with that metric are in `values`; the
    others are named in `left_out`, with why."""
    runs: list[Path]
    metric: str
    values: dict[str, float] = field(default_factory=dict)  # seed -> final value
    runs_by_seed: dict[str, Path] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)

    @property
    def summary(self) -> Summary | None:
        return summarize(self.values.values()) if self.values else None

    @property
    def label(self) -> str:
        return arm_label(self.runs)

    def n_text(self) -> str:
        """'3', or '2 of 3' when a run was left out."""
        return str(len(self.values)) + (f" of {len(self.runs)}" if len(self.values) < len(self.runs) else "")

    def seeds_text(self) -> str:
        """The seeds averaged, in order: '42,43,44'."""
        return ",".join(sorted(self.values, key=lambda seed: (not seed.lstrip("-").isdigit(), int(seed)
                                                             if seed.lstrip("-").isdigit() else 0, seed)))


def read_arm(run_dirs: list[Path], metric: str) -> Arm:
    """The arm of `run_dirs` (runs of one arm, see group_arms) with each complete run's final `metric` by seed. A
    run not complete, without the metric, or a second run of a seed already read, is left out and named."""
    arm = Arm(list(run_dirs), metric)
    for run_dir in run_dirs:
        summary = read_summary(run_dir)
        seed, value = seed_of(run_dir), final_value(summary or {}, metric)
        why = not_complete(run_dir, summary)
        if why is None and value is None:
            why = f"{Path(run_dir).name} (no final {metric} in its summary.json)"
        elif why is None and seed in arm.values:
            why = f"{Path(run_dir).name} (seed {seed} again: {arm.runs_by_seed[seed].name} is that seed's run)"
        if why:
            arm.left_out.append(why)
            continue
        arm.values[seed], arm.runs_by_seed[seed] = value, Path(run_dir)
    return arm


def arm_label(run_dirs: list[Path]) -> str:
    """The arm's name: its one run's name; else the names with their seed as `*` where they carry it
    (sw-lr-1e-3-seed-*, a shell pattern `rafale compare` takes), else their common start and end around a `*`."""
    names = [Path(run_dir).name for run_dir in run_dirs]
    if len(set(names)) == 1:
        return names[0]
    starred = {name.replace(f"seed-{seed_of(run_dir)}", "seed-*") for name, run_dir in zip(names, run_dirs)}
    if len(starred) == 1:
        return starred.pop()
    start = os.path.commonprefix(names)
    end = os.path.commonprefix([name[len(start):][::-1] for name in names])[::-1]
    return f"{start}*{end}"


def arm_rows(run_dirs: list[Path]) -> tuple[list[str], list[dict]]:
    """The headers (those with a value in some row) and one row per arm: its name, the hyperparameters that differ
    between the arms, the mean final validation metric (under the run table's name, `val loss` or `accuracy`),
    its 95% interval's half-width, sd, n and seeds, the runs left out, the mean bits per byte, and the model,
    parameters, tokens and FLOPs of its first run. Not ranked."""
    metric = ranking_metric(run_dirs)
    column = "accuracy" if metric in ACCURACY_METRICS else "val loss"
    arms = [read_arm(group, metric) if metric else Arm(group, "") for group in group_arms(run_dirs)]
    settings = what_differs([arm.runs[0] for arm in arms], leave_out=frozenset({SEED_KEY}))
    rows = []
    for arm, setting in zip(arms, settings):
        summary = arm.summary
        bits = [final_value(read_summary(run) or {}, "BitsPerByte") for run in arm.runs_by_seed.values()]
        first = run_row(arm.runs[0])
        rows.append({"run": arm.label, **setting,
                     column: f"{summary.mean:.4f}" if summary else "",
                     "±95%": f"{(summary.high - summary.low) / 2:.4f}" if summary and summary.low is not None else "",
                     "sd": f"{summary.sd:.4f}" if summary and summary.sd is not None else "",
                     "n": arm.n_text(), "seeds": arm.seeds_text(),
                     "bits/byte": f"{sum(bits) / len(bits):.4f}" if bits and None not in bits else "",
                     "left out": "; ".join(arm.left_out),
                     **{key: first[key] for key in ("model", "params", "N", "tokens", "C")},
                     "_arm": arm})
    headers = [header for header in rows[0] if header != "_arm" and any(row[header] for row in rows)]
    return headers, rows


def arms_table(run_dirs: list[Path], sort: str | None = None, reverse: bool = False, as_csv: bool = False,
               width: int | None = None, columns: list[str] | None = None, where: list[str] = ()) -> str:
    """rafale.run_folder.plots.runs_table with one line per arm instead of per run: a table per task and data source, best
    mean first (or by the column `sort`), fitted to `width`, only the rows that meet every `where`. CSV: every arm
    with its metric's mean, sd, n and interval as plain numbers."""
    blocks, csv_rows = [], []
    groups = comparable_groups(run_dirs)
    for title, runs in groups:
        headers, rows = arm_rows(runs)
        for condition in where:
            rows = where_rows(rows, condition)
        if not rows:
            continue
        key = find_column(sort, headers) if sort else ("accuracy" if "accuracy" in headers else "val loss")
        rows = sort_rows(rows, key, reverse)
        if as_csv:
            csv_rows += [csv_row(row, headers, title if len(groups) > 1 else None) for row in rows]
            continue
        wanted = [find_column(name, headers, "--columns") for name in columns] if columns else None
        title_line = f"{title} ({len(rows)} arm{'' if len(rows) == 1 else 's'})" if len(groups) > 1 else None
        blocks.append(table_block(title_line, headers, rows, width, wanted))
    if not blocks and not csv_rows:
        raise RafaleError(f"no arm meets --where {' and '.join(where)}")
    if as_csv:
        return arms_csv(csv_rows)
    note = ("One line per arm (runs that differ only in run.seed): the mean final validation, its 95% t interval's "
            "half-width, sd, n (the complete runs averaged) and seeds; --runs lists each run.")
    return "\n\n".join(blocks) + "\n\n" + note


def csv_row(row: dict, headers: list[str], group: str | None) -> dict:
    """An arm's CSV line: its name, group, settings, metric, and mean, sd, n, low, high as plain numbers."""
    arm: Arm = row["_arm"]
    summary = arm.summary
    settings = {h: row[h] for h in headers if h not in ("run", "val loss", "accuracy", "±95%", "sd", "n", "seeds",
                                                          "bits/byte", "left out", "model", "params", "N", "tokens",
                                                          "C")}
    plain = lambda value: "" if value is None else repr(value)
    return {"run": arm.label, **({"group": group} if group else {}), **settings, "metric": arm.metric,
            "mean": plain(summary and summary.mean), "sd": plain(summary and summary.sd), "n": len(arm.values),
            "low": plain(summary and summary.low), "high": plain(summary and summary.high),
            "seeds": arm.seeds_text(), "left out": "; ".join(arm.left_out)}


def arms_csv(rows: list[dict]) -> str:
    headers = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, headers, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().rstrip("\n")
