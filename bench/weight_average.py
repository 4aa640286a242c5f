"""Weight averages measured over seeds: the default job's raw weights against their EMA (training.ema) and against
the average of its last checkpoints (`rafale average`), paired by seed.

    python bench/weight_average.py                                    # built-in stories, 5 seeds
    python bench/weight_average.py --text ../shared/data/tinystories/train-head-2MiB.txt   # and that file too
    python bench/weight_average.py --no-stories --text FILE.txt       # that file only
    python bench/weight_average.py --seeds 0,1 --max-duration 6ba --save-every 2ba --average 2   # a smoke run

Every run is `rafale -c test/pythia_tinystories.yaml` (300 batches of 16 x 128 tokens, Muon on the blocks'
matrices, AdamW on the rest) with run.seed set and training.ema: {decay: --decay}. The EMA does not change the
training: one run per seed gives both the raw weights' and the EMA's validation loss at the same step (the last
evaluation), so "EMA on and off" is a paired comparison within each run, and a seed's data order and initial draw
are shared by the two arms. The run also keeps its last --average checkpoints (one every --save-every batches);
their weights' mean is written into a copy of the last checkpoint and scored by `rafale -c ... training.eval_only`
on the same validation split, by the same evaluator. The differences (EMA - raw, average - raw) are
rafale.stats.difference's: the mean over seeds, its 95% interval and p-value (paired t-test).

Nothing is tuned per arm: the recipe is the default job's, the decay is --decay (0.98 by default: the EMA's
half-life is 34 steps of the 300, and the initial weights weigh 0.98^300 = 0.2% at the end).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rafale.stats import difference, summarize  # noqa: E402

LOSS = "LanguageCrossEntropy"


def rafale(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "rafale", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"rafale {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def run_config(base: dict, seed: int, text: str | None, args, out: Path) -> Path:
    """The default job with this seed, the EMA and the checkpoints the average needs; returns its config's path."""
    raw = yaml.safe_load(yaml.safe_dump(base))
    name = f"{'text' if text else 'stories'}-seed{seed}"
    raw["run"].update(output_dir=str(out), name=name, seed=seed, restart=True)
    raw["training"].update(ema={"decay": args.decay}, precision=args.precision)
    if args.average:
        raw["training"].update(save_interval=args.save_every, checkpoints_to_keep=args.average)
    if args.max_duration:
        raw["training"].update(max_duration=args.max_duration, eval_interval=args.max_duration)
    if text is not None:
        raw["data"] = {k: v for k, v in raw["data"].items() if not k.startswith("num_")} | {"source": text}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def averaged_loss(config: Path, run_dir: Path, k: int) -> tuple[float, list[int]]:
    """The validation loss of the mean of the run's last k checkpoints (rafale.commands.average's), scored by an
    eval_only run of a copy of the last checkpoint holding that mean; and the batches averaged."""
    import torch

    from rafale.commands.average import average_weights, last_checkpoints
    from rafale.run_folder.checkpoints import batch_number, read_checkpoint

    chosen = last_checkpoints(run_dir, k)
    state = read_checkpoint(chosen[-1])
    state["state"]["model"] = {f"model.{name}": t for name, t in average_weights(chosen).items()}
    averaged = run_dir / f"average-last{k}.pt"  # beside the folder's files, not in checkpoints/ (no resume reads it)
    torch.save(state, averaged)
    rafale(["-c", str(config), "training.eval_only=true", f"training.load_path={averaged}", "run.restart=false"])
    evals = sorted((run_dir / "evals").iterdir())
    summary = json.loads((evals[-1] / "summary.json").read_text())
    return summary["validation"][LOSS], [batch_number(c) for c in chosen]


def measure(base: dict, seeds: list[int], text: str | None, args, out: Path) -> dict:
    """{arm: {seed: final validation loss}} for raw, ema and (with --average) average."""
    arms = {"raw": {}, "ema": {}, "average": {}}
    for seed in seeds:
        config = run_config(base, seed, text, args, out)
        rafale(["-c", str(config)])
        run_dir = out / config.stem
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["validation_step"] == summary["validation_ema_step"], summary
        arms["raw"][seed], arms["ema"][seed] = summary["validation"][LOSS], summary["validation_ema"][LOSS]
        line = f"raw {arms['raw'][seed]:.4f}, EMA {arms['ema'][seed]:.4f}"
        if args.average:
            arms["average"][seed], batches = averaged_loss(config, run_dir, args.average)
            line += f", average of batches {batches} {arms['average'][seed]:.4f}"
        print(f"weight_average: {config.stem} at step {summary['validation_step']}: {line}", flush=True)
    return {arm: values for arm, values in arms.items() if values}


def table(results: dict, decay: float, k: int) -> str:
    lines = ["| data | arm | final validation loss (mean ± 95% half-width) | arm - raw [95% interval] | p | verdict |",
             "|---|---|---|---|---|---|"]
    for data, arms in results.items():
        raw = arms["raw"]
        for arm, values in arms.items():
            name = {"raw": "raw weights", "ema": f"EMA, decay {decay}", "average": f"mean of the last {k} checkpoints"}[arm]
            if arm == "raw":
                lines.append(f"| {data} | {name} | {summarize(raw.values()).text()} | | | |")
                continue
            d = difference(values, raw)
            interval = f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" if d.low is not None else f"{d.estimate:+.4f}"
            p = f"{d.p_value:.2g}" if d.p_value is not None else "-"
            lines.append(f"| {data} | {name} | {d.a.text()} | {interval} | {p} | {verdict(d)} |")
    return "\n".join(lines)


def verdict(d) -> str:
    """rafale.stats' verdict with the arms named: A is the averaged weights, B the raw ones (lower loss is better)."""
    said = d.verdict(lower_is_better=True)
    return said.replace("A is better", "the average is better").replace("B is better", "the raw weights are better")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated run.seed values (default 0-4)")
    parser.add_argument("--decay", type=float, default=0.98, help="training.ema.decay (default 0.98)")
    parser.add_argument("--average", type=int, default=5, help="checkpoints to average (default 5; 0: none)")
    parser.add_argument("--save-every", default="20ba", help="training.save_interval for the average (default 20ba)")
    parser.add_argument("--precision", default="fp32", help="training.precision (default fp32: deterministic)")
    parser.add_argument("--text", default=None, help="also train on this text file (a .txt source)")
    parser.add_argument("--no-stories", action="store_true", help="skip the built-in stories (with --text)")
    parser.add_argument("--max-duration", default=None, help="training.max_duration (and eval_interval) for a "
                        "smoke run (default: the default job's 300ba)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().absolute() if args.out else Path(tempfile.mkdtemp(prefix="rafale-weight-average-"))
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "test" / "pythia_tinystories.yaml").read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = ([] if args.no_stories else [("built-in stories", None)]) + (
        [(Path(args.text).name, str(Path(args.text).expanduser().absolute()))] if args.text else [])
    if not datasets:
        parser.error("--no-stories leaves nothing to run: give --text too")
    results = {data: measure(base, seeds, text, args, out) for data, text in datasets}
    report = table(results, args.decay, args.average)
    print(report)
    (out / "weight_average.md").write_text(report + "\n")
    (out / "weight_average.json").write_text(json.dumps({d: {a: {str(s): v for s, v in arm.items()}
                                                             for a, arm in arms.items()} for d, arms in results.items()},
                                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
