"""Hugging Face weights in and out: `from_pretrained(folder)` builds a rafale model from an HF checkpoint,
`save_pretrained(model, folder)` writes one that `transformers` loads.

    folder/config.json               sizes and flags -> DecoderConfig / EncoderConfig, architecture -> head
    folder/model.safetensors         tensors, renamed through one explicit map per family
      (or model.safetensors.index.json + shards, or pytorch_model.bin read with weights_only=True)

Loading is strict both ways: every tensor of the rafale model must be found with its shape, and every tensor in
the files must be used, except the buffers listed in each layout's `ignored` (each one says why). All the
problems are gathered and raised as one `WeightsError`, so a wrong checkpoint is diagnosed in one go.

Writing refuses (`export_refusal`, which a run also asks before it trains) any model transformers would load as
something else: a module class the family's file does not define, or a config field whose value does not come
back equal through the config.json written (model.norm: rmsnorm on GPT-NeoX, a variant's new field).

Supported: GPTNeoXForCausalLM (Pythia), BERT / RoBERTa as Model, ForMaskedLM, ForSequenceClassification, and
CLIPModel / SiglipModel (their name maps and config.json readers live in clip.py; this file dispatches to them).
This file reads and writes the formats only; it never imports transformers (the tests use it as a reference).
"""

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from rafale.errors import WeightsError
from rafale.models import clip
from rafale.models.decoder import DecoderConfig, GPTNeoX
from rafale.models.encoder import MODEL_CLASSES, EncoderConfig, build_encoder


# ----------------------------------------------------------------------------------------------------
# Architectures: the config.json `architectures[0]` we accept, and the rafale family and head it becomes.

ARCHITECTURES = {
    "GPTNeoXForCausalLM": ("gpt_neox", "causal_lm"),
    "BertModel": ("bert", "base"),
    "BertForMaskedLM": ("bert", "mlm"),
    "BertForSequenceClassification": ("bert", "classification"),
    "RobertaModel": ("roberta", "base"),
    "RobertaForMaskedLM": ("roberta", "mlm"),
    "RobertaForSequenceClassification": ("roberta", "classification"),
    "CLIPModel": ("clip", "contrastive"),
    "SiglipModel": ("siglip", "contrastive"),
}
# without `architectures`, a model_type means what AutoModel would build. GPTNeoXModel (no output projection)
# is not accepted: rafale's GPTNeoX always has one, and inventing it would hide a wrong checkpoint.
DEFAULT_ARCHITECTURE = {"gpt_neox": "GPTNeoXForCausalLM", "bert": "BertModel", "roberta": "RobertaModel",
                        "clip": "CLIPModel", "siglip": "SiglipModel"}


# ----------------------------------------------------------------------------------------------------
# Weight layouts. Names are templates: `{}` stands for the layer index (litgpt's convention).


@dataclass
class WeightLayout:
    """How one architecture's checkpoint names map onto a rafale model's parameter names."""

    names: dict  # HF template -> rafale template; export writes exactly these names
    aliases: dict = field(default_factory=dict)  # other HF names some checkpoints use for the same tensors (import)
    ignored: tuple = ()  # HF templates in checkpoints that rafale knowingly drops (each documented where listed)


GPT_NEOX_LAYOUT = WeightLayout(
    names={
        "gpt_neox.embed_in.weight": "embed_in.weight",
        "gpt_neox.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
        "gpt_neox.layers.{}.input_layernorm.bias": "layers.{}.input_layernorm.bias",
        "gpt_neox.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
        "gpt_neox.layers.{}.post_attention_layernorm.bias": "layers.{}.post_attention_layernorm.bias",
        # the fused q/k/v keeps NeoX's per-head interleaving; rafale's Attention splits it the same way
        "gpt_neox.layers.{}.attention.query_key_value.weight": "layers.{}.attention.query_key_value.weight",
        "gpt_neox.layers.{}.attention.query_key_value.bias": "layers.{}.attention.query_key_value.bias",
        "gpt_neox.layers.{}.attention.dense.weight": "layers.{}.attention.dense.weight",
        "gpt_neox.layers.{}.attention.dense.bias": "layers.{}.attention.dense.bias",
        "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": "layers.{}.mlp.dense_h_to_4h.weight",
        "gpt_neox.layers.{}.mlp.dense_h_to_4h.bias": "layers.{}.mlp.dense_h_to_4h.bias",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": "layers.{}.mlp.dense_4h_to_h.weight",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias": "layers.{}.mlp.dense_4h_to_h.bias",
        "gpt_neox.final_layer_norm.weight": "final_layer_norm.weight",
        "gpt_neox.final_layer_norm.bias": "final_layer_norm.bias",
        # the name in the Pythia checkpoints, and still the one transformers 5 writes to files
        "embed_out.weight": "embed_out.weight",
    },
    # transformers 5 calls the output projection `lm_head` in memory, so a state dict saved by hand has that name
    aliases={"lm_head.weight": "embed_out.weight"},
    ignored=(
        "gpt_neox.layers.{}.attention.rotary_emb.inv_freq",  # rotary frequencies: recomputed from rotary_emb_base
        "gpt_neox.rotary_emb.inv_freq",  # the same, where transformers 4.4x keeps one table for all layers
        "gpt_neox.layers.{}.attention.bias",  # old checkpoints' causal-mask buffer: SDPA's is_causal does its job
        "gpt_neox.layers.{}.attention.masked_bias",  # the -1e9 fill value that went with that mask
    ),
)

