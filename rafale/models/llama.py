"""The Llama family in one place (SmolLM2, Llama 3.2, and what trains like them): its presets, and its Hugging Face
format, LlamaForCausalLM (config.json both ways, and the name map of its tensors). The model is
rafale/models/decoder.py's Decoder with Llama's parts: RMSNorm, a SwiGLU MLP, grouped-query attention without biases,
rotary positions over each whole head, sequential residuals and, in the small models, a head tied to the embedding.

    model: {type: llama, preset: llama-tiny}      # a preset below, any DecoderConfig field overridden
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from rafale.errors import WeightsError
from rafale.models.decoder import DecoderConfig
from rafale.models.family import decoder_family
from rafale.models.layout import Fused, WeightLayout, require


@dataclass
class LlamaConfig(DecoderConfig):
    """DecoderConfig with Llama's parts as its defaults."""

    family: ClassVar[str] = "llama"
    rotary_pct: float = 1.0
    parallel_residual: bool = False
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: str = "swiglu"
    mlp_bias: bool = False
    attention_bias: bool = False
    tie_embeddings: bool = True


PRESETS = {
    # tiny: a test fixture and DEBUG=1's model, the size of pythia-tiny (vocab_size None: taken from the tokenizer)
    "llama-tiny": LlamaConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                              max_position_embeddings=512),
    "llama-debug": LlamaConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                               max_position_embeddings=256),
    # the sizes of HuggingFaceTB/SmolLM2-135M and meta-llama/Llama-3.2-1B (their config.json; Llama 3.2's "llama3"
    # rope scaling, which stretches rotary past 8k tokens, is not rafale's: this preset has plain rotary)
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                intermediate_size=1536, max_position_embeddings=8192, rotary_base=100000.0),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                                intermediate_size=8192, max_position_embeddings=131072, rotary_base=500000.0),
}


# ----------------------------------------------------------------------------------------------------
# The Hugging Face format: LlamaForCausalLM. rafale's attn.qkv holds q_proj, k_proj and v_proj in one matrix,
# laid out per key/value head (its group's query heads, its key, its value): joined on import, split on export.


def join_grouped_qkv(parts: list, cfg: DecoderConfig) -> torch.Tensor:
    """q (nh*hs, ...), k and v (nkv*hs, ...) -> rafale's qkv ((nh + 2 nkv)*hs, ...): per key/value head, its
    group's query rows, then its key rows, then its value rows (weights and biases alike)."""
    q, k, v = parts
    nkv, g, hs, rest = cfg.kv_heads, cfg.num_heads // cfg.kv_heads, cfg.head_size, q.shape[1:]
    q = q.reshape(nkv, g * hs, *rest)  # (nkv, g*hs, ...): query head j is in group j // g
    k, v = k.reshape(nkv, hs, *rest), v.reshape(nkv, hs, *rest)  # (nkv, hs, ...)
    return torch.cat((q, k, v), dim=1).reshape((cfg.num_heads + 2 * nkv) * hs, *rest)  # ((nh + 2 nkv)*hs, ...)


def split_grouped_qkv(qkv: torch.Tensor, cfg: DecoderConfig) -> list:
    """join_grouped_qkv undone: rafale's qkv -> [q (nh*hs, ...), k (nkv*hs, ...), v (nkv*hs, ...)]."""
    nkv, g, hs, rest = cfg.kv_heads, cfg.num_heads // cfg.kv_heads, cfg.head_size, qkv.shape[1:]
    q, k, v = qkv.reshape(nkv, (g + 2) * hs, *rest).split((g * hs, hs, hs), dim=1)  # (nkv, g*hs | hs | hs, ...)
    return [q.reshape(nkv * g * hs, *rest), k.reshape(nkv * hs, *rest), v.reshape(nkv * hs, *rest)]


def qkv_parts(kind: str) -> Fused:
    return Fused(parts=tuple(f"model.layers.{{}}.self_attn.{p}_proj.{kind}" for p in "qkv"),
                 join=join_grouped_qkv, split=split_grouped_qkv)


