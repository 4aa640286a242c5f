"""muP for the decoder (model.parametrization: mup; Yang, Hu et al. 2022, "Tensor Programs V", table 3 for Adam;
microsoft/mup's MuReadout and MuAdamW), with m = hidden_size / mup_base_width:

    the blocks' matrices    init init_std / sqrt(m) (std ~ 1/sqrt(fan_in)), AdamW lr / m (rafale/run/optim.py)
    embedding, head, norms  init and lr as standard
    logits                  head(norm(x)) / m
    attention scores        q.k * sqrt(base_head) / head_size, base_head the head size at mup_base_width

At m = 1 every rule is the identity: the standard model, bit for bit. A DecoderConfig (rafale/models/decoder.py)
with mup_base_width None is the standard parametrisation, and these functions return the standard values for it.

An export is the standard decoder that computes the same logits (`fold_mup`): 1/m folded into the head's weights,
the attention scale's ratio to 1/sqrt(head_size) into the queries. A tied head cannot take 1/m without changing
the input embedding: `mup_fold_refusal` says so, and the run trains without a Hugging Face export.
"""

import copy
import dataclasses
from typing import Optional

import torch


def width_mult(cfg) -> float:
    """m = hidden_size / mup_base_width; 1 under the standard parametrisation."""
    return cfg.hidden_size / cfg.mup_base_width if cfg.mup_base_width else 1.0


def hidden_init_std(cfg) -> float:
    """The init std of the blocks' matrices: init_std / sqrt(m) (init_std under SP and at m = 1)."""
    return cfg.init_std / width_mult(cfg) ** 0.5


def output_multiplier(cfg) -> float:
    """What the final norm's output is multiplied by before the head: 1/m (MuReadout's output_mult 1)."""
    return 1.0 / width_mult(cfg)


def attention_scale(cfg) -> Optional[float]:
    """The scores' scale, or None for SDPA's 1/sqrt(head_size). muP's scores scale as 1/d, anchored so that the
    base width has the standard 1/sqrt(d): sqrt(base_head) / head_size, base_head = mup_base_width / num_heads
    (the heads widen with the model), that is 1/sqrt(head_size) / sqrt(m). An explicit head_dim does not change with
    width: its scale stays 1/sqrt(head_dim) (None)."""
    if not cfg.mup_base_width or cfg.head_dim is not None or width_mult(cfg) == 1:
        return None
    return (cfg.mup_base_width / cfg.num_heads) ** 0.5 / cfg.head_size


def mup_fold_refusal(cfg) -> Optional[str]:
    """Why no standard decoder computes what this muP one does, or None."""
    if cfg.mup_base_width and cfg.tie_embeddings and width_mult(cfg) != 1:
        return ("a muP model with a tied head (model.tie_embeddings: true, model.parametrization: mup) has no Hugging "
                "Face export: its logits' 1/m multiplier cannot go into the head without changing the input embedding")
    return None


@torch.no_grad()
def fold_mup(model):
    """A standard-parametrisation copy of the muP decoder `model` that computes the same logits: the output
    multiplier goes into the head's weights and the attention scale's ratio to 1/sqrt(head_size) into the queries,
    the q rows of each key/value head's [q..., k, v] slice of qkv (weights and biases), or q_norm's weight under
    QK-norm (the norm would undo a scaled projection). Rotary turns q linearly, so scaled queries give exactly
    scaled scores. ValueError where mup_fold_refusal says no."""
    cfg = model.cfg
    if (refusal := mup_fold_refusal(cfg)) is not None:
        raise ValueError(refusal)
    scale = attention_scale(cfg)
    ratio = scale * cfg.head_size ** 0.5 if scale is not None else 1.0
    folded = copy.deepcopy(model)
    folded.cfg = dataclasses.replace(cfg, mup_base_width=None)
    folded.head.weight.mul_(output_multiplier(cfg))
    for block in folded.layers:
        attn = block.attn
        attn.scale = None
        if attn.q_norm is not None:
            attn.q_norm.weight.mul_(ratio)
            continue
        rows = attn.group * attn.head_dim  # the query rows of each key/value head's slice
        attn.qkv.weight.view(attn.num_kv_heads, -1, attn.qkv.in_features)[:, :rows].mul_(ratio)
        if attn.qkv.bias is not None:
            attn.qkv.bias.view(attn.num_kv_heads, -1)[:, :rows].mul_(ratio)
    return folded
