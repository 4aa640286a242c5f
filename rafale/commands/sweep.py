"""`rafale sweep`: a grid of runs from one config, one after another, then a table and a picture.

    rafale sweep -c cfg.yaml training.optimizer.name=adamw,soap training.lr=1e-3,3e-3

runs the 4 combinations, each in its own run folder, then writes `<output_dir>/sweep-<run.name>.md` (run,
overrides, final and best validation loss, bits per byte when the runs have it, wall time, tokens/s; a star marks
the run with the best final validation loss, or accuracy for classifiers) and `sweep-<run.name>.png` (the runs'
losses overlaid, each labelled by the values that differ). Every combination's config is checked before the
first run starts. A run with `training.cooldowns` trains its branches itself (rafale/run/branch.py): the table has
a row for each (`NAME-cooldown-300ba`, "(cooldown to 300ba)"), the picture a curve, and the progress counts them
(`sweep 1-3/12: law-hs48-is192-nh6 (...) and its cooldowns to 300ba, 500ba`).

A run folder is named `<run.name>-<key>-<value>-<key>-<value>...`, one key and value per axis with more than one
value, in the order of the command line: the key is the axis's whole dotted key without its section (the part
before the first dot), unless two axes would then read the same, when both keep their whole key. So with run.name
`sw`, the point `training.optimizer.name=soap training.lr=3e-3` trains in `sw-optimizer.name-soap-lr-3e-3`.
A value that is a list is its items joined by `_` (`training.betas=[0.9,0.95]`: `sw-betas-0.9_0.95`). A value
that is a mapping (`model.overrides={hidden_size: 48, intermediate_size: 192, num_heads: 6}`) is named by its
short form, without the axis's key: the mapping's keys whose values differ between the axis's values (a key some
values lack differs; every key when none differs), each abbreviated and followed by its value (after a `_` where
the value does not start with a digit: `name_soap`). A key of one word is kept (`dropout0.1`); a key of several
`_`-separated words becomes their initials (`hidden_size` `hs`, `num_heads` `nh`), unless two keys of the
mapping would then read the same, when both keep their whole name; a nested key is named by its last part.
So test/law_stories.yaml's four widths train in `law-hs48-is192-nh6`, `law-hs64-is256`, .... Characters other than
letters, digits, `-`, `.` and `_` become `_`. What follows run.name is cut to 60 characters; a name cut, or two
points that would share a name, end in `-` and 6 hex digits of the point's overrides, so every point has a folder
of its own and the same folder on every rerun. (Sweeps before this rule named a mapping or list by its whole
spelling, `law-overrides-_hidden_size__48_...`: a rerun of such a sweep does not find those folders, and trains
its runs again under the new names.)

Seeds are an axis: `--seeds 3` is `run.seed=S,S+1,S+2` from the config's run.seed S, and a run.seed axis is always
named last (`sw-lr-3e-3-seed-43`). The points that differ only in their seed are one arm (rafale/run_folder/arms.py): the
table then gives one line per arm first, its mean final validation with the 95% t interval, sd, n (the complete
runs averaged) and seeds, a star on the best mean and its difference from the next best arm (rafale.stats: paired
by seed), then every run's line.

`--tune training.lr=1e-3,3e-3,1e-2` gives each arm its own best value of a key: the values are trained on the
arm's first seed (the tuning seed), the one with the best final validation is chosen, the other seeds train at it,
and the arm is reported over those other seeds only, so the choice does not flatter it (with one seed the table
says that its figure is the tuning run's own). The table names the chosen value, each value's figure on the
tuning seed, and flags a choice at the grid's edge. Its runs are named like the others' (`sw-lr-3e-3-seed-42`),
so a rerun skips what completed and chooses again from the same runs.

A sweep run is known by its whole resolved config, not only by the values that vary in its name: a rerun
of the same command skips the runs that completed with the same config and resumes an interrupted one from its
checkpoint, so a sweep survives being stopped; a run folder whose config.yaml differs in anything a resume
would not apply (a changed base value, say) is refused before anything runs, naming the differences, unless
`--restart` starts those runs over (their old folders kept as NAME.old-<time>).
"""

