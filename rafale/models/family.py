"""What the rest of rafale asks of a model family: one `Family` object per family, defined in the family's own
file (rafale/models/pythia.py, bert.py, contrastive.py) and listed in `FAMILIES` (rafale/models/families.py).

The training run builds a family's model and datapipe through it, `rafale generate` and `lm-eval` ask whether it
can generate text, the resume guard and the run folder rebuild its config class, and the Hugging Face import and
export (rafale/models/hf.py, the shared machinery) read its `HFFormat`: the architectures it reads and writes, its
config.json both ways, and its tensors' names. No module compares `model.type` to a family's name.

The decoder families (Pythia, Llama, Qwen2, Qwen3) are one Decoder with other defaults, so they share a builder
and the shape of their format: `decoder_family` makes their Family from what a family's file states, its config
class (the parts), its presets, and its Hugging Face names and config.json both ways.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class HFFormat:
    """A family's Hugging Face format, for rafale/models/hf.py.

    architectures: config.json's `architectures[0]` -> the head it is (one of Family.heads, or "base" for the bare
    model), in the order from_pretrained tries them for a config.json without `architectures`.
    model_type: config.json's `model_type` (gpt_neox, bert, ...).
    config_from_hf(hf: dict, path) -> the family's config; a WeightsError for what rafale's model cannot be.
    config_to_hf(cfg, architecture: str, vocab_size: int, id2label: dict | None) -> the config.json to write.
    module(cfg, head) -> the bare nn.Module of that head (what from_pretrained fills).
    architecture_of(module) -> its architecture, or None when the module is not exactly one of the family's classes
    (a subclass is someone's variant, which the format does not describe).
    load(module, tensors: dict, architecture, where) -> the module's state dict from the checkpoint's tensors
    (strict both ways; a WeightsError naming every missing, unexpected or mis-shaped tensor).
    tensors(module, architecture, vocab_size) -> {HF name: tensor}, each tied tensor once, the token rows cut to
    vocab_size.
    max_length(cfg) -> the longest sequence (the tokenizer config's model_max_length).
    module_files: the Python modules an exported model may be made of, besides torch.nn's.
    frames_text: its tokenizer must frame a text as training did ([CLS] ... [SEP]): the export warns otherwise.
    special_ids: config.json takes the tokenizer's bos/eos ids at its top level.
    """

    architectures: dict
    model_type: str
    config_from_hf: Callable
    config_to_hf: Callable
    module: Callable
    architecture_of: Callable
    load: Callable
    tensors: Callable
    max_length: Callable
    module_files: tuple
    frames_text: bool = False
    special_ids: bool = True


@dataclass(frozen=True)
class Family:
    """A model family: `model.type: <name>` in a config.

    config: its config dataclass (with validate()); presets: preset name -> config, the first the default (a tiny
    one: what the tests and DEBUG=1 use); heads: the heads it has (causal_lm, mlm, classification, contrastive),
    the first the default model.task; a model.task whose datapipe's `head` is one of them trains it;
    build(cfg, head, meta, tokenizer) -> the Composer model with that head (meta: the prepared data's description, which fixes
    the vocabulary, special ids and classes); data: the keyword arguments its datapipes take (the tokenizer a
    `data.tokenizer: train` trains for it, ...); hf: its Hugging Face format, or None; can_generate: a decoder
    that `rafale generate` and `rafale lm-eval` can run."""

    name: str
    config: type
    presets: dict
    heads: tuple
    build: Callable
    data: dict = field(default_factory=dict)
    hf: Optional[HFFormat] = None
    can_generate: bool = False


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def model_vocab_size(configured: Optional[int], vocab_size: int) -> int:
    """The embedding size: the configured one, or the tokenizer's rounded up to a multiple of 64 for fast matmuls."""
    from rafale.errors import DataError

    if configured is None:
        return round_up(vocab_size, 64)
    if vocab_size > configured:
        raise DataError(
            f"model.vocab_size ({configured}) is smaller than the tokenizer's vocabulary ({vocab_size}); "
            "raise model.vocab_size or use a smaller tokenizer"
        )
    return configured


def first(mapping: dict) -> Any:
    return next(iter(mapping.values()))


# ----------------------------------------------------------------------------------------------------
# the decoder families: rafale/models/decoder.py's Decoder with a config's defaults


def build_decoder(model_cfg, head: str, meta: dict, tokenizer):
    """A decoder for causal LM (validation bits per byte need the tokenizer's token lengths); every decoder family
    (Pythia, Llama, Qwen2, Qwen3) builds its model this way."""
    from rafale.models.composer import ComposerLM
    from rafale.models.decoder import Decoder
    from rafale.models.token_bytes import adds_prefix_space, token_bytes

    model_cfg.vocab_size = model_vocab_size(model_cfg.vocab_size, meta["vocab_size"])
    # exact for a byte-level BPE; None (no BitsPerByte, rafale.run.train says why) for other kinds: validation sees ids
    table, document_end_id = token_bytes(tokenizer), None
    if table is not None and adds_prefix_space(tokenizer):
        # the space added before each document is not its text: BitsPerByte takes it off the token after each
        # end-of-text (the datapipe's separator); with none to find the documents by, no BitsPerByte, not a wrong one
        document_end_id = meta.get("eos_token_id")
        table = table if document_end_id is not None else None
    return ComposerLM(Decoder(model_cfg), vocab_size=meta["vocab_size"], token_bytes=table,
                      document_end_id=document_end_id)


def decoder_family(config: type, presets: dict, *, architecture: str, model_type: str, layout, vocab_rows: tuple,
                   config_from_hf: Callable, config_to_hf: Callable) -> Family:
    """The Family named `config.family`: a Decoder with `config`'s parts as its defaults, trained as a causal LM on a
    BPE tokenizer, able to generate, and read and written as the Hugging Face `architecture` (config.json's
    `model_type`) with `layout`'s tensor names (a WeightLayout); `vocab_rows`: its tensors with one row per token,
    cut to the tokenizer's vocabulary on export. Only a Decoder of this family exports as `architecture`: a
    subclass is someone's variant, which the format does not describe."""
    from rafale.models.decoder import Decoder  # (here: family.py is every family's, the encoders' too)
    from rafale.models.layout import layout_loader, layout_tensors

    def architecture_of(module) -> Optional[str]:
        return architecture if type(module) is Decoder and module.cfg.family == config.family else None

    return Family(
        name=config.family,
        config=config,
        presets=presets,
        heads=("causal_lm",),
        build=build_decoder,
        data={"tokenizer_kind": "bpe"},
        hf=HFFormat(
            architectures={architecture: "causal_lm"},
            model_type=model_type,
            config_from_hf=config_from_hf,
            config_to_hf=config_to_hf,
            module=lambda cfg, head: Decoder(cfg),
            architecture_of=architecture_of,
            load=layout_loader(lambda _: layout),
            tensors=layout_tensors(lambda _: layout, lambda _: vocab_rows),
            max_length=lambda cfg: cfg.max_position_embeddings,
            module_files=("rafale.models.decoder",),
        ),
        can_generate=True,
    )
