"""Model sizes and builders. Each family has a table of presets ("flavors"); a config picks one by name with
`model.preset` and may override any field. The real sizes follow the published checkpoints; the tiny ones
train in minutes on a laptop CPU and are what the tests and `DEBUG=1` use.

`model_config_dict` at the bottom is the registry a new model goes into: model.type -> a builder that turns the
family's config and the data's description into a Composer model. `resolve_model_config` turns the `model:`
section of a config into the family's typed config (preset, overrides, pretrained sizes), checking every key.
"""

import dataclasses

from rafale.config import Config, ModelConfig, _unknown_key, build_dataclass, pretrained_folder
from rafale.errors import ConfigError, DataError, WeightsError
from rafale.models.clip import CLIP_PRESETS, SIGLIP_PRESETS, ClipConfig
from rafale.models.decoder import DecoderConfig, GPTNeoX
from rafale.models.encoder import EncoderConfig, build_encoder as build_encoder_module

PYTHIA_PRESETS = {
    # tiny: the CPU default and the test fixture (vocab_size None: taken from the tokenizer)
    "pythia-tiny": DecoderConfig(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_position_embeddings=512, vocab_size=None
    ),
    "pythia-debug": DecoderConfig(
        hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_position_embeddings=256, vocab_size=None
    ),
    # EleutherAI/pythia-70m and -160m (config.json on the hub)
    "pythia-70m": DecoderConfig(
        vocab_size=50304, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048
    ),
    "pythia-160m": DecoderConfig(
        vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
    ),
}

BERT_PRESETS = {
    # tiny: the CPU default and the test fixture (vocab_size None: taken from the tokenizer)
    "bert-tiny": EncoderConfig(
        family="bert", hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
        max_position_embeddings=512, vocab_size=None,
    ),
    # bert-base-uncased (config.json on the hub)
    "bert-base": EncoderConfig(
        family="bert", vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2,
    ),
}

ROBERTA_PRESETS = {
    # RoBERTa's position table has 2 extra rows (pad id 1 and below are never a real token's position),
    # so 514 rows give max_seq_len 512
    "roberta-tiny": EncoderConfig(
        family="roberta", hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, position_offset=2,
        vocab_size=None,
    ),
    # FacebookAI/roberta-base (config.json on the hub)
    "roberta-base": EncoderConfig(
        family="roberta", vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, position_offset=2,
    ),
}

# model.type -> its presets; model_config_dict (below) has a builder for each of these types
PRESETS = {
    "pythia": PYTHIA_PRESETS,
    "bert": BERT_PRESETS,
    "roberta": ROBERTA_PRESETS,
    "clip": CLIP_PRESETS,  # rafale/models/clip.py: clip-tiny, clip-debug, clip-vit-b-16
    "siglip": SIGLIP_PRESETS,
}
# model.type -> the tasks it trains for (model.task); the first is the default
TASKS = {
    "pythia": ("causal_lm",),
    "bert": ("mlm", "classification"),
    "roberta": ("mlm", "classification"),
    "clip": ("contrastive",),
    "siglip": ("contrastive",),
}
MODEL_FAMILIES = tuple(PRESETS)


# ----------------------------------------------------------------------------------------------------
# builders: (the family's config, model.task, the data's meta (rafale.datapipes.PreparedData.meta), its tokenizer)
# -> the Composer model. They fill in what the data decides (vocabulary, padding id, classes); model.pretrained's
# weights are copied in by the caller (rafale.train.build_model).


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def model_vocab_size(configured: int | None, vocab_size: int) -> int:
    """The embedding size: the configured one, or the tokenizer's rounded up to a multiple of 64 for fast matmuls."""
    if configured is None:
        return round_up(vocab_size, 64)
    if vocab_size > configured:
        raise DataError(
            f"model.vocab_size ({configured}) is smaller than the tokenizer's vocabulary ({vocab_size}); "
            "raise model.vocab_size or use a smaller tokenizer"
        )
    return configured


