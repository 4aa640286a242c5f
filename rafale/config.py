"""Typed configuration: the YAML file, checked before any work starts.

A config has four sections, each a dataclass below whose fields carry their own documentation
(`help=`). `load_config` reads the YAML with `yaml.safe_load`, rejects unknown keys (suggesting the
nearest valid name), wrong types, missing sections and impossible values, and raises `ConfigError`
naming the key path and what was expected. `config_reference()` renders the same documentation as a
markdown table for docs/config.md, so the two cannot drift apart.

    run:      name: my-run                # where the run's files go, and how autoresume finds it
    data:     source: stories             # the embedded story generator, a local file, or hf:<name>
    model:    type: pythia                # a model family: a key of FAMILIES (rafale/models/families.py)
              preset: pythia-tiny         # a size from the family's presets (rafale/models/pythia.py)
              num_layers: 4               # any field of the family's config overrides the preset
    training: max_duration: 1ep
"""

import dataclasses
import difflib
import fractions
import glob
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml


from rafale.errors import ConfigError, RafaleError, read_utf8  # noqa: F401 (RafaleError: imported from here by older code)


def option(default=dataclasses.MISSING, help: str = "", default_factory=dataclasses.MISSING):
    """A dataclass field that documents itself."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


DURATION_HELP = "a Composer time string: '2ep' (epochs), '500ba' (batches), '1000000tok' (tokens)"
TIME_HELP = DURATION_HELP + ", '0.1dur' (a fraction of max_duration)"


@dataclass
class RunConfig:
    name: str = option("rafale-run", "Run name; the run's folder is output_dir/name. Re-running the same name resumes it.")
    output_dir: str = option("runs", "Folder that holds one sub-folder per run (config, checkpoints, logs).")
    seed: int = option(42, "Seed for weights, data order and dropout.")
    device: Literal["auto", "cpu", "gpu"] = option("auto", "'auto' uses a GPU when there is one.")
    autoresume: bool = option(True, "Resume from the run folder's latest checkpoint when there is one (rafale's "
                              "own resume: every process loads the checkpoint rank 0 picked and checked).")
    restart: bool = option(
        False, "Start this run.name over: set the existing run folder aside as NAME.old-<timestamp> (also: "
        "--restart). Without it, resuming a run folder whose checkpoints were trained with another config (other "
        "data, tokenizer, model, optimizer or schedule; see rafale/run_folder/__init__.py APPLIED_ON_RESUME for what may change) "
        "is an error."
    )
    resume_fallback: bool = option(
        False, "When the latest checkpoint is unreadable (cut short by a crash), set it aside and resume from the "
        "one before it instead of stopping with an error."
    )
    loggers: list[Literal["tensorboard", "wandb"]] = option(
        default_factory=list,
        help="Extra Composer loggers: tensorboard (writes RUN/tensorboard) and wandb (Weights & Biases; "
        "WANDB_MODE=offline works without a network). Metrics always go to RUN/metrics.jsonl and RUN/metrics.png.",
    )
    wandb_project: str = option("rafale", "Weights & Biases project name (with loggers: [wandb]).")


@dataclass
class DataConfig:
    source: Union[str, dict] = option(
        "stories",
        "'stories' (the embedded story generator), a local path (.txt, .jsonl, .json, .parquet, .csv, or a folder "
        "written by datasets.save_to_disk), 'hf:<name>' for a Hugging Face hub dataset (online only), or separate "
        "files per split: {train: train.txt, validation: valid.txt}, each a path, a glob ('shards/*.jsonl') or a "
        "list of them (without validation, val_fraction of train is carved off).",
    )
    tokenizer: str = option(
        "train",
        "'train' (a byte-level BPE trained by rafale on the training split), a tokenizers JSON file, or "
        "'hf:<name>' for a hub tokenizer (online only).",
    )
    vocab_size: int = option(4096, "Vocabulary size of a tokenizer trained by rafale (tokenizer: train).")
    block_size: int = option(256, "Tokens per training example; the token stream is cut into blocks of this size.")
    val_fraction: float = option(0.05, "Fraction carved off for validation when the source has no validation split.")
    split_seed: int = option(0, "Seed of that validation split.")
    text_column: str = option("text", "Column holding the text in .jsonl/.json/.parquet/.csv/saved/hub sources.")
    hub_config: Optional[str] = option(None, "Configuration name of a hub dataset (hf: sources only).")
    label_column: str = option("label", "Column holding the class (a name or an id) for classification.")
    label_names: Optional[list[str]] = option(
        None, "The classes, in id order, for classification. Default: the sorted names (or ids) in the training split."
    )
    mlm_probability: float = option(0.15, "Fraction of tokens masked for masked-LM training.")
    doc_separator: str = option(
        "<|endoftext|>", "String between documents in a .txt source (a line of its own or inline)."
    )
    document_mask: bool = option(
        False, "Causal LM, decoder families: attention stays within each document of a packed block, positions "
        "restart at each, and a document's first token is not predicted from the previous end-of-text (nor scored). "
        "Off: a token sees the documents before it in its block (docs/run.md, \"Document masking\")."
    )
    decode_errors: Literal["replace", "error"] = option(
        "replace", "Bytes of a .txt source that are not UTF-8: 'replace' them with U+FFFD (and say how many), or "
        "'error' (naming the byte offset)."
    )
    num_train_stories: int = option(20000, "Stories generated for the training split (source: stories).")
    num_val_stories: int = option(1000, "Stories generated for the validation split (source: stories).")
    image_size: int = option(224, "CLIP/SigLIP: images are resized and centre-cropped to this side (pixels); the "
                             "model's vision.image_size follows it.")
    image_column: str = option("image", "CLIP/SigLIP: column holding the image path (captions file) or image (hub).")
    num_train_images: int = option(5000, "Image-caption pairs generated for training (source: shapes).")
    num_val_images: int = option(500, "Image-caption pairs generated for validation (source: shapes).")
    num_zero_shot_images: int = option(
        360, "Images generated for zero-shot evaluation (source: shapes), cycling through its 36 colour-shape classes.")
    zero_shot_source: Optional[str] = option(
        None, "CLIP/SigLIP: a folder with one sub-folder of images per class ('_' in a name reads as a space) for "
        "zero-shot accuracy at every evaluation. Default: the shapes' classes with source: shapes, else none.")
    prompt_templates: Optional[list[str]] = option(
        None, "CLIP/SigLIP: zero-shot prompts, '{}' standing for the class name; a class's embedding is the mean "
        "over them. Default: the shapes' four templates (source: shapes), else ['a photo of a {}.'].")
    augment: bool = option(True, "CLIP/SigLIP: a random mild crop (85-100% of the area) of each training image.")
    num_proc: int = option(0, "Processes for tokenization; 0 means one per CPU core.")
    cache_dir: Optional[str] = option(None, "Cache folder; default: $RAFALE_CACHE, else ~/.rafale_cache.")
    num_workers: int = option(0, "DataLoader worker processes.")


@dataclass
class ModelConfig:
    type: str = option(
        "pythia", "Model family: a key of FAMILIES in rafale/models/families.py (each family's file, e.g. "
        "rafale/models/pythia.py, holds its presets and heads); an unknown name is an error listing them."
    )
    task: Optional[str] = option(
        None, "What to train: a key of DATAPIPES in rafale/data/__init__.py (causal_lm, mlm, classification, "
        "contrastive, ...) whose head the family has (its `heads`). Default: the family's first head."
    )
    preset: Optional[str] = option(
        None, "A size preset of that family (its `presets`, in its file under rafale/models/). Default: its first (tiny) "
        "preset, or the sizes of `pretrained`."
    )
    pretrained: Optional[str] = option(
        None, "Start from these weights: a Hugging Face model folder (config.json + model.safetensors), a rafale "
        "run folder (its export/), or 'hf:<name>' (online only). Its config.json sets the sizes; a head it lacks "
        "(e.g. classification on an MLM checkpoint) starts fresh."
    )
    parametrization: Literal["standard", "mup"] = option(
        "standard", "mup: Tensor Programs V's muP for AdamW (or Muon), so that an lr tuned at mup_base_width holds at "
        "other widths: the blocks' matrices start at init_std / sqrt(m) and learn at lr / m, logits / m, attention "
        "1/head_dim, m = hidden_size / mup_base_width. Decoder families only; see docs/mup.md."
    )
    mup_base_width: Optional[int] = option(
        None, "parametrization: mup: the hidden_size where muP is the standard model (m = 1), where the lr was tuned."
    )
    overrides: dict = option(
        default_factory=dict,
        help="Any other key in this section overrides that field of the preset (e.g. num_layers: 4); "
        "it must be a field of the family's config.",
    )


@dataclass
class TrainingConfig:
    batch_size: int = option(32, "Global batch size, in blocks, per optimizer step.")
    microbatch_size: Union[int, Literal["auto"], None] = option(
        None, "Blocks per forward/backward; smaller than batch_size means gradient accumulation. 'auto' (GPU only) "
        "lets Composer find the largest that fits. Default: batch_size."
    )
    lr: float = option(1e-3, "Peak learning rate.")
    weight_decay: float = option(0.1, "Decoupled weight decay, on weight matrices only (never biases or norms).")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas (adamw, schedulefree_adamw, and muon's AdamW part).")
    eps: float = option(1e-8, "AdamW epsilon (adamw, schedulefree_adamw, and muon's AdamW part).")
    optimizer: dict = option(
        default_factory=lambda: {"name": "adamw"},
        help="The optimizer: {name: adamw | schedulefree_adamw | soap | muon | lion | a dotted path such as "
        "torch.optim.SGD, <its arguments>}; see rafale/run/optim.py. schedulefree_adamw needs `pip install 'rafale[optim]'`.",
    )
    decay_embeddings: bool = option(True, "Apply weight_decay to the embedding matrices too.")
    layer_decay: Optional[float] = option(
        None, "Layerwise learning-rate decay for fine-tuning: block i of L learns at lr * layer_decay^(L - i), "
        "the embeddings at lr * layer_decay^(L + 1), the head at lr. Null: one lr for all."
    )
    schedule: Literal["cosine", "linear", "constant", "wsd"] = option(
        "cosine", "Learning-rate schedule after warmup. wsd: warmup-stable-decay (constant at lr, then a decay to 0 "
        "over the last decay_fraction of the run; see rafale/run/optim.py)."
    )
    warmup: str = option("0.05dur", f"Warmup length, {TIME_HELP}.")
    lr_final_ratio: float = option(0.1, "Learning rate at the end of a cosine or linear schedule, relative to lr.")
    decay_fraction: float = option(0.2, "wsd: the share of training.max_duration, at its end, the rate decays over.")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = option(
        "1-sqrt", "wsd: how the rate falls from lr to 0 over the decay (1-sqrt: 1 - sqrt(progress), Hägele et al. 2024)."
    )
    branch_from: Optional[dict] = option(
        None, "wsd: {run: <a run folder>, at: <a time, optional>}: a cooldown branch. Start from that run's checkpoint "
        "at `at` (its whole state: weights, optimizer, data order) and decay from there to 0 at training.max_duration, "
        "in this run's own folder; `at` defaults to where this run's decay starts (1 - decay_fraction of "
        "max_duration). The parent's folder is only read."
    )
    cooldowns: list[str] = option(
        default_factory=list, help="wsd: budgets (times in max_duration's unit, each below it) to branch a cooldown "
        "to once this run is complete: each trains as run.name-cooldown-<budget> (see branch_from), from this run's "
        "checkpoint where that budget's decay starts. Needs checkpoints_to_keep: -1."
    )
    max_duration: str = option("1ep", f"Training length, {DURATION_HELP}.")
    precision: Literal["fp32", "amp_fp16", "amp_bf16"] = option(
        "amp_bf16", "Numeric precision. On a CPU, amp_bf16 autocasts the Pythia model to bf16 where the CPU has bf16 "
        "matrix units (AVX512-BF16 or AMX); anything else runs fp32 there (with one warning)."
    )
    clip_norm: Optional[float] = option(1.0, "Clip the gradient norm to this value; null turns clipping off.")
    eval_interval: str = option("0.25dur", f"Evaluate every {TIME_HELP}.")
    eval_batches: Optional[int] = option(None, "Evaluate on at most this many validation batches (null: all).")
    save_interval: str = option("1ep", f"Checkpoint every {TIME_HELP}.")
    checkpoints_to_keep: int = option(2, "Checkpoints kept in the run folder (-1: all).")
    eval_only: bool = option(False, "Only evaluate load_path on the validation split (no training).")
    load_path: Optional[str] = option(None, "A checkpoint to start from (weights, or the full state for eval_only).")
    trust_checkpoint: bool = option(
        False, "Let Composer unpickle load_path and the checkpoint a resume loads even when they hold more than "
        "the plain types of a Composer checkpoint. Only for files you trust: unpickling can run any code."
    )
    log_interval: str = option("10ba", "How often the console prints metrics.")
    compile: bool = option(False, "Compile the model with torch.compile (through Composer's compile_config).")
    activation_checkpointing: bool = option(
        False, "Keep only each transformer block's input during the forward pass and recompute the rest in the "
        "backward pass: less activation memory for bigger models or batches, about a third more compute."
    )
    fsdp: Optional[dict] = option(
        None, "Shard the model with FSDP: Composer's FSDP settings (e.g. {sharding_strategy: FULL_SHARD, "
        "mixed_precision: DEFAULT}), passed as parallelism_config={'fsdp': ...}. GPUs only."
    )
    keep_best: Optional[str] = option(
        None, "A validation metric (LanguageCrossEntropy, BitsPerByte, Accuracy, ...): the weights of the evaluation "
        "where it was best are exported to RUN/export-best/ (Hugging Face format), and the summary says at which step."
    )
    early_stopping: Optional[dict] = option(
        None, "{metric: <a validation metric>, patience: <a time string, e.g. 200ba or 2ep>}: stop training at the first "
        "evaluation more than that long after the metric's best (Composer's EarlyStopper); the summary says where."
    )
    ema: Optional[dict] = option(
        None, "{decay: <in (0, 1)>, export: false}: an fp32 moving average of the weights, updated after every "
        "optimizer step (ema = decay * ema + (1 - decay) * weights: the first weights weigh decay^n after n steps). "
        "Every evaluation scores it too (metrics/eval_ema/..., the summary's validation_ema); checkpointed and "
        "resumed exactly. export: true: RUN/export holds the EMA weights, and keep_best chooses on (and exports) "
        "the EMA's evaluation. Not with training.fsdp."
    )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


REQUIRED_SECTIONS = ("model",)

# ----------------------------------------------------------------------------------------------------
# checking values against their declared types


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {len(args)} {_type_name(args[0])}s" if origin is tuple else f"a list of {_type_name(args[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_NOT = object()


def _coerce(value, tp):
    """Return value as type tp, or _NOT. YAML reads 1e-3 as a string, so floats also accept numeric strings; and a
    number where a string is expected (run.name: 2024) becomes its string."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return None if value is None else _NOT
    if origin is Literal:
        return value if value in typing.get_args(tp) and not isinstance(value, bool) else _NOT
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _NOT:
                return out
        return _NOT
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _NOT
        items = [_coerce(v, a) for v, a in zip(value, args)]
        return _NOT if any(i is _NOT for i in items) else tuple(items)
    if origin is list:
        if not isinstance(value, list):
            return _NOT
        items = [_coerce(v, typing.get_args(tp)[0]) for v in value]
        return _NOT if any(i is _NOT for i in items) else items
    if tp is bool:
        return value if isinstance(value, bool) else _NOT
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NOT
        return _NOT
    if tp is str:
        # `name: 2024` or `warmup: 0` is a YAML number; what the user typed is its text (true/false are not)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value if isinstance(value, str) else _NOT
    if tp is dict:
        return value if isinstance(value, dict) else _NOT
    raise TypeError(f"unsupported config type {tp}")


