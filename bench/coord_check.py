"""muP's coordinate check (Yang, Hu et al. 2022, Tensor Programs V, figure 5; microsoft/mup's `get_coord_data`):
the size of each layer's activations over the first steps of training, at several widths.

    python bench/coord_check.py                            # widths 64-512, 10 steps, both parametrisations
    python bench/coord_check.py --widths 32,64 --steps 2 --batch 2 --plot /tmp/cc.png    # a smoke run

The decoder (rafale.models.decoder, Pythia's parts) at widths 64, 128, 256 and 512, 4 layers of 4 heads (the heads
widen with the model: 16 to 128 dims, so muP's attention scale is exercised), intermediate_size 4 x width, trained
with rafale's own AdamW groups (rafale.run.optim.build_optimizer: lr / m on the blocks' matrices under muP) at one
fixed learning rate, no warmup, no clipping, no weight decay, on byte tokens (vocabulary 256) of the built-in
stories. At each step, before the update, the mean |x| of the embedding's output, of each block's output and of the
logits is recorded on that step's batch, averaged over --seeds.

Under the standard parametrisation the activations grow with width as training moves them (the logits and the
deeper blocks first); under muP (base width 64) they stay flat in width: the table's last column, the ratio of the
widest model's value to the narrowest's, is near 1. The plot (media/coord_check.png) is microsoft/mup's figure:
one panel per step shown, x = width, one line per layer; standard above, muP below.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rafale.config import TrainingConfig  # noqa: E402
from rafale.data.stories import generate_stories  # noqa: E402
from rafale.models.decoder import Decoder, DecoderConfig  # noqa: E402
from rafale.run.optim import build_optimizer  # noqa: E402

VOCAB = 256  # bytes


def story_bytes(num_stories: int = 2000, seed: int = 0) -> torch.Tensor:
    """The built-in stories as one long tensor of byte ids."""
    text = "\n".join(generate_stories(num_stories, seed=seed))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def random_batches(tokens: torch.Tensor, steps: int, batch: int, length: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches (batch, length + 1) of windows at random offsets, the same for every width."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length - 1, (steps, batch), generator=g)
    return [torch.stack([tokens[s: s + length + 1] for s in row.tolist()]) for row in starts]


def build_model(width: int, parametrization: str, base_width: int, layers: int, heads: int, seq_len: int,
                seed: int) -> Decoder:
    cfg = DecoderConfig(vocab_size=VOCAB, hidden_size=width, num_layers=layers, num_heads=heads,
                        intermediate_size=4 * width, max_position_embeddings=seq_len,
                        mup_base_width=base_width if parametrization == "mup" else None)
    torch.manual_seed(seed)
    return Decoder(cfg)


def watched_modules(model: Decoder) -> dict:
    """name -> module whose output the check records: the embedding, each block, the head (the logits)."""
    return {"embedding": model.embed, **{f"block {i}": b for i, b in enumerate(model.layers)}, "logits": model.head}


def coordinates(model: Decoder, batches: list[torch.Tensor], lr: float) -> dict[str, list[float]]:
    """name -> mean |output| at each step (before that step's update)."""
    optimizer = build_optimizer(model, TrainingConfig(lr=lr, weight_decay=0.0), "cpu")
    sizes: dict[str, list[float]] = {name: [] for name in watched_modules(model)}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: sizes[name].append(out.abs().mean().item()))
             for name, module in watched_modules(model).items()]
    try:
        for batch in batches:
            logits = model(batch[:, :-1])  # the logits path, so that the head's hook sees them
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def coord_check(widths, parametrizations, steps, batch, seq_len, lr, seeds, base_width, layers, heads) -> dict:
    """{parametrization: {width: {layer: [mean |x| per step]}}}, averaged over seeds."""
    tokens = story_bytes()
    out: dict = {}
    for parametrization in parametrizations:
        out[parametrization] = {}
        for width in widths:
            runs = []
            for seed in range(seeds):
                batches = random_batches(tokens, steps, batch, seq_len, seed)
                model = build_model(width, parametrization, base_width, layers, heads, seq_len, seed)
                runs.append(coordinates(model, batches, lr))
            out[parametrization][width] = {name: [sum(r[name][s] for r in runs) / seeds for s in range(steps)]
                                           for name in runs[0]}
            print(f"  {parametrization:8s} width {width:4d}: logits' mean |x| at the last step "
                  f"{out[parametrization][width]['logits'][-1]:.3g}", flush=True)
    return out


def shown_steps(steps: int) -> list[int]:
    """The steps (0-based) the table and plot show: the first, two between, the last."""
    return sorted({0, steps // 3, 2 * steps // 3, steps - 1})


def table(data: dict, widths: list[int], steps: int) -> str:
    lines = []
    for parametrization, by_width in data.items():
        lines.append(f"\n{parametrization}: mean |activation| (rows: layer, step; columns: width)")
        lines.append(f"{'layer':10s} {'step':>4s} " + " ".join(f"{w:>9d}" for w in widths)
                     + f" {widths[-1]}/{widths[0]:<4d}")
        for name in by_width[widths[0]]:
            for s in shown_steps(steps):
                row = [by_width[w][name][s] for w in widths]
                ratio = row[-1] / row[0]
                lines.append(f"{name:10s} {s + 1:4d} " + " ".join(f"{v:9.3g}" for v in row) + f" {ratio:9.2f}")
    return "\n".join(lines)


def plot(data: dict, widths: list[int], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = shown_steps(steps)
    rows = list(data)
    fig, axes = plt.subplots(len(rows), len(shown), figsize=(3.2 * len(shown), 3.0 * len(rows)), squeeze=False,
                             sharey="row")
    for r, parametrization in enumerate(rows):
        names = list(data[parametrization][widths[0]])
        for c, s in enumerate(shown):
            ax = axes[r][c]
            for i, name in enumerate(names):
                ax.plot(widths, [data[parametrization][w][name][s] for w in widths], marker="o", ms=3,
                        color=plt.cm.viridis(i / max(1, len(names) - 1)), label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'muP' if parametrization == 'mup' else 'standard'}, step {s + 1}", fontsize=9)
            ax.set_xlabel("width")
            if c == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    save_plot(fig, path)


def save_plot(fig, path: Path) -> None:
    """Lay out `fig` and write it to `path` (its folder made), then free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The models and data this script and bench/mup_transfer.py share: widths, parametrisations, batch shape,
    muP's base width, layers and heads."""
    parser.add_argument("--widths", default="64,128,256,512")
    parser.add_argument("--parametrizations", default="standard,mup")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--base-width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=ROOT / "media" / "coord_check.png")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    print(f"coordinate check: widths {widths}, {args.layers} layers of {args.heads} heads, {args.steps} steps of "
          f"{args.batch} x {args.seq_len} byte tokens, AdamW lr {args.lr} (constant), base width {args.base_width}, "
          f"{args.seeds} seed(s)")
    data = coord_check(widths, args.parametrizations.split(","), args.steps, args.batch, args.seq_len, args.lr,
                       args.seeds, args.base_width, args.layers, args.heads)
    print(table(data, widths, args.steps))
    plot(data, widths, args.steps, args.plot)
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
