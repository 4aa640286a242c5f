"""The Qwen3 family in one place: its presets and its Hugging Face format, Qwen3ForCausalLM. The model is
rafale/models/decoder.py's Decoder with Llama's parts (rafale/models/llama.py, whose config.json reader, writer and
name map this family extends) and a per-head RMSNorm on the queries and keys before rotary (QK-norm), with a head
size of its own (Qwen3-0.6B: 16 heads of 128 dims on a 1024-wide residual).

    model: {type: qwen3, preset: qwen3-tiny}      # a preset below, any DecoderConfig field overridden
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rafale.models import llama
from rafale.models.family import decoder_family


@dataclass
class Qwen3Config(llama.LlamaConfig):
    """DecoderConfig with Qwen3's parts as its defaults: Llama's, and QK-norm."""

    family: ClassVar[str] = "qwen3"
    qk_norm: bool = True
    layer_norm_eps: float = 1e-6


PRESETS = {
    # tiny: a test fixture and DEBUG=1's model (vocab_size None: taken from the tokenizer)
    "qwen3-tiny": Qwen3Config(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                              max_position_embeddings=512),
    # heads wider than hidden_size / num_heads, as Qwen3's are
    "qwen3-debug": Qwen3Config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                               intermediate_size=192, max_position_embeddings=256),
    # the sizes of Qwen/Qwen3-0.6B (its config.json)
    "qwen3-0.6b": Qwen3Config(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                              head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
                              rotary_base=1000000.0),
}

ARCHITECTURE = "Qwen3ForCausalLM"

LAYOUT = dataclasses.replace(llama.LAYOUT, names=llama.LAYOUT.names | {
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
})


def config_from_hf(hf: dict, config_path: Path) -> Qwen3Config:
    # Qwen3's MLP has no biases (no mlp_bias key) and its attention always has QK-norm
    return llama.config_from_hf(hf, config_path, Qwen3Config, qk_norm=True, mlp_bias=False)


def config_to_hf(cfg, architecture: str = ARCHITECTURE, vocab_size: int | None = None,
                 id2label: dict | None = None) -> dict:
    hf = llama.config_to_hf(cfg, architecture, vocab_size, id2label, model_type="qwen3")
    del hf["mlp_bias"], hf["pretraining_tp"]  # Qwen3's config has neither; mlp_bias: true is refused by name
    return hf | {"use_sliding_window": False}


QWEN3 = decoder_family(Qwen3Config, PRESETS, architecture=ARCHITECTURE, model_type="qwen3", layout=LAYOUT,
                       vocab_rows=llama.VOCAB_ROWS, config_from_hf=config_from_hf, config_to_hf=config_to_hf)