import argparse
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rafale.run_folder.arms import SEED_KEY, higher_is_better, ranking_metric, read_arm
from rafale.config import Config, ConfigError, RafaleError, load_config
from rafale.run.optim import check_optimizer
from rafale.resolve import resolve_model_config
from rafale.run_folder.plots import plot_runs, ranking_column, run_row, short_names
from rafale.run_folder import (CONFIG_FILE, best_validation, differences_not_applied_on_resume, flatten, reached,
                               read_config, read_summary, saved_config)
from rafale.stats import difference


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


MAX_NAME = 60  # characters after run.name: a folder name that reads in a table and a terminal


def folder_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)


def parsed(value: str):
    """A sweep value as the config reads it (YAML: '[0.9,0.95]' a list, '{hidden_size: 48}' a mapping), or the
    text itself where it is not YAML."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def abbreviations(keys: list[str]) -> dict[str, str]:
    """A mapping's key -> its short name in a run name: a nested key's last part; one word as it is (dropout),
    several `_`-separated words by their initials (hidden_size -> hs); the whole key where two would read alike."""
    def short(key: str) -> str:
        words = [word for word in str(key).rsplit(".", 1)[-1].split("_") if word]
        return "".join(word[0] for word in words) if len(words) > 1 else "".join(words)

    names = {key: short(key) for key in keys}
    return {key: name if list(names.values()).count(name) == 1 else key for key, name in names.items()}


def spelled(value) -> str:
    """A value in a run name: a list's items joined by `_`, anything else as the command line wrote it."""
    if isinstance(value, list):
        return "_".join(map(spelled, value))
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def abbreviated(key: str, value: str) -> str:
    """hs48, or name_soap where the value does not start with a digit (namesoap would not read)."""
    return f"{key}{value}" if value[:1].isdigit() else f"{key}_{value}"


def short_value(value: str, others: list[str]) -> tuple[bool, str]:
    """(whether the axis's key is left out, the value's spelling in a run name): a mapping by its keys that differ
    between `others` (all the axis's values), each abbreviated and followed by its value (see the module's
    docstring); a list by its items; anything else as written."""
    value_of = parsed(value)
    if isinstance(value_of, dict):
        mappings = [flatten(item) if isinstance(item, dict) else {} for item in map(parsed, others)]
        mine = flatten(value_of)
        varying = [key for key in mine if len({json.dumps(m.get(key, "\0missing"), sort_keys=True)
                                                for m in mappings}) > 1] or list(mine)  # one value: all
        short = abbreviations(list(mine))
        return True, "-".join(abbreviated(short[key], spelled(mine[key])) for key in varying)
    if isinstance(value_of, list):
        return False, spelled(value_of)
    return False, value


def run_name(base: str, point: list[str], axis_values: dict[str, list[str]] | None = None) -> str:
    """base-optimizer.name-soap-lr-3e-3 for ['training.optimizer.name=soap', 'training.lr=3e-3']: each key without
    its section (see short_names) and its value, in a folder-safe spelling; a mapping or list by its short form,
    `axis_values` (key -> every value of its axis) telling which of a mapping's keys vary (see the module's
    docstring). Longer than MAX_NAME after the base: cut, with a hash of the point."""
    keys = short_names([item.partition("=")[0] for item in point])
    parts = []
    for item in point:
        key, _, value = item.partition("=")
        without_key, text = short_value(value, (axis_values or {}).get(key, [value]))
        parts.append(text if without_key else f"{keys[key]}-{text}")
    safe = folder_safe("-".join(parts))
    if len(safe) > MAX_NAME:
        safe = f"{safe[:MAX_NAME - 7].rstrip('-')}-{point_hash(point)}"
    return f"{base}-{safe}"


def point_hash(point: list[str]) -> str:
    """6 hex digits of a point's overrides: the same on every rerun (a name must find its folder again)."""
    return hashlib.sha1(" ".join(point).encode()).hexdigest()[:6]


def axes_values(points: list[list[str]]) -> dict[str, list[str]]:
    """key -> the values its axis takes over the sweep's points, in order."""
    values: dict[str, list[str]] = {}
    for point in points:
        for item in point:
            key, _, value = item.partition("=")
            values.setdefault(key, [])
            values[key] += [value] * (value not in values[key])
    return values


def unique_names(names: list[str], points: list[list[str]]) -> list[str]:
    """The names, with the points' hash added to those two points would share."""
    return [f"{name}-{point_hash(point)}" if names.count(name) > 1 else name for name, point in zip(names, points)]


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
            status = run_status(run_dir) or ("failed" if run_dir.exists() else "not trained")
            lines.append(f"| {name} | {varied} | {status} |" + " |" * (len(headers) - 3))
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