def build_pythia(model_cfg: DecoderConfig, task: str, meta: dict, tokenizer):
    """A GPT-NeoX decoder for causal LM (validation bits per byte need the tokenizer's token lengths)."""
    from rafale.metrics import token_bytes
    from rafale.models.composer import ComposerLM

    model_cfg.vocab_size = model_vocab_size(model_cfg.vocab_size, meta["vocab_size"])
    return ComposerLM(GPTNeoX(model_cfg), vocab_size=meta["vocab_size"], token_bytes=token_bytes(tokenizer))


def build_encoder(model_cfg: EncoderConfig, task: str, meta: dict, tokenizer):
    """A BERT or RoBERTa encoder with the head of `task`: mlm, or classification over meta's label_names."""
    from rafale.models.composer import ComposerClassifier, ComposerMLM

    model_cfg.vocab_size = model_vocab_size(model_cfg.vocab_size, meta["vocab_size"])
    model_cfg.pad_token_id = meta["pad_token_id"]
    if model_cfg.family == "roberta":  # RoBERTa's positions count from the padding id
        model_cfg.position_offset = meta["pad_token_id"] + 1
    if task == "mlm":
        return ComposerMLM(build_encoder_module(model_cfg, "mlm"), vocab_size=meta["vocab_size"])
    model_cfg.num_labels = len(meta["label_names"])
    return ComposerClassifier(build_encoder_module(model_cfg, "classification"), model_cfg.num_labels)


def build_contrastive(model_cfg: ClipConfig, task: str, meta: dict, tokenizer):
    """A CLIP or SigLIP. Its vocabulary, image size and (CLIP) end-of-text id come from the data; the prompts of
    the zero-shot classes in meta are tokenized here, and their images attached with the data
    (ComposerContrastive.attach_splits)."""
    from rafale.models.clip import build_model, encode_texts, pad_texts, text_length
    from rafale.models.composer import ComposerContrastive, ZeroShotSet

    model_cfg.text.vocab_size = model_vocab_size(model_cfg.text.vocab_size, meta["vocab_size"])
    model_cfg.vision.image_size = meta["image_size"]
    if model_cfg.family == "clip":
        if meta["eos_token_id"] == 2:  # transformers reads a CLIP eos_token_id of 2 as "pool at the highest id"
            raise DataError("data.tokenizer: its end-of-text id is 2, which an exported CLIP cannot express "
                            "(transformers pools at the highest id then); use a tokenizer with another id")
        model_cfg.text.eos_token_id = meta["eos_token_id"]
    try:
        model_cfg.validate()
    except ValueError as err:
        raise ConfigError("data.image_size" if "image_size" in str(err) else "model", str(err)) from None
    zero_shot = None
    if "zero_shot" in meta:
        info, block_size = meta["zero_shot"], meta["config"]["block_size"]
        prompts = [t.format(c) for c in info["classes"] for t in info["templates"]]  # class-major
        ids = encode_texts(tokenizer, prompts, meta["eos_token_id"], block_size)
        padded = pad_texts(ids, meta["pad_token_id"], text_length(model_cfg.family, block_size))
        zero_shot = ZeroShotSet(padded, len(info["templates"]), info["held_out"])
    return ComposerContrastive(build_model(model_cfg), zero_shot)


# model.type (in the config) -> its builder. A new family: its presets in PRESETS, its tasks in TASKS, a builder here.
model_config_dict = {
    "pythia": build_pythia,
    "bert": build_encoder,
    "roberta": build_encoder,
    "clip": build_contrastive,
    "siglip": build_contrastive,
}


# ----------------------------------------------------------------------------------------------------
# the model section of a config -> the family's typed config


