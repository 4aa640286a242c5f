"""The Pythia / GPT-NeoX family in one place: its presets, what it trains for, how its Composer model is built,
and its Hugging Face format (config.json both ways, and the name map of its tensors). The model itself is
rafale/models/decoder.py's Decoder with DecoderConfig's defaults (LayerNorm, GELU MLP, fused biased q/k/v,
parallel residual, rotary on a quarter of each head, untied head).

    model: {type: pythia, preset: pythia-tiny}     # a preset below, any DecoderConfig field overridden
"""

from pathlib import Path

from rafale.errors import WeightsError
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.models.family import Family, HFFormat, model_vocab_size
from rafale.models.layout import WeightLayout, layout_loader, layout_tensors, require

PRESETS = {
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


# ----------------------------------------------------------------------------------------------------
# the Composer model


def build(model_cfg: DecoderConfig, head: str, meta: dict, tokenizer):
    """A decoder for causal LM (validation bits per byte need the tokenizer's token lengths); every decoder family
    (Pythia, Llama, Qwen3) builds its model this way."""
    from rafale.models.token_bytes import adds_prefix_space, token_bytes
    from rafale.models.composer import ComposerLM

    model_cfg.vocab_size = model_vocab_size(model_cfg.vocab_size, meta["vocab_size"])
    # exact for a byte-level BPE; None (no BitsPerByte, rafale.train says why) for other kinds: validation sees ids
    table, document_end_id = token_bytes(tokenizer), None
    if table is not None and adds_prefix_space(tokenizer):
        # the space added before each document is not its text: BitsPerByte takes it off the token after each
        # end-of-text (the datapipe's separator); with none to find the documents by, no BitsPerByte, not a wrong one
        document_end_id = meta.get("eos_token_id")
        table = table if document_end_id is not None else None
    return ComposerLM(Decoder(model_cfg), vocab_size=meta["vocab_size"], token_bytes=table,
                      document_end_id=document_end_id)



# ----------------------------------------------------------------------------------------------------
# the Hugging Face format: GPTNeoXForCausalLM

ARCHITECTURE = "GPTNeoXForCausalLM"

LAYOUT = WeightLayout(
    names={
        "gpt_neox.embed_in.weight": "embed.weight",
        "gpt_neox.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
        "gpt_neox.layers.{}.input_layernorm.bias": "layers.{}.attn_norm.bias",
        "gpt_neox.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
        "gpt_neox.layers.{}.post_attention_layernorm.bias": "layers.{}.mlp_norm.bias",
        # NeoX's fused q/k/v is interleaved per head ([q_h, k_h, v_h] for each head h): rafale's attn.qkv layout
        # with one query head per key/value head, so it is a rename
        "gpt_neox.layers.{}.attention.query_key_value.weight": "layers.{}.attn.qkv.weight",
        "gpt_neox.layers.{}.attention.query_key_value.bias": "layers.{}.attn.qkv.bias",
        "gpt_neox.layers.{}.attention.dense.weight": "layers.{}.attn.proj.weight",
        "gpt_neox.layers.{}.attention.dense.bias": "layers.{}.attn.proj.bias",
        "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": "layers.{}.mlp.up.weight",
        "gpt_neox.layers.{}.mlp.dense_h_to_4h.bias": "layers.{}.mlp.up.bias",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": "layers.{}.mlp.down.weight",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias": "layers.{}.mlp.down.bias",
        "gpt_neox.final_layer_norm.weight": "norm.weight",
        "gpt_neox.final_layer_norm.bias": "norm.bias",
        # the name in the Pythia checkpoints, and still the one transformers 5 writes to files (tied: not written)
        "embed_out.weight": "head.weight",
    },
    # transformers 5 calls the output projection `lm_head` in memory, so a state dict saved by hand has that name
    aliases={"lm_head.weight": "head.weight"},
    ignored=(
        "gpt_neox.layers.{}.attention.rotary_emb.inv_freq",  # rotary frequencies: recomputed from rotary_emb_base
        "gpt_neox.rotary_emb.inv_freq",  # the same, where transformers 4.4x keeps one table for all layers
        "gpt_neox.layers.{}.attention.bias",  # old checkpoints' causal-mask buffer: SDPA's is_causal does its job
        "gpt_neox.layers.{}.attention.masked_bias",  # the -1e9 fill value that went with that mask
    ),
)



# config.json's hidden_act -> model.mlp: GPT-NeoX's MLP is down(act(up(x))) with any activation, and transformers'
# "relu2" is ReLU^2 (ReLUSquaredActivation), so that trick exports as GPT-NeoX; SwiGLU has no GPT-NeoX form
ACTIVATIONS = {"gelu": "gelu", "relu2": "relu2"}


def config_from_hf(hf: dict, config_path: Path) -> DecoderConfig:
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise WeightsError(f"{config_path}: hidden_act must be one of {', '.join(ACTIVATIONS)} (rafale's GPT-NeoX "
                           f"MLPs), got {act!r}")
    if hf.get("tie_word_embeddings", False):
        raise WeightsError(f"{config_path}: tie_word_embeddings must be false: GPT-NeoX checkpoints have their own "
                           "embed_out (a tied decoder is model.type: llama)")
    # rope settings moved over the years: rotary_pct / rotary_emb_base (Pythia), partial_rotary_factor /
    # rope_theta (transformers 4.5x), and in transformers 5 a `rope_parameters` dict, which is what it writes
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise WeightsError(f"{config_path}: rope type {rope_type!r} is not supported (only plain rotary, 'default')")
    rotary_pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
    rotary_base = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    cfg = DecoderConfig(
        vocab_size=require(hf, "vocab_size", config_path),
        hidden_size=require(hf, "hidden_size", config_path),
        num_layers=require(hf, "num_hidden_layers", config_path),
        num_heads=require(hf, "num_attention_heads", config_path),
        intermediate_size=require(hf, "intermediate_size", config_path),
        max_position_embeddings=require(hf, "max_position_embeddings", config_path),
        rotary_pct=float(rotary_pct),
        rotary_base=float(rotary_base),
        parallel_residual=hf.get("use_parallel_residual", True),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
        mlp=ACTIVATIONS[act],
        attention_bias=hf.get("attention_bias", True),
    )
    try:
        cfg.validate()
    except ValueError as err:
        raise WeightsError(f"{config_path}: {err}") from None
    return cfg



def config_to_hf(cfg: DecoderConfig, architecture: str = "GPTNeoXForCausalLM", vocab_size: int | None = None,
                 id2label: dict | None = None) -> dict:
    """The config.json of GPT-NeoX with `cfg`'s sizes (vocab_size: the tokenizer's, when the embedding is padded)."""
    vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
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
        # model.mlp's activation (gelu or relu2); another MLP (swiglu) is written as gelu, and the export check,
        # reading this back, refuses it by name
        "hidden_act": {mlp: act for act, mlp in ACTIVATIONS.items()}.get(cfg.mlp, "gelu"),
        "tie_word_embeddings": False,  # model.tie_embeddings: true is refused by the export check, by name
        "attention_bias": cfg.attention_bias,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }




def architecture_of(module) -> str | None:
    return ARCHITECTURE if type(module) is Decoder and module.cfg.family == "pythia" else None


PYTHIA = Family(
    name="pythia",
    config=DecoderConfig,
    presets=PRESETS,
    heads=("causal_lm",),
    build=build,
    data={"tokenizer_kind": "bpe"},
    hf=HFFormat(
        architectures={ARCHITECTURE: "causal_lm"},
        model_type="gpt_neox",
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        module=lambda cfg, head: Decoder(cfg),
        architecture_of=architecture_of,
        load=layout_loader(lambda architecture: LAYOUT),
        # the tensors with one row per token, cut to the tokenizer's vocabulary on export
        tensors=layout_tensors(lambda architecture: LAYOUT,
                               lambda architecture: ("gpt_neox.embed_in.weight", "embed_out.weight")),
        max_length=lambda cfg: cfg.max_position_embeddings,
        module_files=("rafale.models.decoder",),
    ),
    can_generate=True,
)