def _unknown_key(key: str, valid, path: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ConfigError(f"{path}{key}", f"unknown key; {hint}valid keys: {', '.join(sorted(valid))}")


def build_dataclass(cls, values, path: str, allow_extra: bool = False):
    """Build dataclass `cls` from a YAML mapping, checking every key and type.

    With allow_extra, unknown keys are returned (in order) instead of rejected.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(path.rstrip("."), f"expected a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs, extra = {}, {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}{key}", "keys must be strings")
        if key not in fields:
            if allow_extra:
                extra[key] = value
                continue
            raise _unknown_key(key, fields, path)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{path}{key}.")
            continue
        out = _coerce(value, tp)
        if out is _NOT:
            raise ConfigError(f"{path}{key}", f"expected {_type_name(tp)}, got {value!r}")
        kwargs[key] = out
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{path}{missing[0]}", "required key is missing")
    obj = cls(**kwargs)
    return (obj, extra) if allow_extra else obj


# ----------------------------------------------------------------------------------------------------
# checks across keys


# Composer's time units (composer.core.TimeUnit), parsed here so that checking a config never imports Composer
TIME_UNITS = ("iter", "ep", "ba", "sp", "tok", "dur", "sec")
_TIME = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(" + "|".join(TIME_UNITS) + r")", re.IGNORECASE)


def parse_time(text: str) -> tuple[int | float, str]:
    """(value, unit) of a Composer time string ('2ep', '3e4tok', '0.1dur'), as composer.core.Time.from_timestring
    reads it: a number then a unit (any case, spaces allowed); every unit but dur needs a whole number. Raises
    ValueError otherwise. (Composer's wall-clock form '1h30m0s' is refused: no rafale setting is a wall-clock time.)"""
    match = _TIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not a time string: {text!r}")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit != "dur":
        if value != int(value):
            raise ValueError(f"{unit} needs a whole number, got {text!r}")
        value = int(value)
    return value, unit


def exact_time(text: str) -> tuple[fractions.Fraction, str]:
    """parse_time's (value, unit) with the value as the exact number written: '0.07dur' -> 7/100, not the float
    0.07000000000000000666 (whose product with 100 batches is 7.000000000000001, one batch more once rounded up)."""
    parse_time(text)  # the same checks and errors
    match = _TIME.fullmatch(text)
    return fractions.Fraction(match.group(1)), match.group(2).lower()


def _check_wsd(t: "TrainingConfig") -> None:
    """The warmup-stable-decay keys: a decay fraction in (0, 1], and branch_from and cooldowns only with wsd, in
    max_duration's unit (rafale.run.optim.wsd_batches turns them into batches)."""
    if not 0 < t.decay_fraction <= 1:
        raise ConfigError("training.decay_fraction", f"must be in (0, 1], got {t.decay_fraction}")
    for key, value in (("branch_from", t.branch_from), ("cooldowns", t.cooldowns)):
        if value and t.schedule != "wsd":
            raise ConfigError(f"training.{key}", f"needs training.schedule: wsd (a cooldown branch decays from a "
                              f"stable phase), got schedule {t.schedule!r}")
    _, unit = parse_time(t.max_duration)
    times = {f"training.cooldowns[{i}]": budget for i, budget in enumerate(t.cooldowns)}
    if t.branch_from is not None:
        unknown = set(t.branch_from) - {"run", "at"}
        if unknown or not isinstance(t.branch_from.get("run"), str):
            raise ConfigError("training.branch_from", f"expected {{run: <a run folder>, at: <a time, optional>}}, got "
                              f"{t.branch_from!r}")
        if t.cooldowns:
            raise ConfigError("training.cooldowns", "a branch (training.branch_from) cannot have cooldowns of its own")
        if t.branch_from.get("at") is not None:
            times["training.branch_from.at"] = str(t.branch_from["at"])
    for key, value in times.items():
        _check_time(value, key, allow_dur=False)
        if parse_time(value)[1] != unit:
            raise ConfigError(key, f"{value!r} is not in the unit of training.max_duration ({t.max_duration!r})")
        if parse_time(value)[0] >= parse_time(t.max_duration)[0]:
            raise ConfigError(key, f"{value!r} must come before the end of training.max_duration ({t.max_duration!r})")
    if t.cooldowns and t.checkpoints_to_keep != -1:
        raise ConfigError("training.checkpoints_to_keep", "cooldowns branch from this run's checkpoints where each "
                          f"budget's decay starts; keep them all (-1), got {t.checkpoints_to_keep}")


def _check_time(value: str, key: str, allow_dur: bool = True):
    try:
        number, unit = parse_time(value)
    except ValueError:
        raise ConfigError(key, f"expected {TIME_HELP}, got {value!r}") from None
    if number <= 0 and not key.endswith("warmup"):
        raise ConfigError(key, f"must be positive, got {value!r}")
    if number < 0:
        raise ConfigError(key, f"must not be negative, got {value!r}")
    if not allow_dur and unit == "dur":
        raise ConfigError(key, f"cannot be a fraction of the duration, got {value!r}")


def _normalise_warmup(cfg: Config) -> None:
    """`training.warmup: 0` (a bare zero, no unit) means no warmup: written '0dur', which Composer reads and which
    suits any unit of max_duration (a bare number is otherwise no time string: 100 of what?)."""
    text = cfg.training.warmup.strip()
    if re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", text) and float(text) == 0:
        cfg.training.warmup = "0dur"


def _check_warmup_unit(warmup: str, max_duration: str):
    """Composer's warmup schedulers need warmup and max_duration in one unit once epochs become batches
    (composer.optim.scheduler: _convert_time, _raise_if_warmup_and_max_incompatible); otherwise they fail at the
    first step, after the data is prepared. A fraction of the duration, or no warmup, suits any unit.
    (eval_interval and save_interval may be in any unit: Composer counts each in its own.)"""

    def unit(text):
        number, name = parse_time(text)
        return number, "ba" if name == "ep" else name  # Composer counts epochs as batches here

    (w_value, w), (_, d) = unit(warmup), unit(max_duration)
    if w_value == 0 or w == "dur" or w == d:
        return
    raise ConfigError("training.warmup", f"{warmup!r} is not in the unit of training.max_duration ({max_duration!r}); "
                      f"give it in {'ba or ep' if d == 'ba' else d}, or as a fraction such as '0.05dur'")


def _is_local_path(spec: str) -> bool:
    return not spec.startswith("hf:") and spec not in ("stories", "shapes", "train")


def is_local_source(source) -> bool:
    """data.source names local files: a path or glob, a list of them, or one per split (not a built-in generator
    nor a hub dataset)."""
    if isinstance(source, dict):
        return any(is_local_source(s) for s in source.values())
    if isinstance(source, list):
        return any(is_local_source(s) for s in source)
    return _is_local_path(source)


SOURCE_SPLITS = ("train", "validation")


def split_source_files(source: dict) -> dict[str, list[Path]]:
    """data.source given per split ({train: ..., validation: ...}): each split's files, globs expanded, sorted."""
    unknown = set(source) - set(SOURCE_SPLITS)
    if unknown:
        raise _unknown_key(sorted(unknown)[0], SOURCE_SPLITS, "data.source.")
    if "train" not in source:
        raise ConfigError("data.source.train", "required key is missing (the training files)")
    files = {}
    for split, spec in source.items():
        patterns = spec if isinstance(spec, list) else [spec]
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"data.source.{split}", f"expected a path, a glob or a list of them, got {spec!r}")
        found = []
        for pattern in patterns:
            matches = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())))
            if not matches:
                raise ConfigError(f"data.source.{split}", f"no file matches {pattern}")
            found += [m for m in matches if m not in found]
        files[split] = found
    return files


