"""The decoder's parts measured with seeds: Pythia, the Llama shape matched to it, then each trick on top.

    python bench/ablation.py --out /work/runs-ablation                  # built-in stories, every row
    python bench/ablation.py --out DIR --text ../shared/data/tinystories/train-head-2MiB.txt   # and that file too
    python bench/ablation.py --out DIR --report                        # the tables from the runs finished so far
    python bench/ablation.py --out DIR --max-duration 6ba --every 3 --rows pythia,llama   # a smoke run

Every run is `rafale -c` on the default job's data, token budget and recipe (test/pythia_tinystories.yaml: 300
batches of 16 x 128 tokens, Muon on the blocks' matrices at training.optimizer.lr, AdamW at training.lr on the
rest, 20 warmup batches), evaluated every --every batches. Rows, each adding one part to the row above it:

    pythia            the default job: pythia-tiny (LayerNorm, GELU, parallel residual, rotary on 1/4 of each head,
                      biases, an untied head)
    llama             the Llama shape (RMSNorm, SwiGLU, 2 KV heads for 4, whole-head rotary, sequential residual,
                      no biases) matched to pythia: its head untied like pythia's (llama-tiny ties it) and SwiGLU
                      388 wide (llama-tiny's 384 plus 4) so the non-embedding parameters match within 0.1%
    + qk_norm         RMSNorm on each head of q and k (adds 2 x 32 weights a layer)
    + zero_init_proj  each block's output projections start at zero
    + relu2           ReLU^2 MLP (two matrices, 582 wide: the same parameters as SwiGLU 388)
    + softcap         logits = 15 tanh(logits / 15)

The head is untied in every row, so "+ untied" of the first ablation is no longer a row: both arms are untied.

Each row is tuned, then measured: the tuning seed (0) runs at 0.5x, 1x and 2x the recipe's rates (training.lr and
training.optimizer.lr scaled together), the scale with the lowest final validation loss is kept, and seeds 1, 2, 3
run at it. A row's figure is the mean over seeds 1-3 with its 95% t interval (rafale.stats.summarize), and its
differences from the row above and from pythia are paired by seed (rafale.stats.difference). The aim: the first
evaluation at which a row's seed-mean validation curve reaches pythia's seed-mean final loss, against two-thirds of
the steps (200 of 300).

The tricks are in the order of their effect in the first ablation (QK-norm helped most, the soft-cap hurt), so a
study cut short keeps the likeliest best recipe. Runs are subprocesses (`python -m rafale -c`), two at a time by
default (--workers), each worker a row's six runs in turn; the rows go two at a time per data set (the stories'
pythia and llama, then the file's, then the next two of each), so a study cut short has Pythia against Llama. A run whose summary.json
says complete is not run again: rerun the same command to resume.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rafale.models.llama import PRESETS as LLAMA_PRESETS  # noqa: E402
from rafale.models.pythia import PRESETS as PYTHIA_PRESETS  # noqa: E402
from rafale.run_folder import read_metrics, read_summary  # noqa: E402
from rafale.stats import difference, summarize  # noqa: E402

VAL_LOSS = "metrics/eval/LanguageCrossEntropy"
PRESETS = {"pythia": PYTHIA_PRESETS, "llama": LLAMA_PRESETS}

# (row, the model section's fields on top of the row before it); the first two are whole model sections
ROWS = [
    ("pythia", {"type": "pythia", "preset": "pythia-tiny"}),
    ("llama", {"type": "llama", "preset": "llama-tiny", "tie_embeddings": False, "intermediate_size": 388}),
    ("+ qk_norm", {"qk_norm": True}),
    ("+ zero_init_proj", {"zero_init_proj": True}),
    ("+ relu2", {"mlp": "relu2", "intermediate_size": 582}),
    ("+ softcap", {"logit_softcap": 15.0}),
]
SCALES = (0.5, 1.0, 2.0)  # of both learning rates, on the tuning seed
TUNING_SEED = 0
SEEDS = (1, 2, 3)  # the seeds a row's figure is the mean of


def row_models() -> list[tuple[str, dict]]:
    """(row, its whole model section): the tricks accumulate from the llama row on."""
    sections, model = [], {}
    for name, fields in ROWS:
        model = dict(fields) if "type" in fields else {**model, **fields}
        sections.append((name, model))
    return sections


def decoder_config(model: dict):
    """The DecoderConfig a model section builds: its preset with the section's other fields over it."""
    fields = {k: v for k, v in model.items() if k not in ("type", "preset")}
    return dataclasses.replace(PRESETS[model["type"]][model["preset"]], **fields)


