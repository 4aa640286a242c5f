"""rafale's entry point: `rafale -c cfg.yaml`.

    rafale -c cfg.yaml              prepare the data (cached), build the model, train and evaluate it
    DATA=1 rafale -c cfg.yaml       only prepare the data (also: --data-only)
    DEBUG=1 rafale -c cfg.yaml      train 10 epochs on one fixed batch, which a healthy model overfits (also: --debug)
    rafale -c cfg.yaml --restart    start run.name over, keeping its old folder as NAME.old-<time>
    rafale export RUN [--out DIR]   write a run's latest checkpoint in Hugging Face format
    rafale generate RUN --prompt P  generate text with a trained decoder (a run or a Hugging Face folder)
    rafale lm-eval RUN --tasks T    score a decoder with lm-evaluation-harness
    rafale plot RUN [RUN ...]       draw a run's curves, or overlay several runs

To add a model: write its nn.Module and Composer wrapper under rafale/models/, its presets in
rafale/models/configurations.py, and a builder in `model_config_dict` below.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from composer.utils import dist, reproducibility

if __package__ in (None, ""):  # run as `python rafale/main.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rafale.config import Config, RafaleError, load_config, resolve_model_config  # noqa: E402
from rafale.datapipes import (  # noqa: E402
    CausalLMCollator,
    CausalLMDataPipe,
    ClassificationCollator,
    ClassificationDataPipe,
    DataError,
    MLMCollator,
    MLMDataPipe,
    PreparedData,
)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def model_vocab_size(configured: int | None, data: PreparedData) -> int:
    """The embedding size: the configured one, or the tokenizer's rounded up to a multiple of 64 for fast matmuls."""
    if configured is None:
        return round_up(data.vocab_size, 64)
    if data.vocab_size > configured:
        raise DataError(
            f"model.vocab_size ({configured}) is smaller than the tokenizer's vocabulary ({data.vocab_size}); "
            "raise model.vocab_size or use a smaller tokenizer"
        )
    return configured


def with_pretrained(model, cfg: Config):
    """`model` with the weights of model.pretrained, when the config names one."""
    if cfg.model.pretrained is None:
        return model
    from rafale.config import pretrained_folder
    from rafale.models.hf import copy_pretrained, from_pretrained

    spec = cfg.model.pretrained
    source = spec if spec.startswith("hf:") else pretrained_folder(spec)
    return copy_pretrained(from_pretrained(source, dtype=torch.float32), model)


def build_pythia(model_cfg, data: PreparedData, cfg: Config):
    """A GPT-NeoX decoder for causal LM, and its collator."""
    from rafale.models.decoder import ComposerLM, GPTNeoX

    model_cfg.vocab_size = model_vocab_size(model_cfg.vocab_size, data)
    model = with_pretrained(GPTNeoX(model_cfg), cfg)
    from rafale.metrics import token_bytes

    return (ComposerLM(model, vocab_size=data.vocab_size, token_bytes=token_bytes(data.tokenizer)),
            CausalLMCollator(pad_token_id=data.pad_token_id))


