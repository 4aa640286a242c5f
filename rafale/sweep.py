"""`rafale sweep`: a grid of runs from one config, one after another, then a table and a picture.

    rafale sweep -c cfg.yaml training.optimizer.name=adamw,soap training.lr=1e-3,3e-3

runs the 4 combinations, each in its own run folder (`<run.name>-name=soap-lr=3e-3`), then writes
`<output_dir>/sweep-<run.name>.md` (run, overrides, final and best validation loss, wall time, tokens/s) and
`sweep-<run.name>.png` (the runs' losses overlaid). Every combination's config is checked before the first run
starts. A rerun of the same command skips the runs that finished (they wrote summary.json) and resumes an
interrupted one from its checkpoint, so a sweep survives being stopped.
"""

import argparse
import itertools
from pathlib import Path

from rafale.config import ConfigError, RafaleError, load_config
from rafale.models.configurations import resolve_model_config
from rafale.plots import SUMMARY_FILE, best_validation, plot_runs, run_row


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
    """base-lr=3e-3-name=soap: the last part of each key and its value, in a folder-safe spelling."""
    parts = [f"{item.partition('=')[0].rsplit('.', 1)[-1]}={item.partition('=')[2]}" for item in point]
    safe = "".join(c if c.isalnum() or c in "-=._" else "_" for c in "-".join(parts))
    return f"{base}-{safe}"


def sweep_table(rows: list[tuple[str, list[str], Path]], fixed: list[str] = ()) -> str:
    """A markdown table: run, overrides, final and best validation loss, wall time, tokens/s. The overrides every
    run shares (`fixed`, the one-value axes) are said once above it."""
    lines = [f"Every run: {' '.join(fixed)}\n"] if fixed else []
    lines += ["| run | overrides | final validation loss | best | wall | tokens/s |", "|---|---|---|---|---|---|"]
    for name, point, run_dir in rows:
        varied = " ".join(item for item in point if item not in fixed)
        if not (run_dir / SUMMARY_FILE).is_file():
            lines.append(f"| {name} | {varied} | failed | | | |")
            continue
        row = run_row(run_dir)
        best = best_validation(run_dir)
        best_text = f"{best[1]:.4f} (step {best[2]})" if best else ""
        lines.append(f"| {name} | {varied} | {row.get('val loss') or row.get('accuracy')} | {best_text} "
                     f"| {row['wall']} | {row['tok/s']} |")
    return "\n".join(lines) + "\n"


def sweep_main(argv, train) -> int:
    """`train(args)` runs one training job (rafale.main.train_main); it is passed in so nothing imports main."""
    parser = argparse.ArgumentParser(
        prog="rafale sweep", description="Run a grid of config overrides one after another, then compare them.",
        epilog="example: rafale sweep -c test/pythia_tinystories.yaml training.lr=1e-3,3e-3 training.batch_size=16,32")
    parser.add_argument("-c", "--config", required=True, help="the base YAML config")
    parser.add_argument("axes", nargs="+", metavar="section.key=v1,v2", help="values to try for a config key")
    args = parser.parse_args(argv)
    points = grid(args.axes)
    fixed = grid([axis for axis in args.axes if len(grid([axis])) == 1])[0]  # one-value axes, e.g. run.output_dir=x
    base = load_config(args.config, fixed)
    for point in points:  # a typo in the last combination should not wait for the first runs to finish
        resolve_model_config(load_config(args.config, point))
    out_dir = Path(base.run.output_dir).expanduser()
    rows, failed = [], 0
    for i, point in enumerate(points, 1):
        name = run_name(base.run.name, [item for item in point if item not in fixed])  # named by what varies
        run_dir = out_dir / name
        rows.append((name, point, run_dir))
        if (run_dir / SUMMARY_FILE).is_file():
            print(f"rafale: sweep {i}/{len(points)}: {name} finished before; skipped")
            continue
        print(f"rafale: sweep {i}/{len(points)}: {name} ({' '.join(point)})", flush=True)
        try:
            train(argparse.Namespace(config=args.config, data_only=False, debug=False, restart=False,
                                     overrides=[*point, f"run.name={name}"]))
        except RafaleError as err:
            failed += 1
            print(f"rafale: sweep: {name} failed: {err}")
    table = out_dir / f"sweep-{base.run.name}.md"
    table.write_text(sweep_table(rows, fixed))
    finished = [run_dir for _, _, run_dir in rows if (run_dir / SUMMARY_FILE).is_file()]
    if finished:
        plot_runs(finished, out_dir / f"sweep-{base.run.name}.png")
    print(table.read_text() + f"rafale: wrote {table} and {table.with_suffix('.png')}")
    return 1 if failed else 0
