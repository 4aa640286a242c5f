"""muP's learning-rate transfer (Tensor Programs V, figure 1): the best learning rate of a grid at each width, under
the standard parametrisation and under muP.

    python bench/mup_transfer.py                                       # widths 64-512, lr 2^-11 .. 2^-4, 200 steps
    python bench/mup_transfer.py --widths 32,64 --lrs 1e-3,4e-3 --steps 3 --eval-batches 1 --out /tmp/t.md   # smoke
    python bench/mup_transfer.py --parametrizations mup > mup.log     # one parametrisation a process (a core each),
    python bench/mup_transfer.py --report-from sp.log mup.log         # then the table and plot from their lines

The models and data are bench/coord_check.py's (the decoder with Pythia's parts, 4 layers of 4 heads, intermediate
4 x width, byte tokens of the built-in stories, muP's base width 64), trained with rafale's AdamW groups
(rafale.run.optim.build_optimizer, weight decay 0.1) under a linear warmup over the first 10% of the steps and a
cosine decay to 10% of the rate, the same batches for every width and rate. The score of a run is its validation
loss at the end (--eval-batches held-out batches); a run that diverges scores inf.

The aim: under muP the best rate moves by at most one grid step (a factor 2) from width 64 to 512, where the
standard one moves more. Written: a markdown table (--out, bench/results-mup.md) of every loss, the best rate per
width and how far it moves in grid steps (with --seeds > 1, the mean over seeds and each seed's own best, the
spread of the choice), and the plot of loss against rate, one line per width (media/mup_transfer.png).
"""

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coord_check import ROOT, add_model_arguments, build_model, random_batches, save_plot, story_bytes  # noqa: E402

from rafale.config import TrainingConfig  # noqa: E402
from rafale.run.optim import build_optimizer  # noqa: E402