def resolve_model_config(cfg: Config):
    """The model family's typed config: its preset with the config's overrides applied."""
    families = tuple(PRESETS)  # (read now, so a family added to PRESETS after import counts)
    if cfg.model.type not in families:
        raise _unknown_key(cfg.model.type, families, "model.type=")
    presets = PRESETS[cfg.model.type]
    if cfg.model.preset is not None and cfg.model.preset not in presets:
        raise _unknown_key(cfg.model.preset, presets, "model.preset=")
    tasks = TASKS[cfg.model.type]
    if cfg.model.task is None:
        cfg.model.task = tasks[0]
    elif cfg.model.task not in tasks:
        raise ConfigError("model.task", f"a {cfg.model.type} model does {' or '.join(tasks)}, not {cfg.model.task}")
    if cfg.model.pretrained is not None:
        base = pretrained_model_config(cfg)
        if cfg.model.preset is not None:
            _check_agrees(presets[cfg.model.preset], base, "model.preset", cfg.model.pretrained)
    else:
        base = presets[cfg.model.preset or next(iter(presets))]
    fields = {f.name for f in dataclasses.fields(base)}
    for key in cfg.model.overrides:
        if key not in fields:
            raise _unknown_key(key, fields | {f.name for f in dataclasses.fields(ModelConfig)}, "model.")
    merged = dataclasses.asdict(base)
    for key, value in cfg.model.overrides.items():  # a nested section (CLIP's vision: {...}) changes only its keys
        merged[key] = merged[key] | value if isinstance(merged.get(key), dict) and isinstance(value, dict) else value
    model_cfg = build_dataclass(type(base), merged, "model.")
    if cfg.model.pretrained is not None:
        _check_agrees(model_cfg, base, "model", cfg.model.pretrained, only=set(cfg.model.overrides))
    try:
        model_cfg.validate()
    except ValueError as err:
        raise ConfigError("model", str(err)) from None
    longest = model_cfg.max_seq_len if hasattr(model_cfg, "max_seq_len") else model_cfg.max_position_embeddings
    if cfg.data.block_size > longest:
        raise ConfigError(
            "data.block_size",
            f"({cfg.data.block_size}) is larger than the model's max_position_embeddings ({longest})",
        )
    if cfg.model.task != "causal_lm" and cfg.data.block_size < 3:
        raise ConfigError("data.block_size", f"must leave room for the two framing tokens, got {cfg.data.block_size}")
    return model_cfg


# settings a pretrained checkpoint does not fix: they may differ from its config.json
TRAINING_SETTINGS = {"hidden_dropout", "attention_dropout", "classifier_dropout", "num_labels", "init_std", "vocab_size"}


def _check_agrees(asked, checkpoint, key: str, where: str, only=None):
    """A preset or override that contradicts the pretrained checkpoint's sizes is an error, never a silent choice."""
    for f in dataclasses.fields(checkpoint):
        if f.name in TRAINING_SETTINGS or (only is not None and f.name not in only):
            continue
        mine, theirs = getattr(asked, f.name), getattr(checkpoint, f.name)
        if mine != theirs:
            name = f"{key}.{f.name}" if key == "model" else key
            raise ConfigError(name, f"{f.name} = {mine!r} disagrees with the pretrained {where} ({theirs!r}); "
                              "leave it out to use the checkpoint's")


def pretrained_model_config(cfg: Config):
    """The model config of model.pretrained, read from its config.json; checks the family."""
    from rafale.models import hf

    spec = cfg.model.pretrained
    if spec.startswith("hf:"):
        folder = hf.download_from_hub(spec[3:])
    else:
        folder = pretrained_folder(spec)
    try:
        raw, architecture = hf.read_config(folder)
        family, _ = hf.ARCHITECTURES[architecture]
        family = "pythia" if family == "gpt_neox" else family
        if family != cfg.model.type:
            raise ConfigError("model.type", f"is {cfg.model.type} but {spec} holds a {architecture} ({family})")
        if family == "pythia":
            return hf.decoder_config_from_hf(raw, folder / "config.json")
        if family in ("clip", "siglip"):
            return hf.contrastive_config_from_hf(raw)
        return hf.encoder_config_from_hf(raw, family, folder / "config.json")
    except WeightsError as err:
        raise ConfigError("model.pretrained", str(err)) from None