@dataclass
class SweepRow:
    """One arm of a sweep: a point of the axes other than run.seed and --tune, and its runs by (tune value, seed)
    (tune value None without --tune). `chosen` is the tune value picked on the tuning seed, the first."""
    name: str
    point: list[str]
    runs: dict[tuple[str | None, str], tuple[str, list[str]]] = field(default_factory=dict)  # -> (name, point)
    seeds: list[str] = field(default_factory=list)
    values: list[str | None] = field(default_factory=list)
    chosen: str | None = None

    def reported(self) -> list[tuple[str | None, str]]:
        """The (tune value, seed) of the runs the table reports: every seed; with --tune the chosen value at the
        seeds after the tuning seed, or at the tuning seed itself when it is the only one."""
        if self.values == [None]:
            return [(None, seed) for seed in self.seeds]
        if self.chosen is None:
            return []
        return [(self.chosen, seed) for seed in (self.seeds[1:] or self.seeds)]


def axis_values(axis: str) -> tuple[str, list[str]]:
    """'training.lr=1e-3,3e-3' -> ('training.lr', ['1e-3', '3e-3']), checked as grid checks an axis."""
    grid([axis])
    key, _, values = axis.partition("=")
    return key, split_values(values)


def sweep_axes(args, base_seed: int) -> tuple[list[str], str | None]:
    """(the axes in the order their runs are named: the command line's, then the --tune axis, then run.seed;
    the tune key or None). --seeds K is the axis run.seed=S,S+1,...,S+K-1 from the config's run.seed S."""
    keys = [axis_values(axis)[0] for axis in args.axes]
    seed_axes = [axis for axis in args.axes if axis_values(axis)[0] == SEED_KEY]
    if args.seeds is not None:
        if args.seeds < 1:
            raise ConfigError("--seeds", f"the number of seeds is 1 or more, got {args.seeds}")
        if seed_axes:
            raise ConfigError(SEED_KEY, "give the seeds once: --seeds K or a run.seed axis, not both")
        seed_axes = [f"{SEED_KEY}=" + ",".join(str(base_seed + i) for i in range(args.seeds))]
    tune_key = None
    if args.tune:
        tune_key, values = axis_values(args.tune)
        if len(values) < 2:
            raise ConfigError("--tune", f"a tuned key needs two values or more to choose from, got {args.tune!r}")
        if tune_key in keys or tune_key == SEED_KEY:
            raise ConfigError(tune_key, f"--tune {tune_key} is also a sweep axis: give it once")
    if len(set(keys)) < len(keys):
        raise ConfigError("axes", f"a sweep axis is given twice: {', '.join(keys)}")
    rest = [axis for axis in args.axes if axis_values(axis)[0] != SEED_KEY]
    return rest + ([args.tune] if args.tune else []) + seed_axes, tune_key


def sweep_rows(named: list[tuple[str, list[str], Config]], fixed: list[str], base: Config,
               tune_key: str | None) -> list[SweepRow]:
    """The sweep's runs as arms: the points that differ only in run.seed and the tune key are one SweepRow, named
    as a run of its varying overrides would be (run_name). Without a run.seed axis, the seed is the config's."""
    rows: dict[tuple, SweepRow] = {}
    values = axes_values([point for _, point, _ in named])
    for name, point, _ in named:
        value_of = {item.partition("=")[0]: item.partition("=")[2] for item in point}
        own = [item for item in point if item.partition("=")[0] not in (SEED_KEY, tune_key)]
        varied = [item for item in own if item not in fixed]
        row = rows.setdefault(tuple(own), SweepRow(run_name(base.run.name, varied, values) if varied else base.run.name, own))
        key = (value_of.get(tune_key), value_of.get(SEED_KEY, str(base.run.seed)))
        row.runs[key] = (name, point)
        row.values += [key[0]] * (key[0] not in row.values)
        row.seeds += [key[1]] * (key[1] not in row.seeds)
    return list(rows.values())