def _check_signs(cfg: Config) -> None:
    """The numbers that must be positive, or at least not negative."""
    positive = {
        "data.vocab_size": cfg.data.vocab_size,
        "data.block_size": cfg.data.block_size,
        "data.num_train_stories": cfg.data.num_train_stories,
        "data.num_val_stories": cfg.data.num_val_stories,
        "data.image_size": cfg.data.image_size,
        "data.num_train_images": cfg.data.num_train_images,
        "data.num_val_images": cfg.data.num_val_images,
        "data.num_zero_shot_images": cfg.data.num_zero_shot_images,
        "training.batch_size": cfg.training.batch_size,
        "training.lr": cfg.training.lr,
    }
    if isinstance(cfg.training.microbatch_size, int):
        positive["training.microbatch_size"] = cfg.training.microbatch_size
    if cfg.training.clip_norm is not None:
        positive["training.clip_norm"] = cfg.training.clip_norm
    if cfg.training.eval_batches is not None:
        positive["training.eval_batches"] = cfg.training.eval_batches
    for key, value in positive.items():
        if not value > 0:  # not `value <= 0`, which lets NaN through
            raise ConfigError(key, f"must be positive, got {value}")
    for key, value in {"data.num_proc": cfg.data.num_proc, "data.num_workers": cfg.data.num_workers,
                       "training.weight_decay": cfg.training.weight_decay, "training.eps": cfg.training.eps}.items():
        if value < 0:
            raise ConfigError(key, f"must not be negative, got {value}")