# BERT and RoBERTa share the body's names; the heads' checkpoints put it under `bert.` / `roberta.`, BertModel's
# at the top level. rafale's encoder uses these exact names, so the maps below are identities, written out so
# that a renamed module in encoder.py fails loudly here instead of loading nothing.
ENCODER_BODY = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
    "encoder.layer.{}.attention.self.query.weight",
    "encoder.layer.{}.attention.self.query.bias",
    "encoder.layer.{}.attention.self.key.weight",
    "encoder.layer.{}.attention.self.key.bias",
    "encoder.layer.{}.attention.self.value.weight",
    "encoder.layer.{}.attention.self.value.bias",
    "encoder.layer.{}.attention.output.dense.weight",
    "encoder.layer.{}.attention.output.dense.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias",
    "encoder.layer.{}.intermediate.dense.weight",
    "encoder.layer.{}.intermediate.dense.bias",
    "encoder.layer.{}.output.dense.weight",
    "encoder.layer.{}.output.dense.bias",
    "encoder.layer.{}.output.LayerNorm.weight",
    "encoder.layer.{}.output.LayerNorm.bias",
)
POOLER = ("pooler.dense.weight", "pooler.dense.bias")
ENCODER_HEADS = {
    # HF writes the masked-LM decoder's weight and bias once, as the word embeddings and `*.bias`; the
    # `decoder.*` names below are aliases, found in older checkpoints (bert-base-uncased) and tied in rafale
    ("bert", "mlm"): (
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.bias",
    ),
    ("bert", "classification"): ("classifier.weight", "classifier.bias"),
    ("roberta", "mlm"): (
        "lm_head.dense.weight",
        "lm_head.dense.bias",
        "lm_head.layer_norm.weight",
        "lm_head.layer_norm.bias",
        "lm_head.bias",
    ),
    ("roberta", "classification"): (
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    ),
}
MLM_DECODER_ALIASES = {
    "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    "roberta": ("lm_head.decoder.weight", "lm_head.decoder.bias"),
}


def encoder_layout(family: str, head: str) -> WeightLayout:
    prefix = "" if head == "base" else f"{family}."
    # BertModel and BERT's classifier use the pooler; RoBERTa's classifier has its own dense layer instead
    has_pooler = head == "base" or (family, head) == ("bert", "classification")
    body = [prefix + name for name in ENCODER_BODY + (POOLER if has_pooler else ())]
    names = body + list(ENCODER_HEADS.get((family, head), ()))
    ignored = [
        prefix + "embeddings.position_ids",  # arange(max_position_embeddings), a buffer in older checkpoints
        prefix + "embeddings.token_type_ids",  # zeros, the default token types: a buffer in older checkpoints
    ]
    if head == "mlm":
        # bert-base-uncased and roberta-base were saved with their pretraining heads: the pooler, and for BERT
        # the next-sentence classifier. A masked LM has no use for them (HF drops them with a warning too).
        ignored += [prefix + name for name in POOLER]
        ignored += ["cls.seq_relationship.weight", "cls.seq_relationship.bias"] if family == "bert" else []
    aliases = {name: name for name in MLM_DECODER_ALIASES[family]} if head == "mlm" else {}
    return WeightLayout(names={name: name for name in names}, aliases=aliases, ignored=tuple(ignored))


def layout_for(architecture: str) -> WeightLayout:
    family, head = ARCHITECTURES[architecture]
    return GPT_NEOX_LAYOUT if family == "gpt_neox" else encoder_layout(family, head)


def split_layer_index(name: str) -> tuple[str, Optional[str]]:
    """'gpt_neox.layers.3.mlp.dense_h_to_4h.weight' -> ('gpt_neox.layers.{}.mlp.dense_h_to_4h.weight', '3')."""
    match = re.search(r"\.(\d+)\.", name)
    if match is None:
        return name, None
    return name[: match.start()] + ".{}." + name[match.end() :], match.group(1)


