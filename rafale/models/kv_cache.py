"""The decoder's KV cache: the keys and values of the positions decoded so far, so that each step of `generate`
computes one new position, not the whole sequence again (rafale/models/decoder.py's Attention fills and reads it).
"""

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rafale.models.decoder import DecoderConfig


class KVCache:
    """Keys and values of the positions decoded so far, for every layer, allocated once. It holds the key/value
    heads: grouped-query attention caches num_kv_heads of them, not one per query head.

    k, v: (num_layers, B, nkv, max_len, hs); `length` positions of them are filled.
    """

    def __init__(self, cfg: "DecoderConfig", batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_layers, batch_size, cfg.kv_heads, max_len, cfg.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # one (B, nkv, max_len, hs) view per layer, taken once rather than indexed again at every step
        self.layer_k = [self.k[i] for i in range(cfg.num_layers)]
        self.layer_v = [self.v[i] for i in range(cfg.num_layers)]
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nkv, T, hs) after the filled positions; return all keys and values (B, nkv, length+T, hs)."""
        start, end = self.length, self.length + k.shape[2]
        k_all, v_all = self.layer_k[layer], self.layer_v[layer]  # (B, nkv, max_len, hs)
        k_all[:, :, start:end].copy_(k)
        v_all[:, :, start:end].copy_(v)
        return k_all[:, :, :end], v_all[:, :, :end]