# the optimizers whose muP rules rafale implements (rafale/run/optim.py); the decoder families are checked by
# rafale.resolve, which knows the families
MUP_OPTIMIZERS = ("adamw", "muon")


def _check_parametrization(cfg: Config) -> None:
    """model.parametrization and model.mup_base_width, and what muP does not cover, before any data work."""
    m, optimizer = cfg.model, cfg.training.optimizer
    if m.mup_base_width is not None and m.mup_base_width <= 0:
        raise ConfigError("model.mup_base_width", f"must be positive, got {m.mup_base_width}")
    if m.parametrization != "mup":
        if m.mup_base_width is not None:
            raise ConfigError("model.mup_base_width", "is muP's base width; set model.parametrization: mup to use it "
                              "(the standard parametrisation has none)")
        return
    if m.mup_base_width is None:
        raise ConfigError("model.mup_base_width", "model.parametrization: mup needs a base width: the hidden_size the "
                          "learning rate was tuned at (e.g. 64)")
    name = optimizer.get("name", "adamw") if isinstance(optimizer, dict) else None
    if name not in MUP_OPTIMIZERS:
        raise ConfigError("model.parametrization", f"mup has rules for training.optimizer.name "
                          f"{' or '.join(MUP_OPTIMIZERS)}, not {name!r}")
    if name == "muon" and optimizer.get("use_adjusted_lr"):
        raise ConfigError("training.optimizer.use_adjusted_lr", "Moonlight's 0.2 * sqrt(max(rows, cols)) grows with "
                          "width, which model.parametrization: mup must not; leave it false")
    if m.pretrained is not None:
        raise ConfigError("model.pretrained", "a pretrained standard model computes other logits under "
                          "model.parametrization: mup (its output and attention scales); fine-tune it as standard")


