"""The BERT and RoBERTa families in one place: their presets, what they train for (masked LM, classification),
how their Composer models are built, and their Hugging Face formats (config.json both ways, the name maps of
their tensors). The models, the nn.Modules, are rafale/models/encoder.py; the two families differ in their
embeddings, heads and tokenizers only, so one set of functions here serves both, by `EncoderConfig.family`.

    model: {type: bert, task: classification}     # or roberta; preset bert-tiny / roberta-tiny by default
"""

from pathlib import Path
from typing import Optional

from rafale.errors import WeightsError
from rafale.models.encoder import MODEL_CLASSES, EncoderConfig, build_encoder
from rafale.models.family import Family, HFFormat, model_vocab_size
from rafale.models.layout import WeightLayout, layout_loader, layout_tensors, require

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


# ----------------------------------------------------------------------------------------------------
# the Composer models


def build(model_cfg: EncoderConfig, head: str, meta: dict, tokenizer):
    """A BERT or RoBERTa encoder with `head`: mlm, or classification over meta's label_names."""
    from rafale.models.composer import ComposerClassifier, ComposerMLM

    model_cfg.vocab_size = model_vocab_size(model_cfg.vocab_size, meta["vocab_size"])
    model_cfg.pad_token_id = meta["pad_token_id"]
    if model_cfg.family == "roberta":  # RoBERTa's positions count from the padding id
        model_cfg.position_offset = meta["pad_token_id"] + 1
    if head == "mlm":
        return ComposerMLM(build_encoder(model_cfg, "mlm"), vocab_size=meta["vocab_size"])
    model_cfg.num_labels = len(meta["label_names"])
    return ComposerClassifier(build_encoder(model_cfg, "classification"), model_cfg.num_labels)



# ----------------------------------------------------------------------------------------------------
# the Hugging Face formats: {Bert,Roberta}{Model,ForMaskedLM,ForSequenceClassification}

# family -> config.json architecture -> the head it is
ARCHITECTURES = {
    family: {prefix + "Model": "base", prefix + "ForMaskedLM": "mlm", prefix + "ForSequenceClassification": "classification"}
    for family, prefix in (("bert", "Bert"), ("roberta", "Roberta"))
}


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



def layout(architecture: str) -> WeightLayout:
    """The name map of one architecture (its family is in its name)."""
    family = "roberta" if architecture.startswith("Roberta") else "bert"
    return encoder_layout(family, ARCHITECTURES[family][architecture])


def vocab_rows(architecture: str) -> tuple:
    """HF names of the tensors with one row per token: sliced when exporting fewer tokens than the model has."""
    family = "roberta" if architecture.startswith("Roberta") else "bert"
    head = ARCHITECTURES[family][architecture]
    prefix = "" if head == "base" else f"{family}."
    mlm_bias = {"bert": "cls.predictions.bias", "roberta": "lm_head.bias"}[family]
    return (prefix + "embeddings.word_embeddings.weight",) + ((mlm_bias,) if head == "mlm" else ())


def config_from_hf(hf: dict, family: str, config_path: Path) -> EncoderConfig:
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
        vocab_size=require(hf, "vocab_size", config_path),
        hidden_size=require(hf, "hidden_size", config_path),
        num_layers=require(hf, "num_hidden_layers", config_path),
        num_heads=require(hf, "num_attention_heads", config_path),
        intermediate_size=require(hf, "intermediate_size", config_path),
        max_position_embeddings=require(hf, "max_position_embeddings", config_path),
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



def config_to_hf(cfg: EncoderConfig, architecture: str, vocab_size: Optional[int] = None,
                 id2label: Optional[dict] = None) -> dict:
    """The config.json of `architecture` with `cfg`'s sizes; a classifier's id2label kept when its classes fit."""
    vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
    if cfg.pad_token_id >= vocab_size:
        raise WeightsError(f"save_pretrained: pad_token_id {cfg.pad_token_id} is not below vocab_size {vocab_size}")
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
    if ARCHITECTURES[cfg.family][architecture] == "classification":
        # keep the label names of an imported classifier when the number of classes did not change
        if not id2label or len(id2label) != cfg.num_labels:
            id2label = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf["id2label"] = {str(i): label for i, label in id2label.items()}
        hf["label2id"] = {label: int(i) for i, label in id2label.items()}
    return hf




def architecture_of(module) -> Optional[str]:
    for family, architectures in ARCHITECTURES.items():
        for architecture, head in architectures.items():
            if type(module) is MODEL_CLASSES[family][head]:
                return architecture
    return None


def encoder_family(name: str, presets: dict, tokenizer_kind: str) -> Family:
    return Family(
        name=name,
        config=EncoderConfig,
        presets=presets,
        heads=("mlm", "classification"),
        build=build,
        data={"tokenizer_kind": tokenizer_kind},
        hf=HFFormat(
            architectures=ARCHITECTURES[name],
            model_type=name,
            config_from_hf=lambda hf, path: config_from_hf(hf, name, path),
            config_to_hf=config_to_hf,
            module=lambda cfg, head: build_encoder(cfg, head),
            architecture_of=lambda module: architecture_of(module) if getattr(module, "cfg", None) is not None
            and getattr(module.cfg, "family", None) == name else None,
            load=layout_loader(layout),
            tensors=layout_tensors(layout, vocab_rows),
            max_length=lambda cfg: cfg.max_seq_len,
            module_files=("rafale.models.encoder",),
            frames_text=True,
        ),
    )


BERT = encoder_family("bert", BERT_PRESETS, "wordpiece")  # lower-cased WordPiece, as bert-base-uncased
ROBERTA = encoder_family("roberta", ROBERTA_PRESETS, "bpe-roberta")  # byte-level BPE with RoBERTa's specials