def non_embedding_count(model: dict) -> int:
    """N, counted by hand from the sizes: every block's norms, q/k/v and output projections, MLP and q/k norms, and
    the final norm; not the embedding or the head (untied in every row, so the same size in all)."""
    cfg = decoder_config(model)
    h, hs, inter = cfg.hidden_size, cfg.head_size, cfg.intermediate_size
    norm = 2 * h if cfg.norm == "layernorm" else h  # LayerNorm: weight and bias; RMSNorm: weight
    q, kv = cfg.num_heads * hs, cfg.kv_heads * hs
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv + h if cfg.attention_bias else 0)
    matrices = 3 if cfg.mlp == "swiglu" else 2  # gate, up, down; or up, down
    mlp = matrices * h * inter + ((matrices - 1) * inter + h if cfg.mlp_bias else 0)
    qk_norm = 2 * hs if cfg.qk_norm else 0
    return cfg.num_layers * (2 * norm + attention + mlp + qk_norm) + norm


# ----------------------------------------------------------------------------------------------------
# one run


def run_name(data: str, row: int, scale: float, seed: int) -> str:
    return f"{data}-row{row}-lr{scale:g}x-seed{seed}"


def write_config(base: dict, model: dict, scale: float, seed: int, text: str | None, every: int, out: Path,
                 name: str) -> Path:
    """The run's config file: the default job with this row's model, both rates times `scale`, and `seed`."""
    raw = yaml.safe_load(yaml.safe_dump(base))
    raw["model"] = dict(model)
    raw["run"].update(output_dir=str(out), name=name, seed=seed, restart=True)
    training = raw["training"]
    training.update(lr=training["lr"] * scale, eval_interval=f"{every}ba", save_interval=training["max_duration"])
    training["optimizer"] = {**training["optimizer"], "lr": training["optimizer"]["lr"] * scale}
    if text is not None:  # the file's documents, cut at data.doc_separator (<|endoftext|>), 5% held out
        raw["data"] = {k: v for k, v in raw["data"].items() if not k.startswith("num_")} | {"source": text}
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def is_complete(run_dir: Path) -> bool:
    summary = read_summary(run_dir) if (run_dir / "summary.json").exists() else None
    return summary is not None and summary.get("status") == "complete"


def train(config: Path, run_dir: Path) -> None:
    """`python -m rafale -c config` unless run_dir already holds its complete run; its output in run_dir.log."""
    if is_complete(run_dir):
        return
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "rafale", "-c", str(config)], stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if code != 0 or not is_complete(run_dir):
        raise RuntimeError(f"rafale -c {config} exited with {code} (log: {run_dir}.log)")
    print(f"ablation: {run_dir.name} done, final validation loss {evaluations(run_dir)[-1][1]:.4f}", flush=True)


def evaluations(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation loss) at each evaluation after the start."""
    return [(step, loss) for step, loss in read_metrics(run_dir)[VAL_LOSS] if step > 0]


# ----------------------------------------------------------------------------------------------------
# a row: tune on seed 0, measure on seeds 1-3


def best_scale(out: Path, data: str, row: int) -> float | None:
    """The scale whose tuning run ended lowest, or None while one of them is missing."""
    runs = {scale: out / run_name(data, row, scale, TUNING_SEED) for scale in SCALES}
    if not all(is_complete(d) for d in runs.values()):
        return None
    return min(SCALES, key=lambda scale: evaluations(runs[scale])[-1][1])


def run_row(base: dict, model: dict, text: str | None, every: int, out: Path, data: str, row: int) -> None:
    """The row's three tuning runs, evaluated at the end only (their final loss is all the choice reads; the
    evaluations do not change the training), then its three measured runs, evaluated every `every` batches."""
    for scale in SCALES:
        name = run_name(data, row, scale, TUNING_SEED)
        end = int(str(base["training"]["max_duration"]).removesuffix("ba"))
        train(write_config(base, model, scale, TUNING_SEED, text, end, out, name), out / name)
    scale = best_scale(out, data, row)
    for seed in SEEDS:
        name = run_name(data, row, scale, seed)
        train(write_config(base, model, scale, seed, text, every, out, name), out / name)


# ----------------------------------------------------------------------------------------------------
# the report


def row_results(out: Path, data: str, row: int) -> dict | None:
    """{"scale", "tuning": {scale: final}, "curves": {seed: [(step, loss)]}} of a row's finished runs, or None."""
    scale = best_scale(out, data, row)
    if scale is None:
        return None
    curves = {seed: evaluations(out / run_name(data, row, scale, seed)) for seed in SEEDS
              if is_complete(out / run_name(data, row, scale, seed))}
    tuning = {s: evaluations(out / run_name(data, row, s, TUNING_SEED))[-1][1] for s in SCALES}
    return {"scale": scale, "tuning": tuning, "curves": curves}


def mean_curve(curves: dict) -> list[tuple[int, float]]:
    """The seed-mean validation loss at each evaluation step every seed has."""
    steps = sorted(set.intersection(*(set(step for step, _ in c) for c in curves.values())))
    by_seed = [dict(c) for c in curves.values()]
    return [(step, sum(c[step] for c in by_seed) / len(by_seed)) for step in steps]