def validate(cfg: Config, check_files: bool = True) -> None:
    """Checks that need more than one field, or (with check_files) the file system. Raises ConfigError."""
    _check_signs(cfg)
    if not 0 < cfg.data.mlm_probability < 1:
        raise ConfigError("data.mlm_probability", f"must be between 0 and 1 (exclusive), got {cfg.data.mlm_probability}")
    if cfg.data.label_names is not None and (len(cfg.data.label_names) < 2 or len(set(cfg.data.label_names)) != len(cfg.data.label_names)):
        raise ConfigError("data.label_names", f"must list at least 2 distinct classes, got {cfg.data.label_names}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be between 0 and 1 (exclusive), got {cfg.data.val_fraction}")
    if not 0 <= cfg.training.lr_final_ratio <= 1:
        raise ConfigError("training.lr_final_ratio", f"must be between 0 and 1, got {cfg.training.lr_final_ratio}")
    for i, beta in enumerate(cfg.training.betas):
        if not 0 <= beta < 1:
            raise ConfigError(f"training.betas[{i}]", f"must be in [0, 1), got {beta}")
    if cfg.training.layer_decay is not None and not 0 < cfg.training.layer_decay <= 1:
        raise ConfigError("training.layer_decay", f"must be in (0, 1], got {cfg.training.layer_decay}")
    mb = cfg.training.microbatch_size
    if isinstance(mb, int) and mb > cfg.training.batch_size:
        raise ConfigError(
            "training.microbatch_size", f"({mb}) cannot be larger than training.batch_size ({cfg.training.batch_size})"
        )
    if cfg.training.fsdp is not None and cfg.run.device == "cpu":
        raise ConfigError("training.fsdp", "FSDP needs GPUs; remove it on run.device: cpu")
    if cfg.training.fsdp is not None and cfg.training.fsdp.get("state_dict_type", "full") != "full":
        # a sharded checkpoint is a folder of per-rank shards, which rafale's resume checks, pruning
        # (checkpoints_to_keep across resumes), branches and eval-only, made for one file per rank, do not read
        raise ConfigError("training.fsdp.state_dict_type", f"rafale saves full checkpoints only (one file a rank, "
                          f"what its resume, pruning and branches read); got {cfg.training.fsdp['state_dict_type']!r}: "
                          "remove it or set it to full")
    if len(set(cfg.run.loggers)) != len(cfg.run.loggers):
        raise ConfigError("run.loggers", f"lists a logger twice: {cfg.run.loggers}")
    if mb == "auto" and cfg.run.device == "cpu":
        raise ConfigError("training.microbatch_size", "'auto' needs a GPU; give a number on run.device: cpu")
    _check_time(cfg.training.max_duration, "training.max_duration", allow_dur=False)
    for key in ("warmup", "eval_interval", "save_interval", "log_interval"):
        _check_time(getattr(cfg.training, key), f"training.{key}")
    _check_warmup_unit(cfg.training.warmup, cfg.training.max_duration)
    for key in ("name",):
        value = getattr(cfg.run, key)
        if not value or "/" in value or value in (".", ".."):
            raise ConfigError(f"run.{key}", f"must be a plain folder name, got {value!r}")
    _check_early_stopping(cfg.training.early_stopping)
    _check_ema(cfg.training)
    _check_wsd(cfg.training)
    _check_parametrization(cfg)
    if cfg.training.eval_only and cfg.training.load_path is None:
        raise ConfigError("training.load_path", "eval_only needs a checkpoint to evaluate")
    for template in cfg.data.prompt_templates or []:
        if "{}" not in template:
            raise ConfigError("data.prompt_templates",
                              f"each template needs '{{}}' for the class name, got {template!r}")
    if check_files:
        _check_files(cfg)
    # training.optimizer's name and arguments are checked by rafale.run.optim.check_optimizer, which `rafale -c` and
    # `rafale sweep` call right after loading the config: building a stand-in optimizer imports torch's optimizers
    # (torch._dynamo, seconds), which a command that only reads a run folder must not wait for