def legacy_layer_norm_name(name: str) -> str:
    """Checkpoints converted from TensorFlow BERT call LayerNorm's weight and bias gamma and beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


# ----------------------------------------------------------------------------------------------------
# config.json <-> rafale configs


def _require(hf: dict, key: str, config_path: Path):
    if key not in hf:
        raise WeightsError(f"{config_path}: missing '{key}'")
    return hf[key]


def decoder_config_from_hf(hf: dict, config_path: Path) -> DecoderConfig:
    if hf.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(f"{config_path}: hidden_act must be 'gelu' (rafale's GPT-NeoX), got {hf['hidden_act']!r}")
    if hf.get("tie_word_embeddings", False):
        raise WeightsError(f"{config_path}: tie_word_embeddings must be false: rafale's GPT-NeoX has its own embed_out")
    if not hf.get("attention_bias", True):
        raise WeightsError(f"{config_path}: attention_bias must be true: rafale's GPT-NeoX attention has biases")
    # rope settings moved over the years: rotary_pct / rotary_emb_base (Pythia), partial_rotary_factor /
    # rope_theta (transformers 4.5x), and in transformers 5 a `rope_parameters` dict, which is what it writes
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise WeightsError(f"{config_path}: rope type {rope_type!r} is not supported (only plain rotary, 'default')")
    rotary_pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
    rotary_base = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    cfg = DecoderConfig(
        vocab_size=_require(hf, "vocab_size", config_path),
        hidden_size=_require(hf, "hidden_size", config_path),
        num_layers=_require(hf, "num_hidden_layers", config_path),
        num_heads=_require(hf, "num_attention_heads", config_path),
        intermediate_size=_require(hf, "intermediate_size", config_path),
        max_position_embeddings=_require(hf, "max_position_embeddings", config_path),
        rotary_pct=float(rotary_pct),
        rotary_base=float(rotary_base),
        parallel_residual=hf.get("use_parallel_residual", True),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )
    try:
        cfg.validate()
    except ValueError as err:
        raise WeightsError(f"{config_path}: {err}") from None
    return cfg


def encoder_config_from_hf(hf: dict, family: str, config_path: Path) -> EncoderConfig:
    if hf.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(f"{config_path}: hidden_act must be 'gelu' (rafale's encoder MLP), got {hf['hidden_act']!r}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        kind = hf["position_embedding_type"]
        raise WeightsError(f"{config_path}: position_embedding_type must be 'absolute', got {kind!r}")
    if hf.get("add_cross_attention", False):
        raise WeightsError(f"{config_path}: add_cross_attention must be false: rafale's encoder has none")
    # HF's defaults for the optional fields (BertConfig / RobertaConfig); the sizes must be there
    pad_token_id = hf.get("pad_token_id", 1 if family == "roberta" else 0)
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    cfg = EncoderConfig(
        family=family,
        vocab_size=_require(hf, "vocab_size", config_path),
        hidden_size=_require(hf, "hidden_size", config_path),
        num_layers=_require(hf, "num_hidden_layers", config_path),
        num_heads=_require(hf, "num_attention_heads", config_path),
        intermediate_size=_require(hf, "intermediate_size", config_path),
        max_position_embeddings=_require(hf, "max_position_embeddings", config_path),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=pad_token_id,
        # RoBERTa's real tokens count their positions from pad_token_id + 1 (see encoder.py)
        position_offset=pad_token_id + 1 if family == "roberta" else 0,
        num_labels=num_labels,
        classifier_dropout=hf.get("classifier_dropout"),
        init_std=hf.get("initializer_range", 0.02),
    )
    try:
        cfg.validate()
    except ValueError as err:
        raise WeightsError(f"{config_path}: {err}") from None
    return cfg


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", as config.json spells it


def decoder_config_to_hf(cfg: DecoderConfig, vocab_size: int) -> dict:
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        # both spellings of the rope settings: transformers 4 reads the first pair, transformers 5 the dict
        # (and converts the first pair into it when the dict is absent)
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {
            "rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_pct,
        },
        "use_parallel_residual": cfg.parallel_residual,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": "gelu",
        "tie_word_embeddings": False,
        "attention_bias": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }


def encoder_config_to_hf(cfg: EncoderConfig, architecture: str, vocab_size: int, id2label: Optional[dict]) -> dict:
    hf = {
        "architectures": [architecture],
        "model_type": cfg.family,
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "classifier_dropout": cfg.classifier_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": True,  # the masked LM's decoder is the word embeddings
    }
    if ARCHITECTURES[architecture][1] == "classification":
        # keep the label names of an imported classifier when the number of classes did not change
        if not id2label or len(id2label) != cfg.num_labels:
            id2label = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf["id2label"] = {str(i): label for i, label in id2label.items()}
        hf["label2id"] = {label: int(i) for i, label in id2label.items()}
    return hf


# ----------------------------------------------------------------------------------------------------
# Reading checkpoints


def download_from_hub(name: str) -> Path:
    """A hub repository's config and safetensors weights in the local HF cache (optional: needs huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(f"'hf:{name}' needs the huggingface_hub package (or pass a downloaded folder)") from None
    try:
        patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as err:
        raise WeightsError(f"could not fetch '{name}' from the Hugging Face hub (offline?): {err}") from None


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's tensor files, safetensors first; pickled .bin files only when nothing else is there."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise WeightsError(f"{folder / index}: not a valid shard index ({err})") from None
            return [folder / shard for shard in sorted(set(weight_map.values()))]
    raise WeightsError(
        f"{folder}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def read_weight_file(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path, device="cpu")
        else:
            # weights_only: tensors and plain containers only, so a .bin file cannot run code when unpickled
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read weights file {path}: {err}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise WeightsError(f"{path}: expected a flat dict of tensors (a state dict)")
    return tensors


def read_checkpoint(folder: Path) -> dict:
    tensors = {}
    for path in weight_files(folder):
        for name, tensor in read_weight_file(path).items():
            if name in tensors:
                raise WeightsError(f"{path}: tensor '{name}' is also stored in another shard")
            tensors[name] = tensor
    return tensors


def read_config(folder: Path) -> tuple[dict, str]:
    """config.json and the architecture it names; WeightsError if rafale has no model for it."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        hf = json.loads(config_path.read_text())
    except ValueError as err:
        raise WeightsError(f"{config_path}: not valid JSON ({err})") from None
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if architectures else DEFAULT_ARCHITECTURE.get(hf.get("model_type"))
    if architecture not in ARCHITECTURES:
        named = architecture or f"model_type {hf.get('model_type')!r}"
        raise WeightsError(f"{config_path}: unsupported architecture {named}; supported: {', '.join(ARCHITECTURES)}")
    return hf, architecture


def match_tensors(tensors: dict, model: nn.Module, layout: WeightLayout, where: str) -> dict:
    """Checkpoint tensors renamed to the model's names, every tied name filled; one WeightsError for all problems.

    Tied parameters (the masked LM's decoder and word embeddings) are one tensor under several names: the
    checkpoint needs to hold any one of them, and when it holds several they must agree.
    """
    model_names = set(model.state_dict())
    found = {}  # rafale name -> [(checkpoint name, tensor)]
    unexpected = []
    ignored = set(layout.ignored)
    for hf_name, tensor in tensors.items():
        template, index = split_layer_index(legacy_layer_norm_name(hf_name))
        if template in ignored:
            continue
        rafale_template = layout.names.get(template, layout.aliases.get(template))
        rafale_name = None if rafale_template is None else rafale_template.format(index)
        if rafale_name is None or rafale_name not in model_names:  # also a layer beyond num_layers
            unexpected.append(hf_name)
        else:
            found.setdefault(rafale_name, []).append((hf_name, tensor))

    # the names sharing one Parameter, in the model's order
    groups = {}
    for name, param in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(param), []).append((name, param))
    export_name = {rafale: hf for hf, rafale in expand_names(layout.names, model).items()}

    state, missing, wrong_shape, disagree = {}, [], [], []
    for group in groups.values():
        candidates = [pair for name, _ in group for pair in found.get(name, [])]
        expected = tuple(group[0][1].shape)
        if not candidates:
            missing.append(export_name.get(group[0][0], group[0][0]))
            continue
        shaped = []
        for hf_name, tensor in candidates:
            if tuple(tensor.shape) != expected:
                wrong_shape.append(f"{hf_name} (expected {expected}, found {tuple(tensor.shape)})")
            else:
                shaped.append((hf_name, tensor))
        if len(shaped) > 1 and not all(torch.equal(shaped[0][1], t) for _, t in shaped[1:]):
            disagree.append(" and ".join(hf_name for hf_name, _ in shaped))
        if shaped:
            state.update((name, shaped[0][1]) for name, _ in group)

    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(sorted(unexpected)))
    if wrong_shape:
        problems.append("wrong shape: " + ", ".join(wrong_shape))
    if disagree:
        problems.append("tied in rafale but stored with different values: " + ", ".join(disagree))
    if problems:
        raise WeightsError(f"weights in {where} do not fit the model:\n  " + "\n  ".join(problems))
    return state


def expand_names(names: dict, model: nn.Module) -> dict:
    """Templates with `{}` written out for each layer: {HF name: rafale name}."""
    expanded = {}
    for hf_template, rafale_template in names.items():
        layers = range(model.cfg.num_layers) if "{}" in hf_template else [None]
        for i in layers:
            expanded[hf_template.format(i)] = rafale_template.format(i)
    return expanded


def cast_parameters(model: nn.Module, dtype: torch.dtype):
    # parameters only: buffers such as the rotary inv_freq stay fp32, as transformers keeps them
    for param in model.parameters():
        param.data = param.data.to(dtype)


def from_pretrained(path: Union[str, Path], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A rafale model (in eval mode) from a Hugging Face model folder, or 'hf:<name>' from the hub.

    Tensors keep the dtype they are stored in unless `dtype` is given. `model.cfg` is the rafale config read
    from config.json; `model.hf_config` the config.json itself (save_pretrained reuses its label names and
    special token ids).
    """
    if isinstance(path, str) and path.startswith("hf:"):
        folder = download_from_hub(path[3:])
    else:
        folder = Path(path).expanduser()
    hf, architecture = read_config(folder)
    family, head = ARCHITECTURES[architecture]
    config_path = folder / "config.json"
    if family in ("clip", "siglip"):  # clip.py holds their name maps and config.json reader
        model = clip.build_model(contrastive_config_from_hf(hf))
        state = read_checkpoint(folder)
        load_contrastive_state(model, state, f"{folder} ({architecture})")
    else:
        model = GPTNeoX(decoder_config_from_hf(hf, config_path)) if family == "gpt_neox" else \
            build_encoder(encoder_config_from_hf(hf, family, config_path), head)
        tensors = read_checkpoint(folder)
        state = match_tensors(tensors, model, layout_for(architecture), f"{folder} ({architecture})")
        model.load_state_dict(state, strict=True)  # copies into the (tied) parameters

    # the dtype of the weights used, not of dropped buffers (fp16 Pythia files keep their inv_freq in fp32)
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    target = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    cast_parameters(model, target)
    model.hf_config = hf
    return model.eval()


def contrastive_config_from_hf(hf: dict) -> "clip.ClipConfig":
    try:
        return clip.config_from_hf(hf)
    except clip.ClipWeightsError as err:
        raise WeightsError(str(err)) from None


def load_contrastive_state(model: "clip.ContrastiveModel", tensors: dict, where: str):
    try:
        clip.load_hf_state_dict(model, tensors, where)
    except clip.ClipWeightsError as err:
        raise WeightsError(str(err)) from None


def contrastive_export(model: "clip.ContrastiveModel", vocab_size: int) -> tuple[dict, dict]:
    """(HF tensors, config.json) of a CLIP or SigLIP, its token embedding cut to the tokenizer's vocab_size."""
    cfg = model.cfg
    if not 0 < vocab_size <= cfg.text.vocab_size:
        raise WeightsError(f"save_pretrained: vocab_size must be in [1, {cfg.text.vocab_size}], got {vocab_size}")
    tensors = clip.hf_state_dict(model)
    embedding = "text_model.embeddings.token_embedding.weight"
    tensors[embedding] = tensors[embedding][:vocab_size]  # the rows of real tokens only
    hf = clip.config_to_hf(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size)))
    return {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}, hf