def schedule(step: int, steps: int, warmup_fraction: float = 0.1, final: float = 0.1) -> float:
    """The rate's factor at `step`: a linear warmup, then a cosine decay to `final` (rafale's default schedule)."""
    warmup = max(1, int(warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def final_loss(width: int, parametrization: str, lr: float, train, held_out, seed: int, args) -> float:
    """Validation loss after training one model on `train`; inf if it diverged."""
    model = build_model(width, parametrization, args.base_width, args.layers, args.heads, args.seq_len, seed)
    optimizer = build_optimizer(model, TrainingConfig(lr=lr, weight_decay=0.1), "cpu")
    group_lrs = [g["lr"] for g in optimizer.param_groups]  # muP's per-group rates, each scaled by the schedule
    for step, batch in enumerate(train):
        for g, base in zip(optimizer.param_groups, group_lrs):
            g["lr"] = base * schedule(step, len(train))
        loss = model(batch[:, :-1], labels=batch[:, 1:])
        if not torch.isfinite(loss):
            return math.inf
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        losses = [model(b[:, :-1], labels=b[:, 1:]).item() for b in held_out]
    mean = sum(losses) / len(losses)
    return mean if math.isfinite(mean) else math.inf


def sweep(args) -> dict:
    """{parametrization: {width: {lr: [loss per seed]}}}."""
    tokens = story_bytes()
    split = int(0.9 * len(tokens))
    results: dict = {}
    for parametrization in args.parametrizations:
        results[parametrization] = {}
        for width in args.widths:
            results[parametrization][width] = {}
            for lr in args.lrs:
                losses = []
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    train = random_batches(tokens[:split], args.steps, args.batch, args.seq_len, seed)
                    held_out = random_batches(tokens[split:], args.eval_batches, args.batch, args.seq_len, 1000)
                    started = time.perf_counter()
                    losses.append(final_loss(width, parametrization, lr, train, held_out, seed, args))
                    print(f"  {parametrization:8s} width {width:4d} lr {lr:.3g} seed {seed}: loss {losses[-1]:.4f} "
                          f"({time.perf_counter() - started:.1f} s)", flush=True)
                results[parametrization][width][lr] = losses
    return results


LINE = re.compile(r"^\s+(\w+)\s+width\s+(\d+) lr (\S+) seed (\d+): loss (\S+) ")


def results_from_logs(paths: list[Path], grid: list[float]) -> dict:
    """{parametrization: {width: {lr: [loss per seed]}}} from the lines sweep() printed (processes run apart). A
    line prints its rate to 3 digits (0.000488): each is the grid's rate within 1%."""
    on_grid = lambda lr: next((g for g in grid if abs(g / lr - 1) < 0.01), lr)
    results: dict = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if match := LINE.match(line):
                parametrization, width, lr, seed, loss = match.groups()
                by_lr = results.setdefault(parametrization, {}).setdefault(int(width), {})
                by_lr.setdefault(on_grid(float(lr)), []).append(float(loss))
    return results


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def best_lr(by_lr: dict, seed: int | None = None) -> float:
    """The grid's rate of lowest loss (the mean over seeds, or one seed's)."""
    return min(by_lr, key=lambda lr: by_lr[lr][seed] if seed is not None else mean(by_lr[lr]))


def grid_steps(lrs: list[float], chosen: list[float]) -> int:
    """How many grid steps apart the highest and lowest chosen rates are."""
    order = sorted(lrs)
    positions = [order.index(lr) for lr in chosen]
    return max(positions) - min(positions)


def report(results: dict, args) -> str:
    lines = [f"widths {args.widths}, {args.layers} layers of {args.heads} heads, {args.steps} steps of {args.batch} x "
             f"{args.seq_len} byte tokens of the built-in stories, AdamW (weight decay 0.1), warmup 10% then cosine "
             f"to 10%; validation loss on {args.eval_batches} held-out batches; muP base width {args.base_width}; "
             f"{args.seeds} seed(s) per cell (the mean shown).", ""]
    for parametrization, by_width in results.items():
        name = "muP" if parametrization == "mup" else "standard"
        lines += [f"**{name}**", "", "| lr | " + " | ".join(f"width {w}" for w in by_width) + " |",
                  "|---|" + "---|" * len(by_width)]
        for lr in args.lrs:
            cells = []
            for w in by_width:
                if lr not in by_width[w]:
                    cells.append("not run")
                    continue
                loss = mean(by_width[w][lr])
                cell = f"{loss:.4f}" if math.isfinite(loss) else "diverged"
                cells.append(f"**{cell}**" if lr == best_lr(by_width[w]) else cell)
            lines.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
        bests = [best_lr(by_width[w]) for w in by_width]
        lines += ["", f"best lr per width: {', '.join(f'{w}: {lr:.3g}' for w, lr in zip(by_width, bests))}; it moves "
                  f"{grid_steps(args.lrs, bests)} grid step(s) (factor {2 ** grid_steps(args.lrs, bests):g} on a "
                  "factor-2 grid)"]
        at_edge = [w for w, lr in zip(by_width, bests) if len(by_width[w]) < len(args.lrs)
                   and lr in (min(by_width[w]), max(by_width[w]))]
        if at_edge:
            lines.append(f"width(s) {at_edge}: the best is at the edge of the rates run there (the grid was cut "
                         "short): the true best may lie beyond")
        if args.seeds > 1:
            per_seed = [grid_steps(args.lrs, [best_lr(by_width[w], s) for w in by_width]) for s in range(args.seeds)]
            lines.append(f"each seed's own best rates move {per_seed} grid step(s)")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False, sharey=True)
    for ax, (parametrization, by_width) in zip(axes[0], results.items()):
        for i, (width, by_lr) in enumerate(by_width.items()):
            rates = [lr for lr in args.lrs if lr in by_lr]  # a grid cut short: the rates run
            losses = [mean(by_lr[lr]) for lr in rates]
            ax.plot(rates, losses, marker="o", ms=3, label=f"width {width}",
                    color=plt.cm.viridis(i / max(1, len(by_width) - 1)))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_title("muP" if parametrization == "mup" else "standard parametrisation")
    # one range for the panels (they share the axis): every finite loss of either parametrisation
    finite = [mean(v) for by_width in results.values() for by_lr in by_width.values() for v in by_lr.values()
              if math.isfinite(mean(v))]
    if finite:
        axes[0][0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5) + 0.05)
    axes[0][0].set_ylabel("validation loss")
    axes[0][-1].legend(fontsize=8)
    save_plot(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--lrs", default=",".join(f"{2.0 ** e:g}" for e in range(-11, -3)), help="the grid")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 "
                        "(a repeat on another seed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-mup.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "media" / "mup_transfer.png")
    parser.add_argument("--report-from", type=Path, nargs="+", metavar="LOG",
                        help="train nothing: the table and plot from the lines of these runs' output")
    args = parser.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",")]
    args.parametrizations = args.parametrizations.split(",")
    args.lrs = sorted(float(lr) for lr in args.lrs.split(","))
    started = time.perf_counter()
    if args.report_from:
        results = results_from_logs(args.report_from, args.lrs)
        missing = [f"{p} width {w}" for p in args.parametrizations for w in args.widths
                   if not results.get(p, {}).get(w)]
        if missing:
            sys.exit(f"--report-from: no run of {', '.join(missing)} in {[str(p) for p in args.report_from]}")
        # a rate a width did not run (a grid cut short) is a "not run" cell
        results = {p: {w: {lr: results[p][w][lr] for lr in args.lrs if lr in results[p][w]} for w in args.widths}
                   for p in args.parametrizations}
        text = report(results, args) + "\n"
    else:
        results = sweep(args)
        text = report(results, args) + f"\n({time.perf_counter() - started:.0f} s in all)\n"
    print("\n" + text)
    args.out.write_text("# muP's learning-rate transfer (bench/mup_transfer.py)\n\n" + text)
    plot(results, args, args.plot)
    print(f"written: {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
