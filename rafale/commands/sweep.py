"""`rafale sweep`: a grid of runs from one config, one after another, then a table and a picture.

    rafale sweep -c cfg.yaml training.optimizer.name=adamw,soap training.lr=1e-3,3e-3

runs the 4 combinations, each in its own run folder, then writes `<output_dir>/sweep-<run.name>.md` (run,
overrides, final and best validation loss, bits per byte when the runs have it, wall time, tokens/s; a star marks
the run with the best final validation loss, or accuracy for classifiers) and `sweep-<run.name>.png` (the runs'
losses overlaid, each labelled by the values that differ). Every combination's config is checked before the
first run starts.

A run folder is named `<run.name>-<key>-<value>-<key>-<value>...`, one key and value per axis with more than one
value, in the order of the command line: the key is the axis's whole dotted key without its section (the part
before the first dot), unless two axes would then read the same, when both keep their whole key. Characters
other than letters, digits, `-`, `.` and `_` become `_`. So with run.name `sw`, the point
`training.optimizer.name=soap training.lr=3e-3` trains in `sw-optimizer.name-soap-lr-3e-3`, and
`training.betas=[0.9,0.95]` in `sw-betas-_0.9_0.95_`.

A sweep run is known by its whole resolved config, not only by the values that vary in its name: a rerun
of the same command skips the runs that completed with the same config and resumes an interrupted one from its
checkpoint, so a sweep survives being stopped; a run folder whose config.yaml differs in anything a resume
would not apply (a changed base value, say) is refused before anything runs, naming the differences, unless
`--restart` starts those runs over (their old folders kept as NAME.old-<time>).
"""

import argparse
import itertools
import os
from pathlib import Path

from rafale.config import Config, ConfigError, RafaleError, load_config
from rafale.run.optim import check_optimizer
from rafale.resolve import resolve_model_config
from rafale.run_folder.plots import plot_runs, ranking_column, run_row, short_names
from rafale.run_folder import (CONFIG_FILE, best_validation, differences_not_applied_on_resume, reached, read_config,
                               read_summary, saved_config)


def split_values(text: str) -> list[str]:
    """'1e-3,3e-3' -> ['1e-3', '3e-3']; commas inside brackets stay ('[0.9,0.95],[0.9,0.99]' is two values)."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return values + [current]


def grid(axes: list[str]) -> list[list[str]]:
    """['a.b=1,2', 'c.d=x'] -> [['a.b=1', 'c.d=x'], ['a.b=2', 'c.d=x']]: every combination of the axes' values."""
    choices = []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or "." not in key or not values:
            raise ConfigError(key, f"a sweep axis is section.key=value1,value2,... (e.g. training.lr=1e-3,3e-3), got {axis!r}")
        choices.append([f"{key}={value}" for value in split_values(values)])
    return [list(point) for point in itertools.product(*choices)]


def run_name(base: str, point: list[str]) -> str:
    """base-optimizer.name-soap-lr-3e-3 for ['training.optimizer.name=soap', 'training.lr=3e-3']: each key without
    its section (see short_names) and its value, in a folder-safe spelling (see the module's docstring)."""
    keys = short_names([item.partition("=")[0] for item in point])
    parts = [f"{keys[item.partition('=')[0]]}-{item.partition('=')[2]}" for item in point]
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in "-".join(parts))
    return f"{base}-{safe}"


def sweep_table(rows: list[tuple[str, list[str], Path]], fixed: list[str] = ()) -> str:
    """A markdown table: run, overrides, final and best validation loss, bits per byte (when a run has it), wall
    time, tokens/s; a star after the best final value (lowest loss, or highest accuracy), said below the table.
    The overrides every run shares (`fixed`, the one-value axes) are said once above it."""
    finished = {name: run_row(run_dir) for name, _, run_dir in rows if run_status(run_dir) == "complete"}
    bits = any(row["bits/byte"] for row in finished.values())
    winner, column = best_run(finished)
    headers = ["run", "overrides", "final validation loss", "best"] + ["bits/byte"] * bits + ["wall", "tokens/s"]
    lines = [f"Every run: {' '.join(fixed)}\n"] if fixed else []
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, point, run_dir in rows:
        varied = " ".join(item for item in point if item not in fixed)
        if name not in finished:
            lines.append(f"| {name} | {varied} | {run_status(run_dir) or 'failed'} |" + " |" * (len(headers) - 3))
            continue
        row = finished[name]
        best = best_validation(run_dir)
        final = (row.get("val loss") or row.get("accuracy")) + (" ★" if name == winner else "")
        cells = [name, varied, final, f"{best[1]:.4f} (step {best[2]})" if best else ""]
        cells += [row["bits/byte"]] * bits + [row["wall"], row["tok/s"]]
        lines.append("| " + " | ".join(cells) + " |")
    if winner:
        lines.append(f"\n★ best final validation {'loss' if column == 'val loss' else column}: {winner}")
    lines.append(validation_note([run_dir for name, _, run_dir in rows if name in finished]))
    return "\n".join(lines) + "\n"


def validation_note(run_dirs: list[Path]) -> str:
    """What the validation figures are over: training.eval_batches batches of training.batch_size blocks (or
    examples), or the whole validation split, as the runs' config.yaml say."""
    configs = [config for config in map(read_config, run_dirs) if config is not None]
    settings = {(config.get("training.eval_batches"), config.get("training.batch_size")) for config in configs}
    if len(settings) != 1:
        return "\nValidation: training.eval_batches or training.batch_size differ between the runs (their config.yaml)."
    ((batches, batch_size),) = settings
    if batches is None:
        return "\nValidation: the whole validation split (training.eval_batches unset)."
    return (f"\nValidation: the first {batches} batches of {batch_size} of the validation split "
            f"(training.eval_batches: {batches}), at most {batches * batch_size:,} blocks or examples.")