def copy_pretrained(pretrained: nn.Module, model: nn.Module) -> nn.Module:
    """Copy `pretrained`'s weights into `model`, a model of the same sizes, maybe with another head.

    The same architecture loads strictly. An encoder with another head (a classifier on an MLM run's
    encoder, or another number of classes) takes the body strictly; only what the checkpoint never had (the
    new head, and BERT's pooler when the checkpoint is a masked LM) keeps its fresh initialization.
    """
    if type(model) is type(pretrained) and getattr(model.cfg, "num_labels", None) == getattr(pretrained.cfg, "num_labels", None):
        model.load_state_dict(pretrained.state_dict(), strict=True)
        return model
    family = getattr(model.cfg, "family", None)
    if family is None:
        raise WeightsError(f"cannot load a {type(pretrained).__name__} into a {type(model).__name__}")
    new_body, old_body = getattr(model, family, model), getattr(pretrained, family, pretrained)
    missing, unexpected = new_body.load_state_dict(old_body.state_dict(), strict=False)
    missing = [name for name in missing if not name.startswith("pooler.")]
    if missing or unexpected:
        raise WeightsError(f"the pretrained encoder does not fit: missing {missing}, unexpected {unexpected}")
    return model


# ----------------------------------------------------------------------------------------------------
# Writing checkpoints

