"""The Qwen2 family in one place (Qwen2, Qwen2.5): its presets and its Hugging Face format, Qwen2ForCausalLM. The model
is rafale/models/decoder.py's Decoder with Llama's parts (rafale/models/llama.py, whose config.json reader, writer and
name map this family extends) and biases on the query, key and value projections but not on the output's
(`qkv_bias`). Qwen2's sliding-window attention is off in its released models; a config.json that turns it on is
refused (rafale attends to every position).

    model: {type: qwen2, preset: qwen2-tiny}      # a preset below, any DecoderConfig field overridden
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rafale.models import llama
from rafale.models.family import decoder_family


@dataclass
class Qwen2Config(llama.LlamaConfig):
    """DecoderConfig with Qwen2's parts as its defaults: Llama's, biases on q, k and v, rope base 1e6."""

    family: ClassVar[str] = "qwen2"
    qkv_bias: bool = True
    rotary_base: float = 1000000.0
    layer_norm_eps: float = 1e-6


PRESETS = {
    # tiny: a test fixture and DEBUG=1's model (vocab_size None: taken from the tokenizer)
    "qwen2-tiny": Qwen2Config(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                              max_position_embeddings=512),
    "qwen2-debug": Qwen2Config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                               max_position_embeddings=256),
    # the sizes of Qwen/Qwen2.5-0.5B (its config.json)
    "qwen2.5-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                                intermediate_size=4864, max_position_embeddings=32768),
}

ARCHITECTURE = "Qwen2ForCausalLM"

# Llama's names: q_proj, k_proj and v_proj's biases are its attention_bias ones, and o_proj's is never expected (a
# template whose rafale tensor the model lacks is neither loaded nor written)
LAYOUT = llama.LAYOUT


def config_from_hf(hf: dict, config_path: Path) -> Qwen2Config:
    # Qwen2's q, k and v always have biases and its output projection and MLP never do (no attention_bias or
    # mlp_bias key); use_sliding_window: true is refused by Llama's reader
    return llama.config_from_hf(hf, config_path, Qwen2Config, attention_bias=False, qkv_bias=True, mlp_bias=False)


def config_to_hf(cfg, architecture: str = ARCHITECTURE, vocab_size: int | None = None,
                 id2label: dict | None = None) -> dict:
    hf = llama.config_to_hf(cfg, architecture, vocab_size, id2label, model_type="qwen2")
    # Qwen2's config has none of these; other values than Qwen2's (qkv_bias: false, mlp_bias: true) come back as
    # Qwen2's on reading, so the export check refuses them by name
    del hf["attention_bias"], hf["mlp_bias"], hf["pretraining_tp"]
    return hf | {"use_sliding_window": False}


QWEN2 = decoder_family(Qwen2Config, PRESETS, architecture=ARCHITECTURE, model_type="qwen2", layout=LAYOUT,
                       vocab_rows=llama.VOCAB_ROWS, config_from_hf=config_from_hf, config_to_hf=config_to_hf)