def _check_creatable(folder: Path, key: str, what: str) -> None:
    """`folder` is a writable folder, or can be made one: its nearest existing ancestor is a writable folder.
    Creates nothing (these checks run before any work, and a config error must leave no trace)."""
    folder = folder.expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:  # exists() is False under a regular file too
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"cannot create {what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot create {what} {folder}: {existing} is not writable")


def _check_early_stopping(spec) -> None:
    """training.early_stopping: {metric, patience}; the metric's name is checked against the model's metrics once
    the model is built (rafale.run.outcomes.validation_metric)."""
    if spec is None:
        return
    unknown = set(spec) - {"metric", "patience"}
    if unknown:
        raise _unknown_key(sorted(unknown)[0], ("metric", "patience"), "training.early_stopping.")
    if not isinstance(spec.get("metric"), str):
        raise ConfigError("training.early_stopping.metric", f"expected a validation metric's name, got {spec.get('metric')!r}")
    patience = spec.get("patience", "1ep")
    try:
        _, unit = parse_time(patience)
    except ValueError:
        unit = None
    if unit not in ("ba", "ep"):
        raise ConfigError("training.early_stopping.patience", f"expected a time in batches or epochs (e.g. 200ba, 2ep), "
                          f"got {patience!r}")


def _check_ema(t: TrainingConfig) -> None:
    """training.ema: {decay, export}; refused with training.fsdp (each rank holds a shard of the weights, which the
    EMA's swap for the second evaluation and the export would have to gather)."""
    spec = t.ema
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise ConfigError("training.ema", f"expected a mapping such as {{decay: 0.99}}, got {spec!r}")
    unknown = set(spec) - {"decay", "export"}
    if unknown:
        raise _unknown_key(sorted(unknown)[0], ("decay", "export"), "training.ema.")
    decay = spec.get("decay")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ConfigError("training.ema.decay", f"expected a number between 0 and 1 (exclusive), got {decay!r}")
    if not isinstance(spec.get("export", False), bool):
        raise ConfigError("training.ema.export", f"expected true or false, got {spec['export']!r}")
    if t.fsdp is not None:
        raise ConfigError("training.ema", "is not supported with training.fsdp (the EMA is kept whole on every rank); "
                          "remove one of them")