# special tokens a tokenizer may have, most likely first; the first one present in the vocabulary is used
# (end-of-text and padding in the order rafale.datapipes looks for them)
SPECIAL_TOKEN_CANDIDATES = {
    "bos_token": ("<|endoftext|>", "<s>", "[CLS]"),
    "eos_token": ("<|endoftext|>", "</s>", "<eos>", "[SEP]"),
    "unk_token": ("<unk>", "[UNK]"),
    "pad_token": ("<|padding|>", "<pad>", "[PAD]"),
    "mask_token": ("<mask>", "[MASK]"),
    "cls_token": ("[CLS]", "<s>"),
    "sep_token": ("[SEP]", "</s>"),
}


def special_tokens_of(tokenizer: Tokenizer) -> dict:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {}
    for role, candidates in SPECIAL_TOKEN_CANDIDATES.items():
        token = next((t for t in candidates if t in vocab), None)
        if token is not None:
            special[role] = token
    return special


def check_framing(tokenizer: Tokenizer, special: dict, architecture: str):
    """Warn when an encoder's tokenizer does not frame a text as the encoder datapipes do ([CLS] ... [SEP],
    <s> ... </s>): HF's `tokenizer(text)` on the export would then give the model ids it never saw in training.
    rafale's trained tokenizers carry that post-processor; a tokenizer file the user gave is left as it is."""
    cls, sep = special.get("cls_token"), special.get("sep_token")
    if ARCHITECTURES[architecture][0] == "gpt_neox" or cls is None or sep is None:
        return
    ids = tokenizer.encode("a").ids
    if ids[:1] != [tokenizer.token_to_id(cls)] or ids[-1:] != [tokenizer.token_to_id(sep)]:
        print(f"rafale: warning: save_pretrained: the tokenizer does not add {cls} ... {sep} (no post-processor), "
              "which the model was trained with; pass add_special_tokens=False to the exported tokenizer and frame "
              "the ids yourself, or give a tokenizer with a TemplateProcessing post-processor")