def build_encoder(model_cfg, data: PreparedData, cfg: Config):
    """A BERT or RoBERTa encoder with the head of model.task (mlm or classification), and its collator."""
    from rafale.models.encoder import ComposerClassifier, ComposerMLM, build_encoder

    meta = data.meta
    model_cfg.vocab_size = model_vocab_size(model_cfg.vocab_size, data)
    if cfg.model.pretrained is not None and model_cfg.pad_token_id != meta["pad_token_id"]:
        raise DataError(
            f"data.tokenizer: its padding id {meta['pad_token_id']} differs from the pretrained model's "
            f"pad_token_id {model_cfg.pad_token_id}; use the checkpoint's tokenizer"
        )
    model_cfg.pad_token_id = meta["pad_token_id"]
    if model_cfg.family == "roberta":  # RoBERTa's positions count from the padding id
        model_cfg.position_offset = meta["pad_token_id"] + 1
    if cfg.model.task == "mlm":
        collator = MLMCollator(
            pad_token_id=meta["pad_token_id"],
            mask_token_id=meta["mask_token_id"],
            special_ids=tuple(meta[k] for k in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id")),
            vocab_size=data.vocab_size,
            mlm_probability=cfg.data.mlm_probability,
        )
        model = with_pretrained(build_encoder(model_cfg, "mlm"), cfg)
        return ComposerMLM(model, vocab_size=data.vocab_size), collator
    num_labels = len(meta["label_names"])
    if "num_labels" in cfg.model.overrides and model_cfg.num_labels != num_labels:
        raise DataError(f"model.num_labels ({model_cfg.num_labels}) differs from the data's {num_labels} classes")
    model_cfg.num_labels = num_labels
    model = with_pretrained(build_encoder(model_cfg, "classification"), cfg)
    return ComposerClassifier(model, num_labels), ClassificationCollator(pad_token_id=meta["pad_token_id"])


# model type (model.type in the config) -> builder of (Composer model, collator)
model_config_dict = {
    "pythia": build_pythia,
    "bert": build_encoder,
    "roberta": build_encoder,
}

# model.task -> the datapipe that prepares its data
datapipe_dict = {
    "causal_lm": CausalLMDataPipe,
    "mlm": MLMDataPipe,
    "classification": ClassificationDataPipe,
}


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


def prepare_data(cfg: Config) -> PreparedData:
    datapipe_cls = datapipe_dict[cfg.model.task]
    if datapipe_cls is CausalLMDataPipe:
        return datapipe_cls(cfg.data).load()
    return datapipe_cls(cfg.data, family=cfg.model.type).load()


def describe_vocabulary(data: PreparedData) -> str:
    """The vocabulary the model gets: a trained tokenizer may have fewer tokens than data.vocab_size asked for."""
    asked = data.meta.get("vocab_size_asked")
    if asked is None:
        return f"vocabulary: {data.vocab_size:,} tokens"
    shortfall = f", fewer than the {asked:,} data.vocab_size asked for" if data.vocab_size < asked else ""
    return f"vocabulary: {data.vocab_size:,} tokens (tokenizer trained here{shortfall})"


def print_data_summary(data: PreparedData):
    print(f"rafale: data cache: {data.path}")
    print(f"rafale:   {describe_vocabulary(data)}")
    for split, info in data.meta["splits"].items():
        if "blocks" in info:
            print(f"rafale:   {split}: {info['tokens']:,} tokens in {info['blocks']:,} blocks")
        else:
            print(f"rafale:   {split}: {info['examples']:,} examples")


def train_main(args) -> int:
    from rafale.train import DEBUG_EPOCHS, DEBUG_STEPS_PER_EPOCH, describe, run, without_dropout, write_summary

    cfg = load_config(args.config, args.overrides)
    cfg.run.restart = cfg.run.restart or args.restart
    data_only = args.data_only or env_flag("DATA")
    debug = args.debug or env_flag("DEBUG")
    data = prepare_data(cfg)
    print_data_summary(data)
    if data_only:
        return 0
    model_cfg = resolve_model_config(cfg)
    if debug:
        model_cfg = without_dropout(model_cfg)
    reproducibility.seed_all(cfg.run.seed)  # the initial weights too, not only what the Trainer draws
    model, collator = model_config_dict[cfg.model.type](model_cfg, data, cfg)
    if debug and hasattr(collator, "fixed_seed"):  # the same masks every step, so the target holds still
        collator.fixed_seed = cfg.run.seed
    result = run(cfg, data, model, collator, debug=debug)
    num_params = sum(p.numel() for p in model.parameters())
    print(describe(result, num_params))
    if dist.get_global_rank() == 0:
        write_summary(result, cfg, num_params)
    print(f"rafale: {describe_vocabulary(data)}")
    if debug and result.eval_loss_start is not None:
        print(f"rafale: DEBUG: loss on the batch went from {result.eval_loss_start:.4f} to {result.eval_loss_end:.4f} "
              f"in {DEBUG_EPOCHS} epochs of {DEBUG_STEPS_PER_EPOCH} steps ({result.eval_loss_end / result.eval_loss_start:.1%} of the start)")
    return 0


def export_command(argv) -> int:
    from rafale.export import export_main

    return export_main(argv)


def generate_command(argv) -> int:
    from rafale.generate import generate_main

    return generate_main(argv)


def lm_eval_command(argv) -> int:
    from rafale.lm_eval_adapter import lm_eval_main

    return lm_eval_main(argv)


def plot_command(argv) -> int:
    from rafale.plots import plot_main

    return plot_main(argv)


def runs_command(argv) -> int:
    from rafale.plots import runs_main

    return runs_main(argv)


def sweep_command(argv) -> int:
    from rafale.sweep import sweep_main

    return sweep_main(argv, train_main)


# `rafale <command> ...` -> (what runs it, what it does); without a command, rafale trains. Each has its own --help.
COMMANDS = {
    "export": (export_command, "write a run's checkpoint in Hugging Face format"),
    "generate": (generate_command, "generate text with a trained decoder (a run or a Hugging Face folder)"),
    "lm-eval": (lm_eval_command, "score a decoder with lm-evaluation-harness"),
    "plot": (plot_command, "draw a run's curves, or overlay several runs"),
    "runs": (runs_command, "one line per run: model, size, tokens, time, final validation metrics"),
    "sweep": (sweep_command, "train a grid of config overrides one after another, then compare them"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in COMMANDS:
            code = COMMANDS[argv[0]][0](argv[1:])
        else:
            code = train_main(parse_args(argv))
    except RafaleError as err:
        print(f"rafale: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("rafale: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