def _check_files(cfg: Config) -> None:
    if isinstance(cfg.data.source, dict):
        split_source_files(cfg.data.source)
    elif _is_local_path(cfg.data.source) and not Path(cfg.data.source).expanduser().exists():
        raise ConfigError("data.source", f"no such file or folder: {cfg.data.source} (or use 'stories' or 'hf:<name>')")
    if _is_local_path(cfg.data.tokenizer) and not Path(cfg.data.tokenizer).expanduser().is_file():
        raise ConfigError(
            "data.tokenizer", f"no such file: {cfg.data.tokenizer} (expected a tokenizers JSON file, 'train' or 'hf:<name>')"
        )
    pretrained = cfg.model.pretrained
    if pretrained is not None and not pretrained.startswith("hf:") and not (pretrained_folder(pretrained) / "config.json").is_file():
        raise ConfigError("model.pretrained", f"{pretrained} is neither a model folder with a config.json nor a run "
                          "folder with an export/ (or use 'hf:<name>')")
    if cfg.data.zero_shot_source is not None and not Path(cfg.data.zero_shot_source).expanduser().is_dir():
        raise ConfigError("data.zero_shot_source", f"no such folder: {cfg.data.zero_shot_source}")
    if cfg.training.load_path is not None and not Path(cfg.training.load_path).expanduser().exists():
        raise ConfigError("training.load_path", f"no such checkpoint: {cfg.training.load_path}")
    # the run folder is made only once the data is prepared: say now, not minutes later, that it cannot be
    _check_creatable(Path(cfg.run.output_dir) / cfg.run.name, "run.output_dir", "the run folder")