def best_run(finished: dict[str, dict]) -> tuple[str | None, str | None]:
    """(name, column) of the run with the best final validation among `finished` (name -> its run_row): the lowest
    loss, or where no run has one, the highest accuracy; (None, None) when no run has either."""
    column = ranking_column(list(finished.values()))
    scored = {name: float(row[column]) for name, row in finished.items() if column and row.get(column)}
    if not scored:
        return None, None
    pick = max if column == "accuracy" else min
    return pick(scored, key=scored.get), column


def run_status(run_dir: Path) -> str | None:
    """summary.json's status ('complete', 'stopped', 'in progress', 'failed'), or None without one."""
    summary = read_summary(run_dir)
    return summary.get("status", "complete") if summary is not None else None


def plan(point_configs: list[tuple[str, Config]], out_dir: Path, restart: bool) -> dict[str, str]:
    """run name -> what to do with it: 'run' (new, or resumed), 'skip' (complete with this very config), or
    'restart'. A folder whose config.yaml differs in what a resume would not apply is an error listing every such
    run, before any runs, unless `restart`."""
    from rafale.run.branch import cooldown_name

    actions, changed = {}, []
    for name, cfg in point_configs:
        run_dir = out_dir / name
        old = saved_config(run_dir) if (run_dir / CONFIG_FILE).is_file() else None
        differences = differences_not_applied_on_resume(old, cfg) if old is not None else []
        summary = read_summary(run_dir) or {}
        if differences:
            changed.append(f"{name} ({'; '.join(differences)})")
            actions[name] = "restart"
        elif (summary.get("status") == "complete" and reached(cfg.training.max_duration, summary)
              and all(run_status(out_dir / cooldown_name(name, budget)) == "complete"
                      for budget in cfg.training.cooldowns)):  # (the run trains its missing cooldowns itself)
            actions[name] = "skip"
        else:
            actions[name] = "run"
    if changed and not restart:
        raise ConfigError("run.name", f"this sweep's run folders in {out_dir} were trained with another config: "
                          f"{', '.join(changed)}. Use another run.name for this sweep, or rafale sweep --restart to "
                          "train those runs again (their old folders are kept as NAME.old-<time>)")
    return actions


def sweep_main(argv, train, on_every_rank=lambda decide: decide()) -> int:
    """`train(args)` runs one training job (rafale.main.train_main); it is passed in so nothing imports main.
    `on_every_rank(decide)` hands what decide() returns on rank 0 to every process, when Composer's launcher runs
    the sweep on several (the runs' folders are read once, and every process trains, skips or restarts the same
    runs; rafale.main passes rafale.run.resilience.decided_on_rank_zero, which a command may not import)."""
    parser = argparse.ArgumentParser(
        prog="rafale sweep", description="Run a grid of config overrides one after another, then compare them.",
        epilog="example: rafale sweep -c test/pythia_tinystories.yaml training.lr=1e-3,3e-3 training.batch_size=16,32")
    parser.add_argument("-c", "--config", required=True, help="the base YAML config")
    parser.add_argument("axes", nargs="+", metavar="section.key=v1,v2", help="values to try for a config key")
    parser.add_argument("--restart", action="store_true",
                        help="train again the runs whose folders hold another config (kept as NAME.old-<time>)")
    args = parser.parse_args(argv)
    points = grid(args.axes)
    fixed = grid([axis for axis in args.axes if len(grid([axis])) == 1])[0]  # one-value axes, e.g. run.output_dir=x
    base = load_config(args.config, fixed)
    named = []  # (run name, its point, its whole resolved config)
    for point in points:  # a typo in the last combination should not wait for the first runs to finish
        name = run_name(base.run.name, [item for item in point if item not in fixed])  # named by what varies
        cfg = load_config(args.config, [*point, f"run.name={name}"])
        check_optimizer(cfg.training)
        resolve_model_config(cfg)
        named.append((name, point, cfg))
    names = [name for name, _, _ in named]
    if len(set(names)) < len(names):  # two values that differ only in characters a folder name cannot keep
        raise ConfigError("axes", f"two sweep points would share a run folder: {', '.join(names)}")
    out_dir = Path(base.run.output_dir).expanduser()
    actions = on_every_rank(lambda: plan([(name, cfg) for name, _, cfg in named], out_dir, args.restart))
    rows, failed = [], 0
    for i, (name, point, _) in enumerate(named, 1):
        rows.append((name, point, out_dir / name))
        if actions[name] == "skip":
            print(f"rafale: sweep {i}/{len(points)}: {name} completed before with this config; skipped")
            continue
        print(f"rafale: sweep {i}/{len(points)}: {name} ({' '.join(point)})", flush=True)
        try:
            train(argparse.Namespace(config=args.config, data_only=False, debug=False,
                                     restart=actions[name] == "restart", overrides=[*point, f"run.name={name}"]))
        except RafaleError as err:
            failed += 1
            print(f"rafale: sweep: {name} failed: {err}")
    table = out_dir / f"sweep-{base.run.name}.md"
    if os.environ.get("RANK", "0") != "0":  # under Composer's launcher, rank 0 writes the table and the picture
        return 1 if failed else 0
    table.write_text(sweep_table(rows, fixed))
    finished = [run_dir for _, _, run_dir in rows if run_status(run_dir) == "complete"]
    if finished:
        plot_runs(finished, out_dir / f"sweep-{base.run.name}.png")
    print(table.read_text() + f"rafale: wrote {table} and {table.with_suffix('.png')}")
    return 1 if failed else 0
