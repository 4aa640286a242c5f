"""rafale's entry point: `rafale -c cfg.yaml`.

    rafale -c cfg.yaml              prepare the data (cached), build the model, train and evaluate it
    DATA=1 rafale -c cfg.yaml       only prepare the data (also: --data-only)
    DEBUG=1 rafale -c cfg.yaml      train 10 epochs on one fixed batch, which a healthy model overfits (also: --debug)
    rafale -c cfg.yaml --restart    start run.name over, keeping its old folder as NAME.old-<time>
    rafale average RUN --last K     average the weights of a run's last K checkpoints into an export
    rafale compare A B              A - B with its 95% interval and p-value (A, B: runs, or the seeds of an arm)
    rafale export RUN [--out DIR]   write a run's latest checkpoint in Hugging Face format
    rafale generate RUN --prompt P  generate text with a trained decoder (a run or a Hugging Face folder)
    rafale law RUNS [--holdout R]   fit L(N, D) = E + A/N^alpha + B/D^beta to finished runs, and check it
    rafale lm-eval RUN --tasks T    score a decoder with lm-evaluation-harness
    rafale models [FAMILY ...]      every preset's layers, widths, heads, N and total parameters
    rafale plot RUN [RUN ...]       draw a run's curves, or overlay several runs
    rafale zero-shot RUN --images DIR --classes "cat,dog"   classify images with a CLIP or SigLIP
    rafale predict RUN --file rows.csv   classify a file's texts with a trained classifier
    rafale score RUN --file text.txt     loss, perplexity and bits per byte of a file under a language model

This module is the command line only (arguments, commands, exit codes); each command imports what it needs
when it runs, so `rafale --help` and a config error answer without loading torch or Composer. Nothing imports
this module. To add a model, a datapipe or an optimizer, see docs/extending.md.
"""

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python rafale/main.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rafale.errors import RafaleError  # noqa: E402


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def parse_args(argv):
    commands = "\n".join(f"  rafale {name:<9} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="rafale", description="Train small transformers from a YAML config.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"""commands (rafale COMMAND --help for each):
{commands}

examples:
  rafale -c test/pythia_tinystories.yaml                   train the default model
  rafale -c cfg.yaml training.lr=3e-3 model.num_layers=2   the same with two values changed
  DATA=1 rafale -c cfg.yaml                                only prepare the data""")
    parser.add_argument("-c", "--config", required=True, help="path to the YAML config")
    parser.add_argument("--data-only", action="store_true", help="only prepare and cache the data (same as DATA=1)")
    parser.add_argument("--debug", action="store_true", help="overfit one batch for 10 epochs (same as DEBUG=1)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="change a config value for this run, e.g. training.lr=3e-3 model.num_layers=2 "
                        "(or --training.lr 3e-3); recorded in the run's config.yaml")
    parser.add_argument("--restart", action="store_true",
                        help="start run.name over, keeping its old folder as NAME.old-<time> (same as run.restart: true)")
    return parser.parse_intermixed_args(undash_overrides(argv))


