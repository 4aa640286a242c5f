"""The decoder, built from parts, read top to bottom.

    x = embed(ids)
    for each block:  x = x + attn(attn_norm(x)) + mlp(mlp_norm(x))     (parallel residual: GPT-NeoX, Pythia)
                 or  x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x))   (sequential: Llama, Qwen, GPT-2)
    logits = head(norm(x))                      (head tied to embed or its own; soft-capped if asked)

Every part is chosen by one field of `DecoderConfig`: the norm (`NORMS`: LayerNorm, RMSNorm), the MLP (`MLPS`:
GELU as GPT-NeoX, SwiGLU as Llama and Qwen, ReLU^2 as modded-nanogpt), how positions enter attention
(`POSITIONS`: rotary with its base and the fraction of each head it turns, or a scheme of your own), the attention's
key/value heads (`num_kv_heads`: multi-head, grouped-query, multi-query), its biases (all, or Qwen2's on q, k and v
only) and Qwen3's per-head QK-norm, the residual (parallel or sequential), a tied or untied head, zero-initialised
output projections and a logit soft-cap. GPT-NeoX (rafale/models/pythia.py), Llama (llama.py), Qwen2 (qwen2.py) and
Qwen3 (qwen3.py) are this one decoder with other fields; `DecoderConfig`'s defaults are GPT-NeoX's. The modules'
names are rafale's own (`attn.qkv`, `mlp.up`); each family's Hugging Face tensor names are in its file's
`WeightLayout`.

What depends on the parts is computed by the parts: each reports its matmul FLOPs per token (`flops`), and the
model's `flops_per_token` is their sum.

Attention goes through `scaled_dot_product_attention` (flash / memory-efficient kernels on a GPU). `generate`
decodes greedily or samples, with a `KVCache` that holds the key/value heads (not the query heads). A position
part may change the queries and keys (`rotate`) and the scores' mask and bias (`mask`); it reads where the forward
pass stands from a `Span` (the cached length from the KV cache, the new tokens' positions, the padding). A new
scheme is a subclass of `Positions` and one line in `POSITIONS` (README, "A new attention or position scheme";
ALiBi is the worked example); a new MLP or norm is one class and one line in `MLPS` or `NORMS`.

The module imports torch only; its Composer wrapper, `ComposerLM`, is in rafale/models/composer.py.
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rafale.errors import IGNORE_INDEX
from rafale.models.chunked_loss import chunked_cross_entropy
from rafale.models.decoding import DecodingLinears


@dataclass
class DecoderConfig:
    """The decoder's sizes and parts. The defaults are GPT-NeoX's (Pythia); a family with other defaults subclasses
    it (rafale/models/llama.py's LlamaConfig) and says so in `family`, which picks the Hugging Face format an export
    is written in."""

    family: ClassVar[str] = "pythia"  # the FAMILIES entry whose Hugging Face format describes this config
    vocab_size: Optional[int] = None  # None: the tokenizer's size rounded up to a multiple of 64
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: Optional[int] = None  # key/value heads, each shared by num_heads // num_kv_heads query heads
    # (grouped-query attention; 1: multi-query); None: num_heads (multi-head)
    head_dim: Optional[int] = None  # dims per head; None: hidden_size // num_heads (Qwen3 sets its own)
    intermediate_size: int = 2048
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embeddings
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    layer_norm_eps: float = 1e-5  # the epsilon of every norm (LayerNorm's or RMSNorm's)
    init_std: float = 0.02
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # a key of NORMS (GPT-NeoX has no rmsnorm; Llama no layernorm)
    positions: str = "rotary"  # how positions enter attention: a key of POSITIONS (only rotary exports to HF)
    mlp: str = "gelu"  # a key of MLPS: gelu (GPT-NeoX), swiglu (Llama, Qwen), relu2 (modded-nanogpt; no HF export)
    mlp_bias: bool = True  # biases in the MLP's projections
    attention_bias: bool = True  # biases in the attention's projections (q, k, v and the output)
    qkv_bias: bool = False  # biases in q, k and v only, not the output (Qwen2); attention_bias has them all
    qk_norm: bool = False  # RMSNorm over each head of q and k before the positions (Qwen3, modded-nanogpt)
    tie_embeddings: bool = False  # the output head is the input embedding (SmolLM2, Llama 3.2 1B, Qwen3 0.6B)
    zero_init_proj: bool = False  # start each block's output projections (attention's and the MLP's) at zero, so
    # every block starts as the identity (modded-nanogpt); training-only: the export carries the weights
    logit_softcap: Optional[float] = None  # logits = cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); None: off

    def __post_init__(self):
        # one spelling per model: a value equal to what None means is None (the export's round trip compares fields)
        if self.num_kv_heads is not None and self.num_kv_heads == self.num_heads:
            self.num_kv_heads = None
        if (self.head_dim is not None and self.num_heads > 0 and self.hidden_size % self.num_heads == 0
                and self.head_dim == self.hidden_size // self.num_heads):
            self.head_dim = None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        """Dims per head: head_dim, or hidden_size // num_heads."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.rotary_pct)

    def validate(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("vocab_size", "num_kv_heads", "head_dim", "logit_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}), "
                             "or head_dim set")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.attention_bias and self.qkv_bias:
            raise ValueError("qkv_bias: true says again what attention_bias: true does (biases on q, k, v and the "
                             "output); set one of them false")
        if not 0 <= self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_pct * head_dim must be even, got {self.rotary_dim}")
        for name, registry in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in registry:
                raise ValueError(f"{name} must be one of {', '.join(registry)}, got {getattr(self, name)!r}")


def linear_flops(*linears: nn.Linear) -> int:
    """Matmul FLOPs per token of a forward pass through these projections: 2 per multiply-add."""
    return sum(2 * m.in_features * m.out_features for m in linears)


# ----------------------------------------------------------------------------------------------------
# Norms: model.norm -> the class, built as cls(dims, eps=...)

# RMSNorm: x / sqrt(mean(x^2) + eps) * weight, without LayerNorm's centring and bias (Zhang & Sennrich 2019)
NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def make_norm(cfg: DecoderConfig, dims: Optional[int] = None) -> nn.Module:
    return NORMS[cfg.norm](dims or cfg.hidden_size, eps=cfg.layer_norm_eps)


class KVCache:
    """Keys and values of the positions decoded so far, for every layer, allocated once. It holds the key/value
    heads: grouped-query attention caches num_kv_heads of them, not one per query head.

    k, v: (num_layers, B, nkv, max_len, hs); `length` positions of them are filled.
    """

    def __init__(self, cfg: DecoderConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
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


@dataclass
class Span:
    """Where one forward pass stands, for the position part: `past` positions already in the KV cache (the cache's
    own count), `T` new ones, the new tokens' position ids (B, T) and which of the past+T keys are real tokens
    (B, past+T) (both None without padding), the dtype the model computes its tables in and its device. What a
    part derives from it (the rotary rows, the mask) goes in `memo`: the first layer computes it, the others read it."""

    past: int
    T: int
    position_ids: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None
    dtype: torch.dtype = torch.float32
    device: Optional[torch.device] = None
    memo: dict = field(default_factory=dict)


def attention_mask_for(attention_mask, past: int, T: int):
    """Boolean mask (B, 1, T, past+T): causal, and no attention to padding keys.

    attention_mask: (B, past+T), 1 for real tokens, 0 for padding. A padded query still sees itself, so
    no row is all False (which would give NaNs); its output is ignored anyway.
    """
    S = past + T
    device = attention_mask.device
    q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    mask = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return mask | (k_pos == q_pos)[None, None]


def allowed_keys(span: Span) -> torch.Tensor:
    """(1 or B, 1, T, past+T) bool: which keys each new token may attend to (causal, and real tokens only)."""
    keys = span.key_mask
    if keys is None:
        keys = torch.ones(1, span.past + span.T, dtype=torch.bool, device=span.device)
    return attention_mask_for(keys, span.past, span.T)


def key_positions(span: Span) -> torch.Tensor:
    """(1 or B, past+T) the position of every key: 0, 1, 2, ... counted over real tokens only (left padding)."""
    if span.key_mask is None:
        return torch.arange(span.past + span.T, device=span.device)[None]
    return (span.key_mask.long().cumsum(-1) - 1).clamp(min=0)


class Positions(nn.Module):
    """How positions enter attention, for a decoder with no positions of its own (NoPE): this base class leaves
    queries and keys as they are and masks causally and padding keys. A scheme overrides `rotate` (positions in q
    and k, as rotary does) or `mask` (positions in the scores, as ALiBi does), or both."""

    def __init__(self, cfg: "DecoderConfig"):
        super().__init__()

    def rotate(self, q, k, span: Span):
        """q, k (B, nh, T, hs) with positions applied."""
        return q, k

    def mask(self, span: Span, dtype: torch.dtype) -> tuple[Optional[torch.Tensor], bool]:
        """(attn_mask, is_causal) for scaled_dot_product_attention, the same for every layer (kept in span.memo).
        Without padding the mask is implicit: causal over the new tokens when nothing is cached (SDPA may then use
        flash attention), and none at all for one new token after a cache, which sees every key."""
        if "mask" not in span.memo:
            if span.key_mask is None and (span.past == 0 or span.T == 1):
                span.memo["mask"] = (None, span.past == 0 and span.T > 1)
            else:
                span.memo["mask"] = (allowed_keys(span), False)
        return span.memo["mask"]


class Rotary(Positions):
    """Rotary position embeddings (the GPT-NeoX, non-interleaved layout) on the first rotary_dim dims of each head.

    cos and sin are computed once in fp32, as GPT-NeoX computes them, for every position below max_len, so a forward
    (and each decoding step) only indexes them.
    """

    def __init__(self, cfg: "DecoderConfig"):
        super().__init__(cfg)
        self.rotary_dim = cfg.rotary_dim
        dim, base, max_len = cfg.rotary_dim, cfg.rotary_base, cfg.max_position_embeddings
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (max_len, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # position_ids: (B, T) -> cos, sin: (B, 1, T, dim)
        return self.cos_table[position_ids][:, None].to(dtype), self.sin_table[position_ids][:, None].to(dtype)

    def span(self, start: int, T: int, dtype: torch.dtype):
        """cos, sin (1, 1, T, dim) of positions start, ..., start+T-1 (no padding): a slice, no gather."""
        cos, sin = self.cos_table[start : start + T], self.sin_table[start : start + T]  # (T, dim)
        return cos[None, None].to(dtype), sin[None, None].to(dtype)

    def rotate(self, q, k, span: Span):
        if "cos_sin" not in span.memo:
            span.memo["cos_sin"] = (self.span(span.past, span.T, span.dtype) if span.position_ids is None
                                    else self(span.position_ids, span.dtype))
        cos, sin = span.memo["cos_sin"]
        return apply_rotary(q, cos, sin, self.rotary_dim), apply_rotary(k, cos, sin, self.rotary_dim)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin, rotary_dim: int):
    # x: (B, nh, T, hs); only the first rotary_dim dims of each head rotate
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# model.positions -> the part; a new scheme is one subclass of Positions and one line here
POSITIONS = {
    "rotary": Rotary,
}


class Attention(nn.Module):
    """Causal self-attention with num_kv_heads key/value heads, each shared by a group of num_heads // num_kv_heads
    query heads (as many as the query heads: multi-head; one: multi-query). q, k and v come from one projection,
    laid out per key/value head: [the group's query heads, its key, its value] for each (with one query head per
    group this is GPT-NeoX's own fused layout). Optional: biases (cfg.attention_bias; on q, k and v alone, as
    Qwen2's: cfg.qkv_bias) and Qwen3's QK-norm, an RMSNorm over each head of q and k before the positions."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_size
        self.group = cfg.num_heads // cfg.kv_heads  # query heads per key/value head
        self.qkv = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_size,
                             bias=cfg.attention_bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.num_heads * cfg.head_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = nn.RMSNorm(cfg.head_size, eps=cfg.layer_norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_size, eps=cfg.layer_norm_eps) if cfg.qk_norm else None

    def forward(self, x, positions: Positions, span: Span, kv_cache: Optional[KVCache] = None, layer: int = 0):
        B, T, _ = x.shape
        nh, nkv, hs, g = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        qkv = self.qkv(x).view(B, T, nkv, (g + 2) * hs)  # (B, T, nkv, (g+2)*hs)
        q, k, v = qkv.split((g * hs, hs, hs), dim=-1)  # (B, T, nkv, g*hs), (B, T, nkv, hs), (B, T, nkv, hs)
        q = q.reshape(B, T, nh, hs)  # (B, T, nh, hs): query head j belongs to key/value head j // g
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over each head's hs dims
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs) x2
        q, k = positions.rotate(q, k, span)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, past+T, hs)
        attn_mask, is_causal = positions.mask(span, q.dtype)  # (B or 1, 1 or nh, T, past+T), or implicit
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=g > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh*hs)
        return self.proj(y)

    def flops(self, seq_len: int) -> int:
        """Per token: the projections, and the scores and weighted values of each query head over seq_len keys (PaLM's
        count, not halved for the causal mask: see Decoder.flops_per_token)."""
        return linear_flops(self.qkv, self.proj) + 2 * 2 * seq_len * self.num_heads * self.head_dim


class MLP(nn.Module):
    """down(act(up(x))) with GELU (the exact, erf form: GPT-NeoX's "gelu")."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def act(self, x):
        return F.gelu(x)

    def forward(self, x):
        return self.down(self.act(self.up(x)))

    def flops(self, seq_len: int) -> int:
        return linear_flops(self.up, self.down)


class ReLU2(MLP):
    """down(relu(up(x))^2) (So et al. 2021, Primer; modded-nanogpt's MLP)."""

    def act(self, x):
        return F.relu(x).square()


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020; Llama's and Qwen's MLP, HF hidden_act "silu")."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def flops(self, seq_len: int) -> int:
        return linear_flops(self.gate, self.up, self.down)


# model.mlp -> the part; a new MLP is one class (with .down, its output projection, and flops) and one line here
MLPS = {
    "gelu": MLP,
    "swiglu": SwiGLU,
    "relu2": ReLU2,
}


class Block(nn.Module):
    """One layer: attention and the MLP, each after its norm, added to the residual in parallel or in sequence."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(self, x, positions: Positions, span: Span, kv_cache=None, layer=0):
        attn = self.attn(self.attn_norm(x), positions, span, kv_cache, layer)
        if self.parallel_residual:
            return x + attn + self.mlp(self.mlp_norm(x))  # x + attn(ln1(x)) + mlp(ln2(x))
        x = x + attn
        return x + self.mlp(self.mlp_norm(x))

    def flops(self, seq_len: int) -> int:
        return self.attn.flops(seq_len) + self.mlp.flops(seq_len)


def pick_next_token(logits, temperature: float = 0.0, top_k=None, top_p=None, generator=None):
    """The next token of each row from logits (B, V): the argmax, or a sample from the tempered, top-k and
    top-p (nucleus) filtered distribution."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p (the most likely token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Decoder(nn.Module):
    """The decoder. forward(input_ids) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("vocab_size must be set before building the model")
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.positions = POSITIONS[cfg.positions](cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight  # one Parameter under both names
        self.activation_checkpointing = False  # training.activation_checkpointing; see forward
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """HF's init from a config (GPTNeoXForCausalLM's, LlamaForCausalLM's, Qwen3ForCausalLM's): N(0, init_std) for
        every Linear and Embedding weight, zero biases, norm weights 1 and biases 0. There is no depth scaling of the
        output projections (GPT-2's 1/sqrt(2 * num_layers)), since HF has none; EleutherAI's own GPT-NeoX library,
        which trained Pythia, used other schemes again (small_init / wang_init), which neither HF nor rafale
        reproduce. cfg.zero_init_proj starts each block's output projections at zero instead (modded-nanogpt)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(m.weight)
            if isinstance(m, nn.LayerNorm):
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_proj:
            for block in self.layers:
                nn.init.zeros_(block.attn.proj.weight)
                nn.init.zeros_(block.mlp.down.weight)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache: Optional[KVCache] = None,
                labels=None, vocab_size: Optional[int] = None, last_only: bool = False):
        """input_ids: (B, T). attention_mask: (B, past+T) of 1/0, past counting the cached positions.

        position_ids default to 0, 1, 2, ... counted over real tokens only (so left padding works).
        labels (B, T): return the mean cross-entropy against them instead of the logits, computed in chunks so
        the (B, T, vocab) logits never exist at once (`chunked_cross_entropy`); vocab_size, the tokenizer's true
        vocabulary when the embedding is padded, keeps the padding rows out of the softmax. The loss is computed
        here rather than by the caller so that a sharded (FSDP) head is still gathered when it is used.
        last_only: return the logits of the last position only, (B, 1, vocab_size), which is all generation
        needs; the final norm and the vocabulary-sized projection then skip the other positions.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than max_position_embeddings ({self.cfg.max_position_embeddings})"
            )
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        key_mask = attention_mask.bool() if attention_mask is not None else None  # (B, past+T)
        span = Span(past, T, position_ids, key_mask, self.embed.weight.dtype, input_ids.device)

        x = self.embed(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only each block's input; the backward pass recomputes the rest (less memory, ~1/3 more compute)
                x = checkpoint(layer, x, self.positions, span, None, i, use_reentrant=False)
            else:
                x = layer(x, self.positions, span, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm(x)
        if labels is not None:
            return chunked_cross_entropy(x.flatten(0, 1), self.head.weight[:vocab_size], labels.flatten(),
                                         softcap=self.cfg.logit_softcap)
        return softcap(self.head(x), self.cfg.logit_softcap)  # (B, T or 1, vocab_size)

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        attention_mask=None,
        eos_token_id=None,
        use_cache: bool = True,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        on_token=None,
    ):
        """Greedy decoding (temperature 0), or sampling with temperature / top-k / top-p.

        input_ids: (B, T), left-padded (with attention_mask) when the prompts differ in length. Returns
        (B, T + new); once a row has produced eos_token_id it repeats it, and decoding stops when all have.
        on_token(next_tokens (B,)) is called after each step, for streaming.
        """
        B, T = input_ids.shape
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the implicit causal mask is cheaper
        # inference mode skips autograd's bookkeeping (version counters, view tracking) on every op; the ids
        # returned are cloned outside it, so that they can be used like any tensor afterwards
        with torch.inference_mode():
            if input_ids.device.type != "cpu":
                tokens = self._decode(input_ids, max_new_tokens, attention_mask, eos_token_id, use_cache,
                                      temperature, top_k, top_p, generator, on_token)
            else:  # a CPU multiplies the few rows of each step its own fastest way (rafale/models/decoding.py)
                with DecodingLinears(self, rows=B, steps=max_new_tokens):
                    tokens = self._decode(input_ids, max_new_tokens, attention_mask, eos_token_id, use_cache,
                                          temperature, top_k, top_p, generator, on_token)
        return tokens.clone()

    def _decode(self, input_ids, max_new_tokens, attention_mask, eos_token_id, use_cache, temperature, top_k, top_p,
                generator, on_token):
        """generate's loop; input_ids (B, T) -> (B, T + new), an inference tensor."""
        B, T = input_ids.shape
        positions = None
        if attention_mask is not None:
            # the mask and positions of all steps, built once: every new token is a real one
            attention_mask = F.pad(attention_mask, (0, max_new_tokens), value=1)  # (B, T + new)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T + new)
        cache = None
        if use_cache:
            param = next(self.parameters())
            cache = KVCache(self.cfg, B, T + max_new_tokens, param.device, param.dtype)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens = torch.cat([input_ids, input_ids.new_zeros(B, max_new_tokens)], dim=1)  # (B, T + new), filled below
        start, length = 0, T  # this step feeds tokens[:, start:length]: the prompt, then one token (or all)
        for _ in range(max_new_tokens):
            mask = None if attention_mask is None else attention_mask[:, :length]
            pos = None if positions is None else positions[:, start:length]
            logits = self(tokens[:, start:length], mask, pos, cache, last_only=True)[:, -1]  # (B, V)
            next_token = pick_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                next_token = torch.where(done, eos_token_id, next_token)
                done |= next_token == eos_token_id
            tokens[:, length] = next_token
            start = length if use_cache else 0
            length += 1
            if on_token is not None:
                on_token(next_token)
            if eos_token_id is not None and done.all():
                break
        return tokens[:, :length]

    @torch.no_grad()
    def shrink_vocab(self, vocab_size: int) -> "Decoder":
        """Keep the first vocab_size rows of the embedding and the head: training pads the vocabulary to a multiple
        of 64, inference wants the tokenizer's own (so padding rows can never be sampled)."""
        if vocab_size < self.cfg.vocab_size:
            self.embed.weight = nn.Parameter(self.embed.weight[:vocab_size].clone())
            self.head.weight = (self.embed.weight if self.cfg.tie_embeddings
                                else nn.Parameter(self.head.weight[:vocab_size].clone()))
            self.embed.num_embeddings = self.head.out_features = self.cfg.vocab_size = vocab_size
        return self

    def output_head(self) -> nn.Linear:
        """The projection onto the vocabulary (rafale.record.non_embedding_parameters leaves it out of N)."""
        return self.head

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (a tied head once); non_embedding leaves out the input embedding but counts the output
        projection, so a tied one stays in."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding and not self.cfg.tie_embeddings else n

    def flops_per_token(self, seq_len: int, vocab_size: Optional[int] = None) -> int:
        """Matmul FLOPs per token of a training step at sequence length seq_len, summed over the parts (each block's
        `flops`, the head's): 3x the forward's (the backward multiplies twice as much), 2 FLOPs per multiply-add.
        The embedding is a lookup; biases, norms, the soft-cap and the softmax are not matmuls (a few percent more
        work, uncounted).

        The head counts the rows the training loss multiplies: vocab_size, the tokenizer's vocabulary, where the
        embedding is padded (forward(labels=..., vocab_size=...) hands chunked_cross_entropy head.weight[:vocab_size]);
        None, all of cfg.vocab_size, which is what the logits path (evaluation, generation) multiplies.

        The attention term is PaLM's (appendix B: 6N + 12 L T C) and is not halved for the causal mask: it is the
        convention published MFUs use, bench/ divides rafale's and HF's times by this same count, and the CPU's
        attention kernels do not all skip the masked half either."""
        rows = min(vocab_size, self.cfg.vocab_size) if vocab_size is not None else self.cfg.vocab_size
        head = 2 * self.cfg.hidden_size * rows  # linear_flops(self.head) with the rows the loss uses
        return 3 * (sum(block.flops(seq_len) for block in self.layers) + head)


GPTNeoX = Decoder  # its name when it was GPT-NeoX only; GPT-NeoX is now DecoderConfig's defaults


def softcap(logits, cap: Optional[float]):
    """cap * tanh(logits / cap): logits kept within (-cap, cap) (Gemma 2; modded-nanogpt's 30 or 15)."""
    return logits if cap is None else cap * torch.tanh(logits / cap)