def first_step_at(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def finals(result: dict) -> dict:
    return {seed: curve[-1][1] for seed, curve in result["curves"].items()}


def diff_text(a: dict, b: dict, a_name: str, b_name: str) -> str:
    """'A - B [95%] | p | verdict' of two rows' final losses by seed, the verdict naming the better row."""
    d = difference(a, b)
    verdict = d.verdict().replace("A is better", f"{a_name} is better").replace("B is better", f"{b_name} is better")
    if d.low is None:
        return f"{d.estimate:+.4f} (no interval) | - | {verdict}"
    return f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | {d.p_value:.2g} | {verdict}"


def table(out: Path, data: str, title: str, names: list[str], total_steps: int) -> str:
    """One data set's tables: each row's mean, chosen scale and differences; then the aim's figure."""
    results = {i: row_results(out, data, i) for i in range(len(names))}
    done = {i: r for i, r in results.items() if r is not None and r["curves"]}
    if 0 not in done:
        return f"\n{title}: pythia's row has not finished\n"
    models = row_models()
    lines = [f"\n{title}\n", "| row | N | lr scale (tuning finals 0.5x / 1x / 2x) | final val loss, seeds 1-3 | "
             "vs row above [95%] | p | verdict | vs pythia [95%] | p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in done.items():
        edge = " (grid edge)" if r["scale"] in (SCALES[0], SCALES[-1]) else ""
        tuning = " / ".join(f"{r['tuning'][s]:.4f}" for s in SCALES)
        above = (diff_text(finals(r), finals(done[i - 1]), names[i], names[i - 1]) if i > 0 and i - 1 in done
                 else "- | - | -")
        pythia = diff_text(finals(r), finals(done[0]), names[i], names[0]) if i > 0 else "- | - | -"
        lines.append(f"| {names[i]} | {non_embedding_count(models[i][1]):,} | {r['scale']:g}x{edge} ({tuning}) | "
                     f"{summarize(finals(r).values()).text()} | {above} | {pythia} |")
    target = mean_curve(done[0]["curves"])[-1][1]
    two_thirds = total_steps * 2 // 3
    lines += [f"\nThe aim: the first evaluation where the seed-mean validation loss reaches pythia's seed-mean final "
              f"{target:.4f}, against {two_thirds} steps (two-thirds of {total_steps}), and each seed's own first "
              "evaluation at it (-: not reached)\n", "| row | seed-mean curve | first step at target | within two-thirds? | each seed |",
              "|---|---|---|---|---|"]
    for i, r in done.items():
        curve = mean_curve(r["curves"])
        step = first_step_at(curve, target)
        seeds = ", ".join(str(first_step_at(c, target) or "-") for _, c in sorted(r["curves"].items()))
        met = "yes" if step is not None and step <= two_thirds else "no"
        reached = str(step) if step is not None else f"not reached (final {curve[-1][1] - target:+.4f})"
        points = ", ".join(f"{s}: {loss:.3f}" for s, loss in curve)
        lines.append(f"| {names[i]} | {points} | {reached} | {met} | {seeds} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs (resumable: finished runs are kept)")
    parser.add_argument("--text", default=None, help="also train on this text file (a .txt source)")
    parser.add_argument("--no-stories", action="store_true", help="skip the built-in stories (with --text: that "
                        "file only)")
    parser.add_argument("--precision", default=None, help="every run's training.precision (default: the default "
                        "job's, amp_bf16)")
    parser.add_argument("--every", type=int, default=50, help="evaluate every this many batches (default 50)")
    parser.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--max-duration", default=None, help="every run's training.max_duration (default: the "
                        "default job's, 300ba); shorter for a smoke run")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--report", action="store_true", help="only print the tables of the runs finished so far")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "test" / "pythia_tinystories.yaml").read_text())
    if args.max_duration is not None:
        base["training"]["max_duration"] = args.max_duration
    if args.precision is not None:
        base["training"]["precision"] = args.precision
    datasets = ([] if args.no_stories else [("stories", None, "Built-in stories")]) + (
        [("text", args.text, f"{Path(args.text).name}")] if args.text else [])
    if not datasets:
        parser.error("--no-stories leaves nothing to run: give --text too")
    names = [name for name, _ in row_models()]
    wanted = names if args.rows is None else args.rows.split(",")
    unknown = [name for name in wanted if name not in names]
    if unknown:
        parser.error(f"--rows: unknown row(s) {unknown}; the rows are {names}")
    if not args.report:
        jobs = sorted(((i, data, text) for i, (name, _) in enumerate(row_models()) if name in wanted
                       for data, text, _ in datasets),
                      key=lambda job: (job[0] // 2, [d for d, _, _ in datasets].index(job[1]), job[0]))
        with ThreadPoolExecutor(args.workers) as pool:
            futures = [pool.submit(run_row, base, row_models()[i][1], text, args.every, out, data, i)
                       for i, data, text in jobs]
            for future in futures:
                future.result()
    total_steps = int(str(base["training"]["max_duration"]).removesuffix("ba"))
    report = "\n".join(table(out, data, title, names, total_steps) for data, _, title in datasets)
    print(report)
    (out / "ablation.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
