"""`rafale compare A B`: is arm A better than arm B, beyond the noise of the seed?

    rafale compare runs/a runs/b                                     one run a side: the difference, no interval
    rafale compare 'runs/sw-lr-1e-3-seed-*' 'runs/sw-lr-3e-3-seed-*'  each side the seeds of one arm
    rafale compare --a runs/x-seed-1 runs/x-seed-2 --b runs/y-seed-1 runs/y-seed-2 --metric BitsPerByte

A side is a run folder, a shell pattern of run folders (quoted, so that rafale expands it: `rafale runs` names an
arm so, `sw-lr-1e-3-seed-*`), a folder of runs, or with --a and --b a list of them. The runs of a side must be
seeds of one arm: they may differ in run.seed only (and in where they were kept), else the side is refused,
naming the key. Runs of different data, tokenizers or tasks are refused, naming the difference, as `rafale law`
refuses them (with --metric BitsPerByte the tokenizers may differ: bits per byte does not depend on them).

It prints each side's mean final metric with its 95% t interval, n and seeds, then A - B with its 95% interval and
p-value (rafale.stats): paired by seed where both sides ran the same seeds (each seed fixes the data order and the
initial weights, so the pairs share that noise), Welch's t-test otherwise, and with one run on a side the
difference alone, "no interval". The verdict names the better side only when p < 0.05, else it says "not
distinguishable at n=3". Runs that are not complete are left out and named.
"""

import argparse
import glob
import os
from pathlib import Path

from rafale.run_folder.arms import SEED_KEY, Arm, higher_is_better, ranking_metric, read_arm, seed_of
from rafale.errors import RafaleError
from rafale.run_folder.plots import differing_keys, format_value
from rafale.run_folder import data_identity, read_config, read_summary
from rafale.commands.runs import run_folders
from rafale.stats import Difference, difference

WORDS = {"LanguageCrossEntropy": "validation loss", "CrossEntropy": "validation loss",
         "ContrastiveLoss": "validation loss", "BitsPerByte": "bits per byte"}


class CompareError(RafaleError):
    pass


def side_runs(specs: list[str], side: str) -> list[Path]:
    """The run folders of one side: each spec a run folder, a folder of runs, or a shell pattern (its matches that
    are run folders)."""
    found = []
    for spec in specs:
        if glob.has_magic(spec):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(spec))) if Path(m).is_dir()]
            matches = [m for m in matches if read_summary(m) is not None or read_config(m) is not None]
            if not matches:
                raise CompareError(f"side {side}: {spec} matches no run folder")
            found += matches
        else:
            found += run_folders([Path(spec).expanduser()])
    return list(dict.fromkeys(found))


def check_one_arm(runs: list[Path], side: str) -> None:
    """A side's runs are seeds of one arm: refused, naming the key, when they differ in anything but run.seed, or
    when two of them ran the same seed (not two samples of the noise)."""
    configs = {run: read_config(run) for run in runs}
    for key in differing_keys(list(configs.values())):
        if key != SEED_KEY:
            values = ", ".join(f"{format_value(config.get(key))} in {run.name}" for run, config in configs.items()
                               if config is not None)
            raise CompareError(f"side {side} mixes runs that differ in {key} ({values}): a side is the seeds of one "
                               "arm, runs that differ only in run.seed")
    by_seed: dict[str, list[str]] = {}
    for run in runs:
        by_seed.setdefault(seed_of(run), []).append(run.name)
    for seed, names in by_seed.items():
        if len(names) > 1:
            raise CompareError(f"side {side}: {', '.join(names)} all ran seed {seed}; give one run a seed")


def check_comparable(sides: dict[str, list[Path]], metric: str) -> None:
    """Every run of both sides on the same task, data and tokenizer (bits per byte: the tokenizer may differ)."""
    with_tokenizer = metric != "BitsPerByte"
    identities = {run: data_identity(run, with_tokenizer) for runs in sides.values() for run in runs}
    first, first_identity = next(iter(identities.items()))
    for run, identity in identities.items():
        differ = [key for key in sorted(first_identity.keys() | identity.keys())
                  if first_identity.get(key) != identity.get(key)]
        if differ:
            what = "; ".join(f"{key}: {first_identity.get(key)!r} in {first.name}, {identity.get(key)!r} in {run.name}"
                             for key in differ)
            hint = (" (compare --metric BitsPerByte, which a tokenizer does not change)"
                    if with_tokenizer and set(differ) <= {"tokenizer", "data.tokenizer", "data.vocab_size"} else "")
            raise CompareError(f"these runs do not compare: {what}{hint}")