LAYOUT = WeightLayout(
    names={
        "model.embed_tokens.weight": "embed.weight",
        "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
        "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.proj.weight",
        "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.proj.bias",  # attention_bias: true
        "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
        "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate.weight",
        "model.layers.{}.mlp.gate_proj.bias": "layers.{}.mlp.gate.bias",  # mlp_bias: true, here and below
        "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up.weight",
        "model.layers.{}.mlp.up_proj.bias": "layers.{}.mlp.up.bias",
        "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
        "model.layers.{}.mlp.down_proj.bias": "layers.{}.mlp.down.bias",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "head.weight",  # tie_word_embeddings: the same tensor as embed_tokens, written once
    },
    fused={"layers.{}.attn.qkv.weight": qkv_parts("weight"), "layers.{}.attn.qkv.bias": qkv_parts("bias")},
    ignored=(
        "model.layers.{}.self_attn.rotary_emb.inv_freq",  # rotary frequencies: recomputed from rope_theta
        "model.rotary_emb.inv_freq",  # the same, one table for all layers
    ),
)
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
ARCHITECTURE = "LlamaForCausalLM"


def config_from_hf(hf: dict, config_path: Path, config_class: type = LlamaConfig, **fixed) -> LlamaConfig:
    """The config of a Llama-like config.json (Qwen2's and Qwen3's too: `config_class` and its `fixed` fields)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise WeightsError(f"{config_path}: hidden_act must be 'silu' (a SwiGLU MLP), got {hf['hidden_act']!r}")
    if hf.get("pretraining_tp", 1) != 1:
        raise WeightsError(f"{config_path}: pretraining_tp must be 1, got {hf['pretraining_tp']}")
    if hf.get("use_sliding_window", False):
        raise WeightsError(f"{config_path}: use_sliding_window must be false (rafale attends to every position)")
    # transformers 5 writes `rope_parameters`; transformers 4 wrote rope_theta and rope_scaling at the top level
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise WeightsError(f"{config_path}: rope type {rope_type!r} is not supported (only plain rotary, 'default')")
    heads = require(hf, "num_attention_heads", config_path)
    fields = dict(
        vocab_size=require(hf, "vocab_size", config_path),
        hidden_size=require(hf, "hidden_size", config_path),
        num_layers=require(hf, "num_hidden_layers", config_path),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        intermediate_size=require(hf, "intermediate_size", config_path),
        max_position_embeddings=require(hf, "max_position_embeddings", config_path),
        rotary_pct=1.0,
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        parallel_residual=False,
        layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        norm="rmsnorm",
        mlp="swiglu",
        mlp_bias=hf.get("mlp_bias", False),
        attention_bias=hf.get("attention_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )
    cfg = config_class(**(fields | fixed))
    try:
        cfg.validate()
    except ValueError as err:
        raise WeightsError(f"{config_path}: {err}") from None
    return cfg


def config_to_hf(cfg: DecoderConfig, architecture: str = ARCHITECTURE, vocab_size: int | None = None,
                 id2label: dict | None = None, model_type: str = "llama") -> dict:
    """The config.json of `architecture` with `cfg`'s sizes (vocab_size: the tokenizer's, when the embedding is
    padded). What Llama cannot say (a parallel residual, LayerNorm, another MLP, partial rotary, QK-norm) is not
    written: the export check reads this back and refuses each such field by name."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size if vocab_size is None else vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.layer_norm_eps,
        # both spellings: transformers 4 reads rope_theta, transformers 5 the dict
        "rope_theta": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
    }


LLAMA = decoder_family(LlamaConfig, PRESETS, architecture=ARCHITECTURE, model_type="llama", layout=LAYOUT,
                       vocab_rows=VOCAB_ROWS, config_from_hf=config_from_hf, config_to_hf=config_to_hf)