def check_points(args, base: Config, axes: list[str], fixed: list[str]) -> list[tuple[str, list[str], Config]]:
    """(run name, its point, its whole resolved config) of every combination, each checked before the first run:
    a typo in the last combination should not wait for the first runs to finish."""
    named = []
    points = grid(axes)
    varied = [[item for item in point if item not in fixed] for point in points]  # named by what varies
    values = axes_values(varied)
    names = unique_names([run_name(base.run.name, point, values) for point in varied], varied)
    for name, point in zip(names, points):
        cfg = load_config(args.config, [*point, f"run.name={name}"])
        check_optimizer(cfg.training)
        resolve_model_config(cfg)
        named.append((name, point, cfg))
    names = [name for name, _, _ in named]
    if len(set(names)) < len(names):  # two values that differ only in characters a folder name cannot keep
        raise ConfigError("axes", f"two sweep points would share a run folder: {', '.join(names)}")
    return named


def parse_sweep_args(argv):
    parser = argparse.ArgumentParser(
        prog="rafale sweep", description="Run a grid of config overrides one after another, then compare them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  rafale sweep -c test/pythia_tinystories.yaml training.lr=1e-3,3e-3 training.batch_size=16,32\n"
        "  rafale sweep -c test/pythia_tinystories.yaml --seeds 2   the config at seeds 42 and 43: mean, interval, sd\n"
        "  rafale sweep -c test/pythia_tinystories.yaml --tune training.lr=1e-3,3e-3 --seeds 2   the best lr on seed "
        "42, reported on seed 43 (add an axis: each of its values at its own best lr)")
    parser.add_argument("-c", "--config", required=True, help="the base YAML config")
    parser.add_argument("axes", nargs="*", metavar="section.key=v1,v2", help="values to try for a config key")
    parser.add_argument("--seeds", type=int, metavar="K", help="train every point at K seeds: the config's run.seed "
                        "S, S+1, ..., S+K-1 (the same as the axis run.seed=S,...; runs named ...-seed-S); the "
                        "table gives each point's mean final validation, its 95%% interval, sd and n over the seeds")
    parser.add_argument("--tune", metavar="KEY=v1,v2,...", help="each point at its own best value of KEY (e.g. "
                        "training.lr=1e-3,3e-3,1e-2): the values are trained on the first seed, the best final "
                        "validation is chosen, the other seeds train at it, and the table reports the point over "
                        "those other seeds only, so the choice does not flatter it; a choice at the grid's edge "
                        "is flagged")
    parser.add_argument("--restart", action="store_true",
                        help="train again the runs whose folders hold another config (kept as NAME.old-<time>)")
    args = parser.parse_intermixed_args(argv)  # the axes before and after the options
    if not args.axes and args.seeds is None and not args.tune:
        parser.error("give a sweep axis (section.key=v1,v2), --seeds K or --tune KEY=v1,v2")
    return args


def sweep_main(argv, train, on_every_rank=lambda decide: decide()) -> int:
    """`train(args)` runs one training job (rafale.main.train_main); it is passed in so nothing imports main.
    `on_every_rank(decide)` hands what decide() returns on rank 0 to every process, when Composer's launcher runs
    the sweep on several (the runs' folders are read once, and every process trains, skips or restarts the same
    runs and picks the same tuned value; rafale.main passes rafale.run.resilience.decided_on_rank_zero, which a
    command may not import)."""
    args = parse_sweep_args(argv)
    given_fixed = grid([axis for axis in args.axes if len(grid([axis])) == 1])[0]  # e.g. run.output_dir=x
    axes, tune_key = sweep_axes(args, load_config(args.config, given_fixed).run.seed)
    fixed = grid([axis for axis in axes if len(grid([axis])) == 1])[0]  # one-value axes: every run has them
    base = load_config(args.config, fixed)
    named = check_points(args, base, axes, fixed)
    out_dir = Path(base.run.output_dir).expanduser()
    actions = on_every_rank(lambda: plan([(name, cfg) for name, _, cfg in named], out_dir, args.restart))
    rows = sweep_rows(named, fixed, base, tune_key)
    cooldowns = {name: [str(budget) for budget in cfg.training.cooldowns] for name, _, cfg in named}
    total = sum((len(row.values) + len(row.seeds) - 1 if tune_key else len(row.runs))
                * (1 + len(cooldowns[next(iter(row.runs.values()))[0]])) for row in rows)  # with the cooldowns
    trained, failed, count = [], 0, 0

    def train_run(name: str, point: list[str]) -> None:
        nonlocal failed, count
        from rafale.run.branch import cooldown_name

        trained.append((name, point, out_dir / name))
        budgets = cooldowns[name]
        trained.extend((cooldown_name(name, budget), [*point, f"(cooldown to {budget})"],
                        out_dir / cooldown_name(name, budget)) for budget in budgets)
        number = f"{count + 1}/{total}" if not budgets else f"{count + 1}-{count + 1 + len(budgets)}/{total}"
        count += 1 + len(budgets)
        branches = f" and its cooldowns to {', '.join(budgets)}" if budgets else ""
        if actions[name] == "skip":
            print(f"rafale: sweep {number}: {name}{branches} completed before with this config; skipped")
            return
        print(f"rafale: sweep {number}: {name} ({' '.join(point)}){branches}", flush=True)
        try:
            train(argparse.Namespace(config=args.config, data_only=False, debug=False,
                                     restart=actions[name] == "restart", overrides=[*point, f"run.name={name}"]))
        except RafaleError as err:
            failed += 1
            print(f"rafale: sweep: {name} failed: {err}")

    for row in rows:
        if tune_key:
            tune_row(row, train_run, out_dir, on_every_rank)
        for key in row.reported() if tune_key else row.runs:
            if row.runs[key][0] not in [name for name, _, _ in trained]:
                train_run(*row.runs[key])
    if os.environ.get("RANK", "0") != "0":  # under Composer's launcher, rank 0 writes the table and the picture
        return 1 if failed else 0
    write_sweep_table(out_dir, base.run.name, rows, trained, fixed, tune_key)
    return 1 if failed else 0