def architecture_of(model: nn.Module) -> str:
    """The HF architecture `model` is, exactly: a subclass (a researcher's variant) is not the class it extends."""
    if type(model) is GPTNeoX:
        return "GPTNeoXForCausalLM"
    if type(model) in (clip.CLIP, clip.SigLIP):
        return {"clip": "CLIPModel", "siglip": "SiglipModel"}[model.cfg.family]
    for architecture, (family, head) in ARCHITECTURES.items():
        if family in MODEL_CLASSES and type(model) is MODEL_CLASSES[family][head]:
            return architecture
    raise WeightsError(
        f"save_pretrained: expected a rafale GPTNeoX or encoder nn.Module, got {type(model).__name__} "
        "(a class of its own, or a Composer wrapper: pass its .model), which the Hugging Face layouts in hf.py "
        "do not describe"
    )


# the modules an exported model may be made of: rafale's own family files, and torch's building blocks
KNOWN_MODULES = ("rafale.models.decoder", "rafale.models.encoder", "rafale.models.clip")


def check_exportable(model: nn.Module) -> str:
    """The HF architecture of `model`, or a WeightsError saying why transformers would load something else.

    The name map only says where tensors go; transformers rebuilds the computation from config.json. So a module
    whose class the family's file does not define (a researcher's own attention, even one with no parameters of
    its own) would be exported as plain GPT-NeoX or BERT and silently compute something else once loaded."""
    architecture = architecture_of(model)
    for name, module in model.named_modules():
        where = type(module).__module__
        if where not in KNOWN_MODULES and not where.startswith("torch.nn."):
            raise WeightsError(
                f"save_pretrained: {name or 'the model'} is a {type(module).__name__} (from {where}), which "
                f"{architecture} in transformers does not have; an export would load as something else"
            )
    return architecture


# Config fields that only set up training, or that the export writes from elsewhere: the round trip below does not
# hold them to come back equal
TRAINING_ONLY_FIELDS = (
    "vocab_size",  # the export has the tokenizer's vocabulary: the padding rows (to a multiple of 64) are cut off
    "init_std",  # how the weights started; the weights themselves are exported
    "hidden_dropout", "attention_dropout", "classifier_dropout",  # training only (transformers' eval mode)
    "num_labels",  # a masked LM's unused default; a classifier's is its head's shape and id2label, exported
    "logit_scale_init", "logit_bias_init",  # CLIP/SigLIP: the starting values of parameters that are exported
)
_MISSING = object()


def config_round_trip(cfg, architecture: str):
    """`cfg` as transformers would read it back from the config.json save_pretrained writes: the rafale config
    turned into that dict, through JSON, and read again as from_pretrained reads it. A WeightsError where the
    reader refuses it."""
    family, head = ARCHITECTURES[architecture]
    here = Path("config.json")
    if family == "gpt_neox":
        return decoder_config_from_hf(json.loads(json.dumps(decoder_config_to_hf(cfg, cfg.vocab_size))), here)
    if head == "contrastive":
        return contrastive_config_from_hf(json.loads(json.dumps(clip.config_to_hf(cfg))))
    hf = encoder_config_to_hf(cfg, architecture, cfg.vocab_size, None)
    return encoder_config_from_hf(json.loads(json.dumps(hf)), family, here)


