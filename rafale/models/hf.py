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

This file is the machinery every family shares: reading safetensors (or weights_only .bin) files, strict
matching through a name map (`WeightLayout`, rafale/models/layout.py), the export's checks, and writing the folder. What is a family's own
(the architectures it reads and writes, its config.json both ways, its name maps) is in its `HFFormat`, in the
family's file (rafale/models/pythia.py: GPTNeoXForCausalLM; bert.py: BERT / RoBERTa as Model, ForMaskedLM,
ForSequenceClassification; contrastive.py: CLIPModel / SiglipModel), found through rafale/models/families.py.
It reads and writes the formats only; it never imports transformers (the tests use it as a reference).
"""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from rafale.errors import WeightsError
from rafale.models.mup import fold_mup, mup_fold_refusal
from rafale.models.families import FAMILIES


# ----------------------------------------------------------------------------------------------------
# Architectures: each family's HFFormat lists the config.json `architectures[0]` it reads and writes


def architectures() -> dict:
    """config.json architecture -> (its Family, the head it is), over every family with a Hugging Face format."""
    return {name: (family, head) for family in FAMILIES.values() if family.hf is not None
            for name, head in family.hf.architectures.items()}


def default_architecture(model_type: str) -> Optional[str]:
    """What AutoModel builds from a config.json without `architectures`: the family's first (its bare model or its
    only one). GPTNeoXModel (no output projection) is not accepted: rafale's GPTNeoX always has one, and inventing
    it would hide a wrong checkpoint."""
    return next((name for name, (family, _) in architectures().items() if family.hf.model_type == model_type), None)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", as config.json spells it


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
    named = hf.get("architectures") or []
    architecture = named[0] if named else default_architecture(hf.get("model_type"))
    supported = architectures()
    if architecture not in supported:
        named = architecture or f"model_type {hf.get('model_type')!r}"
        raise WeightsError(f"{config_path}: unsupported architecture {named}; supported: {', '.join(supported)}")
    return hf, architecture


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
    family, head = architectures()[architecture]
    model = family.hf.module(family.hf.config_from_hf(hf, folder / "config.json"), head)
    state = family.hf.load(model, read_checkpoint(folder), architecture, f"{folder} ({architecture})")
    # the dtype of the weights used, not of dropped buffers (fp16 Pythia files keep their inv_freq in fp32)
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    target = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    cast_parameters(model, target)
    model.hf_config = hf
    return model.eval()


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
    if cls is None or sep is None:
        return
    ids = tokenizer.encode("a").ids
    if ids[:1] != [tokenizer.token_to_id(cls)] or ids[-1:] != [tokenizer.token_to_id(sep)]:
        print(f"rafale: warning: save_pretrained: the tokenizer does not add {cls} ... {sep} (no post-processor), "
              "which the model was trained with; pass add_special_tokens=False to the exported tokenizer and frame "
              "the ids yourself, or give a tokenizer with a TemplateProcessing post-processor")


def family_and_architecture(model: nn.Module):
    """(Family, HF architecture) that `model` is exactly: a subclass (a researcher's variant) is not the class it
    extends, and a Composer wrapper is not the model."""
    for family in FAMILIES.values():
        architecture = family.hf.architecture_of(model) if family.hf is not None else None
        if architecture is not None:
            return family, architecture
    raise WeightsError(
        f"save_pretrained: expected one of rafale's exportable nn.Modules, got {type(model).__name__} (a class of "
        "its own, or a Composer wrapper: pass its .model), which no family's Hugging Face format describes"
    )


def architecture_of(model: nn.Module) -> str:
    return family_and_architecture(model)[1]


def check_exportable(model: nn.Module) -> str:
    """The HF architecture of `model`, or a WeightsError saying why transformers would load something else.

    The name map only says where tensors go; transformers rebuilds the computation from config.json. So a module
    whose class the family's file does not define (a researcher's own attention, even one with no parameters of
    its own) would be exported as plain GPT-NeoX or BERT and silently compute something else once loaded."""
    family, architecture = family_and_architecture(model)
    for name, module in model.named_modules():
        where = type(module).__module__
        if where not in family.hf.module_files and not where.startswith("torch.nn."):
            raise WeightsError(
                f"save_pretrained: {name or 'the model'} is a {type(module).__name__} (from {where}), which "
                f"{architecture} in transformers does not have; an export would load as something else"
            )
    return architecture


# Config fields that only set up training, or that the export writes from elsewhere: the round trip below does not
# hold them to come back equal
TRAINING_ONLY_FIELDS = (
    "vocab_size",  # the export has the tokenizer's vocabulary: the padding rows (to a multiple of 64) are cut off
    "init_std", "zero_init_proj",  # how the weights started; the weights themselves are exported
    "hidden_dropout", "attention_dropout", "classifier_dropout",  # training only (transformers' eval mode)
    "num_labels",  # a masked LM's unused default; a classifier's is its head's shape and id2label, exported
    "logit_scale_init", "logit_bias_init",  # CLIP/SigLIP: the starting values of parameters that are exported
)
_MISSING = object()


def config_round_trip(cfg, architecture: str):
    """`cfg` as transformers would read it back from the config.json save_pretrained writes: the rafale config
    turned into that dict, through JSON, and read again as from_pretrained reads it. A WeightsError where the
    reader refuses it."""
    family, _ = architectures()[architecture]
    written = json.loads(json.dumps(family.hf.config_to_hf(cfg, architecture, None, None)))
    return family.hf.config_from_hf(written, Path("config.json"))


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
    cfg = model.cfg
    if is_mup(model):  # the export is the standard model that computes the same logits (fold_mup)
        if (refusal := mup_fold_refusal(cfg)) is not None:
            return refusal
        cfg = dataclasses.replace(cfg, mup_base_width=None)
    return config_refusal(cfg, architecture)


def is_mup(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "cfg", None), "mup_base_width", None))


def standard_equivalent(model: nn.Module) -> nn.Module:
    """`model` itself, or for a muP decoder (model.parametrization: mup) the standard one that computes the same
    logits (rafale.models.decoder.fold_mup), which is what an export writes."""
    return fold_mup(model) if is_mup(model) else model


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
    model = standard_equivalent(model)  # muP's multipliers folded into the weights
    family, architecture = family_and_architecture(model)
    cfg = model.cfg
    rows = cfg.vocab_size if hasattr(cfg, "vocab_size") else cfg.text.vocab_size  # CLIP's is its text tower's
    vocab_size = rows if vocab_size is None else vocab_size
    if not 0 < vocab_size <= rows:
        raise WeightsError(f"save_pretrained: vocab_size must be in [1, {rows}], got {vocab_size}")
    if tokenizer is not None and tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise WeightsError(
            f"save_pretrained: the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
            f"more than the {vocab_size} rows exported"
        )
    folder = Path(folder).expanduser()
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise WeightsError(f"save_pretrained: {folder} exists and is not empty (pass overwrite=True to replace it)")

    tensors = {name: t.detach().cpu() for name, t in family.hf.tensors(model, architecture, vocab_size).items()}
    if dtype is not None:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    # own storage: safetensors refuses shared or strided views
    tensors = {name: t.contiguous().clone() for name, t in tensors.items()}
    previous = getattr(model, "hf_config", {})  # set by from_pretrained
    id2label = {str(i): name for i, name in enumerate(label_names)} if label_names else previous.get("id2label")
    hf = family.hf.config_to_hf(cfg, architecture, vocab_size, id2label)
    special = special_tokens_of(tokenizer) if tokenizer is not None else {}
    if tokenizer is not None and family.hf.frames_text:
        check_framing(tokenizer, special, architecture)
    for role in ("bos", "eos") if family.hf.special_ids else ():
        token = special.get(f"{role}_token")
        hf[f"{role}_token_id"] = tokenizer.token_to_id(token) if token else previous.get(f"{role}_token_id")
    stored_dtype = dtype or next(t.dtype for t in tensors.values() if t.is_floating_point())
    hf["dtype"] = hf["torch_dtype"] = dtype_name(stored_dtype)  # transformers 5 reads dtype, 4 torch_dtype

    write_model_folder(folder, hf, tensors, tokenizer, special, family.hf.max_length(cfg))


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