def tune_row(row: SweepRow, train_run, out_dir: Path, on_every_rank) -> None:
    """Train the row's tune values at its tuning seed (the first), then choose the value with the best final
    validation (row.chosen; None when none completed)."""
    tuning_seed = row.seeds[0]
    for value in row.values:
        train_run(*row.runs[(value, tuning_seed)])
    runs = {value: out_dir / row.runs[(value, tuning_seed)][0] for value in row.values}
    row.chosen = on_every_rank(lambda: best_value(runs))
    if row.chosen is None:
        print(f"rafale: sweep: {row.name}: no run of the tuning seed completed; its other seeds are not trained")


def best_value(runs: dict[str, Path]) -> str | None:
    """The tune value whose run has the best final validation (the lowest loss, or the highest accuracy), among
    the complete ones; None when none is."""
    metric = ranking_metric(list(runs.values()))
    if metric is None:
        return None
    scored = {value: arm.values[next(iter(arm.values))]
              for value, arm in ((value, read_arm([run], metric)) for value, run in runs.items()) if arm.values}
    if not scored:
        return None
    return (max if higher_is_better(metric) else min)(scored, key=scored.get)


def write_sweep_table(out_dir: Path, base_name: str, rows: list[SweepRow], trained, fixed: list[str],
                      tune_key: str | None) -> None:
    """sweep-<name>.md (and .png): with seeds or --tune, the arms' table first, then every run's; else the runs'."""
    table = out_dir / f"sweep-{base_name}.md"
    runs_text = sweep_table(trained, fixed)
    if tune_key or any(len(row.seeds) > 1 for row in rows):
        text = arms_sweep_table(rows, out_dir, fixed, tune_key) + "\n## Each run\n\n" + runs_text
    else:
        text = runs_text
    tmp = table.with_name(table.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(table)
    finished = [run_dir for _, _, run_dir in trained if run_status(run_dir) == "complete"]
    if finished:
        plot_runs(finished, out_dir / f"sweep-{base_name}.png")
    print(table.read_text() + f"rafale: wrote {table} and {table.with_suffix('.png')}")


def grid_edge(values: list[str], chosen: str) -> bool:
    """Whether `chosen` is the lowest or highest of numeric `values` (a better value may lie beyond the grid)."""
    try:
        numbers = {value: float(value) for value in values}
    except ValueError:
        return False  # names (optimizers, schedules) have no edge
    return numbers[chosen] in (min(numbers.values()), max(numbers.values()))


def arms_sweep_table(rows: list[SweepRow], out_dir: Path, fixed: list[str], tune_key: str | None) -> str:
    """The sweep's arms, one line each: overrides, (the chosen tune value and the tuning seed's figure at each
    value), the mean final validation over the reported seeds with its 95% interval, sd, n and the seeds; a star
    on the best mean, its difference from the next best (rafale.stats), and what was tuned and reported on."""
    runs_of = {row.name: [out_dir / row.runs[key][0] for key in row.reported()] for row in rows}
    metric = ranking_metric([run for runs in runs_of.values() for run in runs])
    arms = {row.name: read_arm(runs_of[row.name], metric) if metric else None for row in rows}
    short = short_names([tune_key])[tune_key] if tune_key else None
    headers = ["arm", "overrides"] + [f"chosen {short}", "tuning seed's final validation"] * bool(tune_key)
    headers += [f"final validation {metric} (mean ± 95%)", "sd", "n", "seeds"]
    ranked = {name: arm.summary.mean for name, arm in arms.items() if arm and arm.values}
    pick = max if metric and higher_is_better(metric) else min
    winner = pick(ranked, key=ranked.get) if ranked else None
    lines = [f"Every run: {' '.join(fixed)}\n"] if fixed else []
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        arm = arms[row.name]
        summary = arm.summary if arm and arm.values else None
        cells = [row.name, " ".join(item for item in row.point if item not in fixed)]
        if tune_key:
            cells += tuned_cells(row, out_dir, metric)
        cells += [(summary.text() if summary else "no complete run") + (" ★" if row.name == winner else ""),
                  f"{summary.sd:.4f}" if summary and summary.sd is not None else "",
                  arm.n_text() if arm else "0", arm.seeds_text() if arm else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += arms_notes(rows, arms, winner, metric, tune_key)
    lines.append(validation_note([run for runs in runs_of.values() for run in runs if run_status(run) == "complete"]))
    return "\n".join(lines) + "\n"


def tuned_cells(row: SweepRow, out_dir: Path, metric: str | None) -> list[str]:
    """The chosen value (flagged at the grid's edge) and each value's final validation at the tuning seed."""
    tuning = []
    for value in row.values:
        run = out_dir / row.runs[(value, row.seeds[0])][0]
        arm = read_arm([run], metric) if metric else None
        figure = f"{next(iter(arm.values.values())):.4f}" if arm and arm.values else (run_status(run) or "not run")
        tuning.append(f"{value}: {figure}")
    chosen = "none (no tuning run completed)" if row.chosen is None else row.chosen
    if row.chosen is not None and grid_edge(row.values, row.chosen):
        chosen += " (at the grid's edge: widen the grid)"
    return [chosen, ", ".join(tuning)]


def arms_notes(rows: list[SweepRow], arms: dict, winner: str | None, metric: str | None,
               tune_key: str | None) -> list[str]:
    """Below the arms' table: the best arm against the next best, what the tuning chose on and what the figures
    are over, and the runs left out of the means."""
    notes = []
    ranked = sorted((name for name, arm in arms.items() if arm and arm.values), key=lambda name: arms[name].summary.mean,
                    reverse=bool(metric and higher_is_better(metric)))
    if winner:
        notes.append(f"\n★ best mean final validation {metric}: {winner}")
        if len(ranked) > 1:
            runner_up = ranked[1]
            diff = difference(arms[winner].values, arms[runner_up].values)
            interval = f" [{diff.low:.4f}, {diff.high:.4f}]" if diff.low is not None else ""
            p = f", p = {diff.p_value:.2g}" if diff.p_value is not None else ""
            notes.append(f"Against the next best, {runner_up}: {winner} - {runner_up} = {diff.estimate:+.4f}{interval}"
                         f"{p} ({diff.test}): {diff.verdict(not higher_is_better(metric), (winner, runner_up))}.")
    if tune_key:
        seeds = rows[0].seeds
        if len(seeds) > 1:
            notes.append(f"\n{tune_key} tuned per arm: chosen on seed {seeds[0]} (the tuning column), reported over "
                         f"seeds {', '.join(map(str, seeds[1:]))}, which the choice did not see. (`rafale runs` and a "
                         f"pattern ...-seed-* in `rafale compare` would count seed {seeds[0]}'s run too: give "
                         "`rafale compare` the reported runs with --a and --b.)")
        else:
            notes.append(f"\n{tune_key} tuned per arm on seed {seeds[0]}, and the figure reported is that seed's own "
                         "run, the one the value was chosen on: it flatters the arm (with --seeds 2 or more the "
                         "table reports the seeds the choice did not see).")
    left_out = [why for arm in arms.values() if arm for why in arm.left_out]
    if left_out:
        notes.append(f"\nNot averaged in (n counts the runs that were): {'; '.join(left_out)}.")
    return notes