def undash_overrides(argv: list[str]) -> list[str]:
    """`--training.lr 3e-3` and `--training.lr=3e-3` become `training.lr=3e-3`; other arguments are kept."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=")[0]:
            if "=" not in arg and i + 1 < len(argv):
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            arg = arg[2:]
        out.append(arg)
        i += 1
    return out


def train_main(args) -> int:
    from rafale.config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.run.restart = cfg.run.restart or getattr(args, "restart", False)
    from rafale.run.optim import check_optimizer  # torch's optimizers: training needs them anyway

    check_optimizer(cfg.training)  # a wrong optimizer name, argument or value before any data work
    from rafale.resolve import resolve_model_config  # torch: the model files define the sizes

    model_cfg = resolve_model_config(cfg)  # the model section's errors before any data work
    if args.data_only or env_flag("DATA"):  # the data alone needs neither Composer nor the model
        from rafale.data import DATAPIPES
        from rafale.data.cache import print_data_summary
        from rafale.resolve import family_of

        # rafale.run.train.datapipe_for, without importing Composer (resolve_model_config has set model.task)
        print_data_summary(DATAPIPES[cfg.model.task](cfg.data, **family_of(cfg).data).load())
        return 0
    from rafale.run.train import train  # Composer: only once the config is known to be good

    return train(cfg, model_cfg, data_only=args.data_only or env_flag("DATA"), debug=args.debug or env_flag("DEBUG"),
                 started=getattr(args, "started", None))


def average_command(argv) -> int:
    from rafale.commands.average import average_main

    return average_main(argv)


def compare_command(argv) -> int:
    from rafale.commands.compare import compare_main

    return compare_main(argv)


def export_command(argv) -> int:
    from rafale.commands.export import export_main

    return export_main(argv)


def generate_command(argv) -> int:
    from rafale.commands.generate import generate_main

    return generate_main(argv)


def law_command(argv) -> int:
    from rafale.commands.law import law_main

    return law_main(argv)


def lm_eval_command(argv) -> int:
    from rafale.commands.lm_eval import lm_eval_main

    return lm_eval_main(argv)


def models_command(argv) -> int:
    from rafale.commands.models import models_main

    return models_main(argv)


def plot_command(argv) -> int:
    from rafale.commands.runs import plot_main

    return plot_main(argv)


def runs_command(argv) -> int:
    from rafale.commands.runs import runs_main

    return runs_main(argv)


def zero_shot_command(argv) -> int:
    from rafale.commands.zero_shot import zero_shot_main

    return zero_shot_main(argv)


def predict_command(argv) -> int:
    from rafale.commands.predict import predict_main

    return predict_main(argv)


def score_command(argv) -> int:
    from rafale.commands.score import score_main

    return score_main(argv)


def sweep_command(argv) -> int:
    from rafale.commands.sweep import sweep_main

    return sweep_main(argv, train_main, on_every_rank)


def on_every_rank(decide):
    """decide() on rank 0 and its result on every process, under Composer's launcher (rafale.run.resilience's
    decided_on_rank_zero, which imports Composer: only then); decide() itself in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return decide()
    import torch
    from composer.utils import dist

    from rafale.run.resilience import decided_on_rank_zero

    dist.initialize_dist("gpu" if torch.cuda.is_available() else "cpu")
    return decided_on_rank_zero(decide)


# `rafale <command> ...` -> (what runs it, what it does); without a command, rafale trains. Each has its own --help.
COMMANDS = {
    "average": (average_command, "average the weights of a run's last K checkpoints into a Hugging Face export"),
    "compare": (compare_command, "is arm A better than B: the difference with its 95% interval and p-value"),
    "export": (export_command, "write a run's checkpoint in Hugging Face format"),
    "generate": (generate_command, "generate text with a trained decoder (a run or a Hugging Face folder)"),
    "law": (law_command, "fit a scaling law L(N, D) to finished runs; --holdout checks it on runs it did not see"),
    "lm-eval": (lm_eval_command, "score a decoder with lm-evaluation-harness"),
    "models": (models_command, "every preset of every model family: layers, widths, heads, N and total parameters"),
    "plot": (plot_command, "draw a run's curves, or overlay several runs"),
    "predict": (predict_command, "classify the texts of a file with a trained classifier (labels, probabilities)"),
    "runs": (runs_command, "one line per run: model, size, tokens, time, final validation metrics"),
    "score": (score_command, "loss, perplexity and bits per byte of a text file under a trained language model"),
    "sweep": (sweep_command, "train a grid of config overrides one after another, then compare them"),
    "zero-shot": (zero_shot_command, "classify a folder of images with a CLIP or SigLIP (a run or an HF folder)"),
}


HUGE_PAGES = ("THP_MEM_ALLOC_ENABLE", "1")  # torch's CPU allocator: tensors of 2 MB and more on huge pages


def main(argv=None):
    started = time.perf_counter()  # a run's start-up time counts from here
    argv = sys.argv[1:] if argv is None else argv
    # torch reads this once, at its first allocation (it is not imported yet): huge pages for big tensors mean far
    # fewer page faults each step (pythia-70m, T=256, B=4: 17,000 instead of 204,000, and steps 6-9% faster).
    # Where the system has transparent huge pages off, torch's madvise does nothing. Set it to 0 to opt out.
    os.environ.setdefault(*HUGE_PAGES)
    try:
        if argv and argv[0] in COMMANDS:
            code = COMMANDS[argv[0]][0](argv[1:])
        else:
            args = parse_args(argv)
            args.started = started
            code = train_main(args)
    except RafaleError as err:
        print(f"rafale: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("rafale: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