def lost_fields(cfg, back, where: str = "model.") -> list[tuple[str, object, object]]:
    """(key, value, value read back) of each field of `cfg` that `back` does not give back equal, training-only
    fields left out, nested configs (CLIP's towers) field by field. A field that `back` lacks (one a dataclass
    subclass added) comes back as its default: what an export that cannot say it would load."""
    lost = []
    for f in dataclasses.fields(cfg):
        if f.name in TRAINING_ONLY_FIELDS:
            continue
        value = getattr(cfg, f.name)
        if hasattr(back, f.name):
            returned = getattr(back, f.name)
        elif f.default is not dataclasses.MISSING:
            returned = f.default
        elif f.default_factory is not dataclasses.MISSING:
            returned = f.default_factory()
        else:
            returned = _MISSING
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(returned):
            lost += lost_fields(value, returned, f"{where}{f.name}.")
        elif value != returned:
            lost.append((where + f.name, value, "nothing" if returned is _MISSING else returned))
    return lost


def export_refusal(model: nn.Module) -> Optional[str]:
    """Why save_pretrained would refuse `model`, in a sentence, or None when it would write it. rafale's training
    asks before the first batch (so a run learns it before hours of training, not after them).

    Two checks, both general. The modules: a class the family's file does not define (check_exportable). The
    config: each field must come back equal through the config.json transformers reads (config_round_trip), so
    a field HF's class cannot express (model.norm: rmsnorm, or a variant's new field at another value than its
    default) is named with its value, instead of being written as a plain GPT-NeoX or BERT that computes
    something else once loaded."""
    try:
        architecture = check_exportable(model)
    except WeightsError as err:
        return str(err).removeprefix("save_pretrained: ")
    return config_refusal(model.cfg, architecture)


def config_refusal(cfg, architecture: str) -> Optional[str]:
    """export_refusal's config half: each field of `cfg` that `architecture`'s config.json cannot express, named
    with its value and what an export would load instead; None when every field comes back."""
    try:
        lost = lost_fields(cfg, config_round_trip(cfg, architecture))
    except WeightsError as err:  # a value transformers' reader refuses outright
        return str(err)
    if not lost:
        return None
    return "; ".join(f"{architecture} has no {value} for {key} (an export would load as {returned})"
                     for key, value, returned in lost)


def vocab_rows(architecture: str) -> tuple:
    """HF names of the tensors with one row per token: sliced when exporting fewer tokens than the model has."""
    family, head = ARCHITECTURES[architecture]
    if family == "gpt_neox":
        return ("gpt_neox.embed_in.weight", "embed_out.weight")
    prefix = "" if head == "base" else f"{family}."
    mlm_bias = {"bert": "cls.predictions.bias", "roberta": "lm_head.bias"}[family]
    return (prefix + "embeddings.word_embeddings.weight",) + ((mlm_bias,) if head == "mlm" else ())


def hf_tensors(model: nn.Module, architecture: str, vocab_size: int, dtype: Optional[torch.dtype]) -> dict:
    """The model's tensors under HF names, each tied tensor once, as transformers writes them."""
    state = model.state_dict(keep_vars=True)
    names = expand_names(layout_for(architecture).names, model)
    # every parameter must leave under some name: a module added to the model but not to the layout would
    # otherwise be dropped from the export without a word
    exported = {id(state[rafale]) for rafale in names.values()}
    left_out = [name for name, p in state.items() if id(p) not in exported]
    if left_out:
        raise WeightsError(f"save_pretrained: no HF name for {', '.join(left_out)} (update the layout in hf.py)")
    sliced = vocab_rows(architecture)
    tensors = {}
    for hf_name, rafale_name in names.items():
        tensor = state[rafale_name].detach().cpu()
        if hf_name in sliced:
            tensor = tensor[:vocab_size]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[hf_name] = tensor.contiguous().clone()  # own storage: safetensors refuses shared or strided views
    return tensors