def read_side(runs: list[Path], side: str, metric: str) -> Arm:
    """The side's final `metric` by seed; an error naming the metrics its runs have when none has this one."""
    arm = read_arm(runs, metric)
    if not arm.values:
        summary = read_summary(runs[0]) or {}
        known = list(summary.get("validation", {})) + [key for key, value in summary.items()
                                                      if isinstance(value, (int, float)) and not isinstance(value, bool)]
        raise CompareError(f"side {side}: no complete run with a final {metric} ({'; '.join(arm.left_out)}); "
                           f"{runs[0].name}'s summary.json has {', '.join(known) or 'no metric'}")
    return arm


def report(arms: dict[str, Arm], diff: Difference, metric: str) -> str:
    """What `rafale compare` prints: the metric, each side, what differs between them, A - B and the verdict."""
    better = "higher" if higher_is_better(metric) else "lower"
    lines = [f"metric: final {metric}{f' ({WORDS[metric]})' if metric in WORDS else ''}, {better} is better"]
    for side, arm in arms.items():
        lines.append(f"{side}: {arm.summary.text()}, seeds {arm.seeds_text()}  ({arm.label})")
    keys = [key for key in differing_keys([read_config(arm.runs[0]) for arm in arms.values()]) if key != SEED_KEY]
    if keys:
        configs = [read_config(arm.runs[0]) or {} for arm in arms.values()]
        lines.append("A and B differ in: " + "; ".join(
            f"{key} {format_value(configs[0].get(key))} / {format_value(configs[1].get(key))}" for key in keys))
    else:
        lines.append("A and B differ in nothing but their seeds: they are one arm")
    if diff.low is None:
        lines.append(f"A - B = {diff.estimate:+.4f}, {diff.test}")
    else:
        lines.append(f"A - B = {diff.estimate:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}], p = {diff.p_value:.2g} "
                     f"({diff.test})")
    lines.append(f"verdict: {diff.verdict(not higher_is_better(metric))}")
    left_out = [why for arm in arms.values() for why in arm.left_out]
    if left_out:
        lines.append(f"left out (not complete): {'; '.join(left_out)}")
    return "\n".join(lines)


def compare_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale compare", description="Compare two arms (a run, or the seeds of one arm, a side): each side's "
        "mean final validation with its 95%% interval, and A - B with its interval and p-value, paired by seed "
        "where both sides ran the same seeds, Welch's t-test otherwise; with one run a side, no interval.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  rafale compare runs/a runs/b                                  two runs: the difference, no interval\n"
        "  rafale compare 'runs/pythia-tiny-*' runs/b                   a side as a quoted shell pattern: the seeds "
        "of one arm, e.g. 'runs/sw-lr-1e-3-seed-*'\n"
        "  rafale compare --a runs/a --b runs/b --metric BitsPerByte     another summary metric")
    parser.add_argument("sides", nargs="*", metavar="SIDE", help="A then B: each a run folder, a folder of runs or a "
                        "quoted shell pattern of run folders")
    parser.add_argument("--a", nargs="+", metavar="RUN", help="side A's runs (instead of the first SIDE)")
    parser.add_argument("--b", nargs="+", metavar="RUN", help="side B's runs (instead of the second SIDE)")
    parser.add_argument("--metric", help="a final metric of summary.json: a validation metric (LanguageCrossEntropy, "
                        "BitsPerByte, Accuracy, ...) or a number at its top level (tokens_per_s); default: the "
                        "validation loss, or the accuracy of a classifier (higher is better)")
    args = parser.parse_args(argv)
    if args.a or args.b:
        specs = {"A": args.a, "B": args.b}
        if not (args.a and args.b) or args.sides:
            parser.error("with --a, give --b too and no other SIDE")
    elif len(args.sides) == 2:
        specs = {"A": args.sides[:1], "B": args.sides[1:]}
    else:
        parser.error(f"give two sides, A and B, got {len(args.sides)}; quote a shell pattern ('runs/x-seed-*') so "
                     "that rafale expands it, or list each side's runs after --a and --b")
    sides = {side: side_runs(spec, side) for side, spec in specs.items()}
    for side, runs in sides.items():
        check_one_arm(runs, side)
    metric = args.metric or ranking_metric([run for runs in sides.values() for run in runs])
    if metric is None:
        raise CompareError("no run has a final validation loss or accuracy; name one with --metric")
    check_comparable(sides, metric)
    arms = {side: read_side(runs, side, metric) for side, runs in sides.items()}
    print(report(arms, difference(arms["A"].values, arms["B"].values), metric))
    return 0
