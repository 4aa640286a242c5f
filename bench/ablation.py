"""The decoder's parts measured: the Pythia default, the Llama shape, and each speed trick added one at a time.

    python bench/ablation.py                                          # built-in stories, fp32 and bf16
    python bench/ablation.py --precision fp32                         # one precision
    python bench/ablation.py --text ../shared/data/tinystories/train-head-2MiB.txt   # and on a text file too
    python bench/ablation.py --precision fp32 --max-duration 6ba --every 3             # a smoke run of the script

Every row is `rafale -c` on the default job's data, token budget and recipe (test/pythia_tinystories.yaml: 300
batches of 16 x 128 tokens, Muon on the blocks' matrices, AdamW on the rest), evaluated every --every batches.
Rows, each adding to the one above it (as in modded-nanogpt's record table):

    pythia            the default job: pythia-tiny (LayerNorm, GELU, parallel residual, rotary on 1/4 of each head)
    llama             the Llama shape at the same width and depth: test/llama_tinystories.yaml (llama-tiny)
    + relu2           ReLU^2 MLP (two matrices; intermediate 512, about SwiGLU-384's parameters)
    + qk_norm         RMSNorm on each head of q and k (with SwiGLU: Qwen3's shape)
    + zero_init_proj  each block's output projections start at zero
    + untied          the head apart from the embedding
    + softcap         logits = 15 tanh(logits / 15)

Per data set and precision, side by side: the final validation loss at equal tokens, and the steps and wall time
(training and evaluations, from the run's metrics) until a validation loss at or below the Pythia row's final one.
Wall times on a shared machine are noisy: say "under load" with any figure taken on one.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from time_to_target import first_crossing, rafale_points  # noqa: E402

# (row, the model section's fields on top of the row before it); the first two are whole model sections
ROWS = [
    ("pythia", {"type": "pythia", "preset": "pythia-tiny"}),
    ("llama", {"type": "llama", "preset": "llama-tiny"}),
    ("+ relu2", {"mlp": "relu2", "intermediate_size": 512}),
    ("+ qk_norm", {"qk_norm": True}),
    ("+ zero_init_proj", {"zero_init_proj": True}),
    ("+ untied", {"tie_embeddings": False}),
    ("+ softcap", {"logit_softcap": 15.0}),
]


def row_configs() -> list[tuple[str, dict]]:
    """(row, its whole model section): the tricks accumulate from the llama row on."""
    sections, model = [], {}
    for name, fields in ROWS:
        model = dict(fields) if "type" in fields else {**model, **fields}
        sections.append((name, model))
    return sections


def run_row(base: dict, model: dict, precision: str, text: str | None, every: int, out: Path, name: str):
    """(step, seconds, validation loss) at each evaluation of one row's run."""
    raw = yaml.safe_load(yaml.safe_dump(base))
    raw["model"] = dict(model)
    raw["run"].update(output_dir=str(out), name=name, restart=True)
    raw["training"].update(precision=precision, eval_interval=f"{every}ba", save_interval=raw["training"]["max_duration"])
    if text is not None:
        raw["data"] = {k: v for k, v in raw["data"].items() if not k.startswith("num_")} | {"source": text}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return rafale_points(path)


def table(results: dict) -> str:
    """One markdown table per (data, precision): final loss, and steps / seconds to the Pythia row's final loss."""
    lines = []
    for (data, precision), rows in results.items():
        target = rows["pythia"][-1][2]
        lines += [f"\n{data}, {precision} (target: pythia's final validation loss {target:.4f})\n",
                  "| row | final val loss | steps to target | s to target | s in all |", "|---|---|---|---|---|"]
        for name, points in rows.items():
            reached = first_crossing(points, target)
            to_target = (f"{reached[0]} | {reached[1]:.0f}" if reached else "not reached | -")
            lines.append(f"| {name} | {points[-1][2]:.4f} | {to_target} | {points[-1][1]:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="fp32,amp_bf16", help="comma-separated (default fp32,amp_bf16)")
    parser.add_argument("--text", default=None, help="also train on this text file (a .txt source)")
    parser.add_argument("--every", type=int, default=50, help="evaluate every this many batches (default 50)")
    parser.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--max-duration", default=None, help="every row's training.max_duration (default: the "
                        "default job's, 300ba); shorter for a smoke run")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rafale-ablation-"))
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "test" / "pythia_tinystories.yaml").read_text())
    if args.max_duration is not None:
        base["training"]["max_duration"] = args.max_duration
    wanted = None if args.rows is None else set(args.rows.split(","))
    datasets = [("built-in stories", None)] + ([(Path(args.text).name, args.text)] if args.text else [])
    results = {}
    for data, text in datasets:
        for precision in args.precision.split(","):
            rows = results.setdefault((data, precision), {})
            for i, (name, model) in enumerate(row_configs()):
                if wanted is None or name in wanted or name == "pythia":
                    tag = f"{'text' if text else 'stories'}-{precision}-{i}"
                    rows[name] = run_row(base, model, precision, text, args.every, out, tag)
                    print(f"ablation: {data}, {precision}, {name}: " + ", ".join(
                        f"{step}: {loss:.3f} @ {s:.0f}s" for step, s, loss in rows[name]), flush=True)
    report = table(results)
    print(report)
    (out / "ablation.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