def save_pretrained(
    model: nn.Module,
    folder: Union[str, Path],
    tokenizer: Optional[Tokenizer] = None,
    dtype: Optional[torch.dtype] = None,
    vocab_size: Optional[int] = None,
    overwrite: bool = False,
    label_names: Optional[list] = None,
):
    """Write `model` as a Hugging Face model folder: config.json, model.safetensors, and the tokenizer files
    when `tokenizer` is given. transformers' Auto classes load the result.

    vocab_size: the true vocabulary when the model's embedding was padded (rafale rounds it up to a multiple
    of 64); the extra rows are left out. Files are written to a temporary folder beside `folder` and renamed
    into place, so an interrupted export leaves nothing half-written; an existing non-empty `folder` is
    replaced only with overwrite=True. label_names: a classifier's class names, in id order (config.json's id2label).
    A model transformers would load as something else is a WeightsError saying why (export_refusal).
    """
    refusal = export_refusal(model)  # a module or a config value transformers' class would not reproduce
    if refusal is not None:
        raise WeightsError(f"save_pretrained: {refusal}")
    architecture = architecture_of(model)
    if ARCHITECTURES[architecture][1] == "contrastive":
        return save_contrastive(model, Path(folder).expanduser(), tokenizer, dtype, vocab_size, overwrite)
    cfg = model.cfg
    vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
    if not 0 < vocab_size <= cfg.vocab_size:
        raise WeightsError(f"save_pretrained: vocab_size must be in [1, {cfg.vocab_size}], got {vocab_size}")
    if tokenizer is not None and tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise WeightsError(
            f"save_pretrained: the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
            f"more than the {vocab_size} rows exported"
        )
    folder = Path(folder).expanduser()
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise WeightsError(f"save_pretrained: {folder} exists and is not empty (pass overwrite=True to replace it)")

    tensors = hf_tensors(model, architecture, vocab_size, dtype)
    previous = getattr(model, "hf_config", {})  # set by from_pretrained
    if architecture == "GPTNeoXForCausalLM":
        hf = decoder_config_to_hf(cfg, vocab_size)
        max_len = cfg.max_position_embeddings
    else:
        if cfg.pad_token_id >= vocab_size:
            raise WeightsError(f"save_pretrained: pad_token_id {cfg.pad_token_id} is not below vocab_size {vocab_size}")
        id2label = {str(i): name for i, name in enumerate(label_names)} if label_names else previous.get("id2label")
        hf = encoder_config_to_hf(cfg, architecture, vocab_size, id2label)
        max_len = cfg.max_seq_len
    special = special_tokens_of(tokenizer) if tokenizer is not None else {}
    if tokenizer is not None:
        check_framing(tokenizer, special, architecture)
    for role in ("bos", "eos"):
        token = special.get(f"{role}_token")
        hf[f"{role}_token_id"] = tokenizer.token_to_id(token) if token else previous.get(f"{role}_token_id")
    stored_dtype = dtype or next(t.dtype for t in tensors.values() if t.is_floating_point())
    hf["dtype"] = hf["torch_dtype"] = dtype_name(stored_dtype)  # transformers 5 reads dtype, 4 torch_dtype

    write_model_folder(folder, hf, tensors, tokenizer, special, max_len)


def save_contrastive(model: "clip.ContrastiveModel", folder: Path, tokenizer: Optional[Tokenizer],
                     dtype: Optional[torch.dtype], vocab_size: Optional[int], overwrite: bool):
    """save_pretrained for a CLIP or SigLIP: clip.py's names and config.json, written the same way."""
    vocab_size = model.cfg.text.vocab_size if vocab_size is None else vocab_size
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise WeightsError(f"save_pretrained: {folder} exists and is not empty (pass overwrite=True to replace it)")
    tensors, hf = contrastive_export(model, vocab_size)
    if dtype is not None:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    hf["dtype"] = hf["torch_dtype"] = dtype_name(dtype or next(iter(tensors.values())).dtype)
    special = special_tokens_of(tokenizer) if tokenizer is not None else {}
    write_model_folder(folder, hf, tensors, tokenizer, special, model.cfg.text.max_position_embeddings)


def write_model_folder(folder: Path, hf: dict, tensors: dict, tokenizer: Optional[Tokenizer], special: dict,
                       max_len: int):
    """config.json, model.safetensors and the tokenizer files, written beside `folder` and renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (staging / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        # transformers refuses safetensors files without the "pt" format tag
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(str(staging / "tokenizer.json"))
            tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, **special}
            (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
            (staging / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(new: Path, folder: Path):
    """Rename `new` to `folder`; an existing `folder` is moved aside first and deleted once `new` is in place."""
    if not folder.exists():
        os.rename(new, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    os.rename(folder, old / folder.name)
    try:
        os.rename(new, folder)
    except OSError:
        os.rename(old / folder.name, folder)  # put the previous export back
        old.rmdir()
        raise
    shutil.rmtree(old)


def load_tokenizer_from_folder(folder: Union[str, Path]) -> Optional[Tokenizer]:
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`, or None when it has none."""
    path = Path(folder).expanduser() / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None
