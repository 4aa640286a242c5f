"""The `model:` section of a config against what rafale knows: the model families (FAMILIES,
rafale/models/families.py) and the data tasks (DATAPIPES, rafale/data/__init__.py).

`resolve_model_config` looks the family up, takes its preset, applies the config's overrides (checking every key)
and, for `model.pretrained`, the checkpoint's sizes, which a preset or override may not contradict. `model.task`
is a data task whose datapipe trains one of the family's heads (`head_of`): a new task that makes causal-LM
examples trains every family with a causal-LM head, with no edit to the families.
"""

import dataclasses

from rafale.config import Config, ModelConfig, _unknown_key, build_dataclass, pretrained_folder
from rafale.data import DATAPIPES
from rafale.errors import ConfigError, WeightsError
from rafale.models.decoder import DecoderConfig
from rafale.models.families import FAMILIES
from rafale.models.family import Family


def family_of(cfg: Config) -> Family:
    """The Family of cfg.model.type; an unknown type is a ConfigError listing the known ones."""
    if cfg.model.type not in FAMILIES:
        raise _unknown_key(cfg.model.type, tuple(FAMILIES), "model.type=")
    return FAMILIES[cfg.model.type]


def head_of(cfg: Config) -> str:
    """The model head cfg.model.task trains (its datapipe's `head`: causal_lm, mlm, classification, contrastive)."""
    return DATAPIPES[cfg.model.task].head


def resolve_model_config(cfg: Config):
    """The model family's typed config: its preset with the config's overrides applied."""
    family = family_of(cfg)
    presets = family.presets
    if cfg.model.preset is not None and cfg.model.preset not in presets:
        raise _unknown_key(cfg.model.preset, presets, "model.preset=")
    if cfg.model.task is None:
        cfg.model.task = family.heads[0]
    if cfg.model.task not in DATAPIPES:
        raise _unknown_key(cfg.model.task, tuple(DATAPIPES), "model.task=")
    if head_of(cfg) not in family.heads:
        trains = [task for task, pipe in DATAPIPES.items() if pipe.head in family.heads]
        raise ConfigError("model.task", f"a {cfg.model.type} model does {' or '.join(trains)}, not {cfg.model.task}")
    _check_document_mask(cfg, family)
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
    apply_parametrization(cfg, model_cfg)
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
    if head_of(cfg) != "causal_lm" and cfg.data.block_size < 3:
        raise ConfigError("data.block_size", f"must leave room for the two framing tokens, got {cfg.data.block_size}")
    return model_cfg


def apply_parametrization(cfg: Config, model_cfg) -> None:
    """model.parametrization: mup sets the decoder's mup_base_width; a family whose config has none (the encoders,
    CLIP) is refused by name."""
    if cfg.model.parametrization != "mup":
        return
    if not hasattr(model_cfg, "mup_base_width"):
        decoders = [name for name, f in FAMILIES.items()
                    if any(hasattr(preset, "mup_base_width") for preset in f.presets.values())]
        raise ConfigError("model.parametrization", f"mup covers the decoder families ({', '.join(decoders)}), not "
                          f"model.type {cfg.model.type}")
    model_cfg.mup_base_width = cfg.model.mup_base_width


def _check_document_mask(cfg: Config, family: Family) -> None:
    """data.document_mask needs packed causal-LM blocks (the causal_lm datapipe's collator finds the documents) and
    the decoder (rafale/models/decoder.py) that takes their document ids: refused otherwise, before any data work."""
    if not cfg.data.document_mask:
        return
    if not issubclass(family.config, DecoderConfig):
        raise ConfigError("data.document_mask", f"a {cfg.model.type} model cannot mask documents: only the decoder "
                          f"families ({', '.join(n for n, f in FAMILIES.items() if issubclass(f.config, DecoderConfig))})"
                          " can; set it false")
    if cfg.model.task != "causal_lm":
        raise ConfigError("data.document_mask", f"masks the documents of packed causal_lm blocks, not of a "
                          f"{cfg.model.task} task; set it false")


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
        family, _ = hf.architectures()[architecture]
        if family is not family_of(cfg):
            raise ConfigError("model.type", f"is {cfg.model.type} but {spec} holds a {architecture} ({family.name})")
        return family.hf.config_from_hf(raw, folder / "config.json")
    except WeightsError as err:
        raise ConfigError("model.pretrained", str(err)) from None