# ----------------------------------------------------------------------------------------------------
# loading and saving


def config_from_dict(raw, saved_run: bool = False) -> Config:
    """The checked Config of a YAML mapping. saved_run: a run folder's config.yaml, already resolved when the run
    started; its data, tokenizer and pretrained files need not exist any more (the folder has what it needs).

    The model section is checked here as a schema only; its family, preset, task and overrides are checked by
    rafale.resolve.resolve_model_config, which every command calls right after loading."""
    if raw is None:
        raise ConfigError("", "the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError("", f"expected a mapping of sections (run, data, model, training), got {type(raw).__name__}")
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise ConfigError(section, "required section is missing")
    raw = dict(raw)
    model_raw = raw.pop("model")
    if not isinstance(model_raw, dict):
        raise ConfigError("model", f"expected a mapping, got {type(model_raw).__name__}")
    nested = model_raw.get("overrides") or {}
    if not isinstance(nested, dict):
        raise ConfigError("model.overrides", f"expected a mapping of preset fields to values, got {nested!r}")
    model_raw = {k: v for k, v in model_raw.items() if k != "overrides"} | nested
    model, overrides = build_dataclass(ModelConfig, model_raw, "model.", allow_extra=True)
    model.overrides = overrides
    cfg = build_dataclass(Config, raw, "")
    cfg.model = model
    _normalise_warmup(cfg)
    validate(cfg, check_files=not saved_run)
    if saved_run:
        return cfg
    # a pretrained model brings its tokenizer, unless the config names another
    if cfg.model.pretrained is not None and "tokenizer" not in (raw.get("data") or {}):
        cfg.data.tokenizer = pretrained_tokenizer(cfg.model.pretrained)
    return cfg


def pretrained_tokenizer(spec: str) -> str:
    if spec.startswith("hf:"):
        return spec
    path = pretrained_folder(spec) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError("data.tokenizer", f"the pretrained folder {spec} has no tokenizer.json; name a tokenizer")
    return str(path)


def load_config(path, overrides=(), saved_run: bool = False) -> Config:
    """The config in the YAML file `path`, with command-line `overrides` ('training.lr=3e-3') applied on top.
    saved_run: a run folder's config.yaml, read without the file-system checks (see config_from_dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"no such config file: {path}")
    try:
        raw = yaml.safe_load(read_utf8(path, "config error"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError("", f"{path} is not valid YAML{where}: {problem}") from None
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    return config_from_dict(raw, saved_run)


def apply_overrides(raw: dict, overrides) -> dict:
    """Set `section.key=value` pairs (Hydra's spelling) in the YAML mapping `raw`; each value is read as YAML, so
    `training.lr=3e-3`, `model.num_layers=2`, `run.loggers=[tensorboard]` and `training.optimizer.name=soap` work.
    The result is checked like the file itself; a bad value names its key."""
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(key, f"a command-line override is section.key=value (e.g. training.lr=3e-3), got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: keep the string as typed
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[:depth + 1]), f"is {child!r}, not a section, so {key} cannot be set")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def pretrained_folder(spec: str) -> Path:
    """The model folder that model.pretrained names: a Hugging Face folder, or a rafale run folder's export/."""
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file() and (folder / "export" / "config.json").is_file():
        return folder / "export"
    return folder


def to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    out["model"] = {k: v for k, v in out["model"].items() if k != "overrides"} | cfg.model.overrides
    out["training"]["betas"] = list(cfg.training.betas)
    return out


def save_config(cfg: Config, path) -> None:
    """Write the resolved config (every default filled in) as YAML that load_config reads back."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def config_reference() -> str:
    """The config reference as markdown, generated from the dataclasses above."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"### `{section.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            tp = _type_name(typing.get_type_hints(cls)[f.name])
            lines.append(f"| `{f.name}` | {tp} | `{default!r}` | {f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)
