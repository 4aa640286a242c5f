"""CLIP and SigLIP: an image tower and a text tower trained to agree, read top to bottom.

    image:  x = patch_embedding(pixels) (+ class token, CLIP) + positions
            for each layer (pre-LN):  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
            CLIP:    image_embed = visual_projection(post_layernorm(x[:, 0]))     (after a pre_layrnorm on x)
            SigLIP:  image_embed = head(post_layernorm(x))                        (attention pooling, "MAP")
    text:   x = token_embedding(ids) + positions;  the same layers
            CLIP:    causal attention;  text_embed = text_projection(final_layer_norm(x)[eos position])
            SigLIP:  bidirectional;     text_embed = head(final_layer_norm(x)[:, -1])
    logits_per_image = exp(logit_scale) * normalize(image_embed) @ normalize(text_embed).T  (+ logit_bias, SigLIP)

CLIP learns with a symmetric softmax cross-entropy over the batch (`clip_loss`), SigLIP with an independent
sigmoid per image-text pair (`siglip_loss`). Module names mirror the Hugging Face checkpoints (`CLIPModel`,
`SiglipModel`), including HF's `pre_layrnorm` typo, so loading real weights is the identity map that
rafale/models/contrastive.py writes out (with the presets, the builder and config.json both ways). Attention goes
through `scaled_dot_product_attention`.

This file imports torch only; transformers is a test-time reference, never imported.
"""

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# the activations HF's CLIP and SigLIP configs name (hidden_act)
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's approximation
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP's
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # the same formula under its older name
}

LOG_MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learnt temperature so exp(scale) <= 100


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # "cls": CLIP's layout (a class token, pre_layrnorm, post_layernorm on the class token, patch conv without
    # bias); "map": SigLIP's (no class token, post_layernorm on every token, attention pooling head, conv bias)
    pooling: Literal["cls", "map"] = "cls"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, where: str = "vision"):
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "layer_norm_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{where}.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )
        _check_common(self, where)
        if self.pooling not in ("cls", "map"):
            raise ValueError(f"{where}.pooling must be 'cls' or 'map', got {self.pooling!r}")


@dataclass
class TextConfig:
    vocab_size: Optional[int] = None  # None: set later from the tokenizer
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # "eos": CLIP's (causal attention, the state at the first eos_token_id is the sentence); "last": SigLIP's
    # (bidirectional attention, the state at the last position, then a linear `head` with bias)
    pooling: Literal["eos", "last"] = "eos"
    # "eos" pooling: None pools at the highest token id instead, as the original OpenAI checkpoints do (their
    # end-of-text token is the last of the vocabulary; HF marks those configs with eos_token_id 2)
    eos_token_id: Optional[int] = None

    def validate(self, where: str = "text"):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings",
                     "layer_norm_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"{where}.vocab_size must be positive, got {self.vocab_size}")
        _check_common(self, where)
        if self.pooling not in ("eos", "last"):
            raise ValueError(f"{where}.pooling must be 'eos' or 'last', got {self.pooling!r}")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < (self.vocab_size or math.inf):
            raise ValueError(f"{where}.eos_token_id must be in [0, vocab_size), got {self.eos_token_id}")


def _check_common(cfg, where: str):
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"{where}.hidden_size ({cfg.hidden_size}) must be divisible by num_heads ({cfg.num_heads})")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{where}.hidden_act must be one of {', '.join(ACTIVATIONS)}, got {cfg.hidden_act!r}")


@dataclass
class ClipConfig:
    family: Literal["clip", "siglip"] = "clip"  # picks the towers' layout, the loss and the weight names
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # the shared embedding size. CLIP projects both towers to it (no bias); SigLIP's text head maps to it and
    # its image tower has no projection, so vision.hidden_size must equal it
    projection_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP: temperature 0.07; SigLIP paper: log 10
    logit_bias_init: float = -10.0  # SigLIP only: starts every pair at "no match" (the paper's b = -10)
    init_std: float = 0.02  # CLIP's initializer_range (patch and position embeddings)

    @property
    def max_seq_len(self) -> int:
        """The longest text (what data.block_size is checked against)."""
        return self.text.max_position_embeddings

    def validate(self):
        if self.family not in ("clip", "siglip"):
            raise ValueError(f"family must be 'clip' or 'siglip', got {self.family!r}")
        self.vision.validate()
        self.text.validate()
        if self.projection_dim <= 0:
            raise ValueError(f"projection_dim must be positive, got {self.projection_dim}")
        expected = {"clip": ("cls", "eos"), "siglip": ("map", "last")}[self.family]
        if (self.vision.pooling, self.text.pooling) != expected:
            raise ValueError(
                f"family {self.family!r} needs vision.pooling {expected[0]!r} and text.pooling {expected[1]!r}, "
                f"got {self.vision.pooling!r} and {self.text.pooling!r}"
            )
        if self.family == "siglip" and self.vision.hidden_size != self.projection_dim:
            raise ValueError(
                f"siglip has no image projection: vision.hidden_size ({self.vision.hidden_size}) must equal "
                f"projection_dim ({self.projection_dim})"
            )



# ----------------------------------------------------------------------------------------------------
# The transformer shared by both towers (HF's CLIPEncoderLayer and SiglipEncoderLayer are the same)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh*hs)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.act = ACTIVATIONS[hidden_act]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        x = x + self.self_attn(self.layer_norm1(x), attn_mask, is_causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of layers; its own module so the names read `encoder.layers.{}` as in the checkpoints."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        for layer in self.layers:
            x = layer(x, attn_mask, is_causal)
        return x


# ----------------------------------------------------------------------------------------------------
# Image tower


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        has_cls = cfg.pooling == "cls"
        # a conv with stride = kernel = patch size cuts the image into patches and embeds each one linearly
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=not has_cls)
        if has_cls:
            self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_patches + has_cls, cfg.hidden_size)
        self.image_size = cfg.image_size

    def forward(self, pixel_values):
        B, _, H, W = pixel_values.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {H}x{W}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), patches in row-major order
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(B, 1, -1), x], dim=1)  # (B, 1+N, C)
        return x + self.position_embedding.weight[None]


class AttentionPoolingHead(nn.Module):
    """SigLIP's "MAP" head: one learnt query (the probe) attends over all patches, then a residual MLP.

    nn.MultiheadAttention as in HF and big_vision, so its fused in_proj_weight (3C, C) loads as is."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = self.attention(probe, x, x, need_weights=False)[0]  # (B, 1, C)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]  # (B, C)


class VisionTransformer(nn.Module):
    """pixel_values (B, 3, H, W) -> pooled image state (B, C): the class token (CLIP) or attention pooling (SigLIP)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.pooling = cfg.pooling
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.pooling == "cls":
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, HF's name
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.pooling == "map":
            self.head = AttentionPoolingHead(cfg)

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)  # (B, [1+]N, C)
        if self.pooling == "cls":
            x = self.encoder(self.pre_layrnorm(x))
            return self.post_layernorm(x[:, 0])  # (B, C)
        return self.head(self.post_layernorm(self.encoder(x)))  # (B, C)


# ----------------------------------------------------------------------------------------------------
# Text tower


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids):
        T, max_len = input_ids.shape[1], self.position_embedding.num_embeddings
        if T > max_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings ({max_len})")
        return self.token_embedding(input_ids) + self.position_embedding.weight[None, :T]  # (B, T, C)


def text_attention_mask(attention_mask, causal: bool):
    """Boolean mask (B, 1, T, T), or (B, 1, 1, T) without `causal`, from attention_mask (B, T) of 1/0: no
    query attends to a padding key, and with `causal` none to a later position. Padding must be on the right,
    so that every query keeps at least the first token (a row of False would give NaNs)."""
    T = attention_mask.shape[1]
    keys = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
    if not causal:
        return keys
    causal_mask = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()  # (T, T)
    return keys & causal_mask[None, None]


class TextTransformer(nn.Module):
    """input_ids (B, T) -> pooled text state (B, C): at the end-of-text token (CLIP) or the last position,
    through `head` (SigLIP)."""

    def __init__(self, cfg: TextConfig, projection_dim: int):
        super().__init__()
        self.pooling, self.eos_token_id = cfg.pooling, cfg.eos_token_id
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.pooling == "last":
            self.head = nn.Linear(cfg.hidden_size, projection_dim)

    def forward(self, input_ids, attention_mask=None):
        causal = self.pooling == "eos"
        # without padding the mask is implicit (SDPA may pick a fused kernel)
        attn_mask = None if attention_mask is None else text_attention_mask(attention_mask, causal)
        x = self.embeddings(input_ids)  # (B, T, C)
        x = self.encoder(x, attn_mask, is_causal=causal and attn_mask is None)
        x = self.final_layer_norm(x)
        if self.pooling == "last":
            # SigLIP was trained on text padded to a fixed length without a mask: the last position is a pad
            return self.head(x[:, -1])  # (B, P)
        return x[torch.arange(x.shape[0], device=x.device), self.eos_positions(input_ids)]  # (B, C)

    def eos_positions(self, input_ids):
        """(B,) the first end-of-text token of each row (position 0 when a row has none, as in HF)."""
        if self.eos_token_id is None:
            return input_ids.argmax(dim=-1)  # OpenAI's end-of-text is the highest id of its vocabulary
        return (input_ids == self.eos_token_id).int().argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------
# Objectives: functions of logits_per_image (images x texts, pair i is image i with text i)


def clip_loss(logits_per_image):
    """CLIP's symmetric InfoNCE: cross-entropy picking each image's text among the batch, and each text's image."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2


def siglip_loss(logits_per_image):
    """SigLIP's pairwise sigmoid loss: every (image, text) pair is a binary match / no-match decision.

    -1/|B| sum_i sum_j log sigmoid(z_ij * logit_ij), z_ij = 1 on the diagonal and -1 elsewhere (paper, Alg. 1)."""
    n = logits_per_image.shape[0]
    z = 2 * torch.eye(n, device=logits_per_image.device, dtype=logits_per_image.dtype) - 1  # (n, n)
    return -F.logsigmoid(z * logits_per_image).sum() / n


# With several processes (DDP), the loss of each rank is computed over the features of all of them, as open_clip
# does: the negatives of a step are the global batch (of a microbatch, with gradient accumulation).


def gather_features(image, text):
    """Every rank's (image, text) features, concatenated in rank order; this rank's own slice keeps its gradient
    (all_gather returns tensors without one), so each rank back-propagates the global loss into its own features."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image, text
    rank, world = dist.get_rank(), dist.get_world_size()

    def gather(x):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        parts[rank] = x
        return torch.cat(parts)  # (world * B, P)

    return gather(image), gather(text)


def contrastive_logits(model, image, text):
    """logits_per_image (images, texts) from normalised features, in fp32 (as the model's forward computes them)."""
    return model.logit_scale.exp().float() * image.float() @ text.float().t() + model.bias()


# ----------------------------------------------------------------------------------------------------
# The models


class ContrastiveModel(nn.Module):
    """What CLIP and SigLIP share: the towers, the temperature, the logits. Subclasses add the projections
    (CLIP) or the bias (SigLIP), their initialisation and their loss."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        if cfg.text.vocab_size is None:
            raise ValueError("text.vocab_size must be set before building the model")
        cfg.validate()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg.text, cfg.projection_dim)
        self.vision_model = VisionTransformer(cfg.vision)

    def forward(self, pixel_values, input_ids, attention_mask=None):
        """-> (logits_per_image (images, texts), logits_per_text (texts, images)), as HF's outputs of those names."""
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)  # (N, P)
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)  # (M, P)
        logits_per_text = self.logit_scale.exp() * (text @ image.t()) + self.bias()  # (M, N)
        return logits_per_text.t(), logits_per_text

    def bias(self):
        return 0.0

    @torch.no_grad()
    def clamp_logit_scale_(self):
        """Keep exp(logit_scale) in [1, 100]; open_clip does this after every optimizer step."""
        self.logit_scale.clamp_(0, LOG_MAX_LOGIT_SCALE)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


class CLIP(ContrastiveModel):
    def __init__(self, cfg: ClipConfig):
        super().__init__(cfg)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))  # a scalar, as in HF
        self.reset_parameters()

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values))  # (B, P)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask))  # (B, P)

    def loss(self, logits_per_image):
        return clip_loss(logits_per_image)

    @torch.no_grad()
    def reset_parameters(self):
        """OpenAI's initialisation, as HF's CLIPPreTrainedModel._init_weights writes it (but text positions at
        OpenAI's std 0.01, where HF uses 0.02)."""
        super().reset_parameters()
        cfg = self.cfg
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)
        vision_embeddings = self.vision_model.embeddings
        nn.init.normal_(vision_embeddings.class_embedding, std=cfg.vision.hidden_size ** -0.5)
        nn.init.normal_(vision_embeddings.patch_embedding.weight, std=cfg.init_std)
        nn.init.normal_(vision_embeddings.position_embedding.weight, std=cfg.init_std)
        for tower, tower_cfg in ((self.vision_model, cfg.vision), (self.text_model, cfg.text)):
            width, depth = tower_cfg.hidden_size, tower_cfg.num_layers
            residual_std = width ** -0.5 * (2 * depth) ** -0.5  # projections into the residual, scaled by depth
            for layer in tower.encoder.layers:
                for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    nn.init.normal_(linear.weight, std=residual_std)
                nn.init.normal_(layer.self_attn.out_proj.weight, std=width ** -0.5)
                nn.init.normal_(layer.mlp.fc1.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(layer.mlp.fc2.weight, std=residual_std)
                for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                               layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2):
                    nn.init.zeros_(linear.bias)
        nn.init.normal_(self.visual_projection.weight, std=cfg.vision.hidden_size ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=cfg.text.hidden_size ** -0.5)
        self.logit_scale.fill_(cfg.logit_scale_init)


class SigLIP(ContrastiveModel):
    def __init__(self, cfg: ClipConfig):
        super().__init__(cfg)
        self.logit_scale = nn.Parameter(torch.tensor([cfg.logit_scale_init]))  # shape (1,), as in HF
        self.logit_bias = nn.Parameter(torch.tensor([cfg.logit_bias_init]))
        self.reset_parameters()

    def get_image_features(self, pixel_values):
        return self.vision_model(pixel_values)  # (B, P): the attention-pooling head is the projection

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_model(input_ids, attention_mask)  # (B, P): through the text head

    def bias(self):
        return self.logit_bias

    def loss(self, logits_per_image):
        return siglip_loss(logits_per_image)

    @torch.no_grad()
    def reset_parameters(self):
        """big_vision's initialisation as HF's SiglipPreTrainedModel._init_weights writes it, except the
        temperature and bias: HF zeroes both, rafale starts from the paper's t' = log 10, b = -10."""
        super().reset_parameters()
        for module in self.modules():
            if isinstance(module, Attention):
                for linear in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.zeros_(linear.bias)
            elif isinstance(module, MLP):
                for linear in (module.fc1, module.fc2):
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.normal_(linear.bias, std=1e-6)
            elif isinstance(module, AttentionPoolingHead):
                nn.init.xavier_uniform_(module.probe)
                nn.init.xavier_uniform_(module.attention.in_proj_weight)
                nn.init.zeros_(module.attention.in_proj_bias)
                lecun_normal_(module.attention.out_proj.weight)
                nn.init.zeros_(module.attention.out_proj.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=module.embedding_dim ** -0.5)
        for linear in (self.vision_model.embeddings.patch_embedding, self.text_model.head):
            lecun_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.logit_scale.fill_(self.cfg.logit_scale_init)
        self.logit_bias.fill_(self.cfg.logit_bias_init)


def lecun_normal_(weight):
    """Truncated normal with variance 1 / fan_in (flax's lecun_normal)."""
    fan_in = weight[0].numel()  # (out, in, ...) -> in * kernel
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # the std of a unit normal truncated to [-2, 2]
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


MODEL_CLASSES = {"clip": CLIP, "siglip": SigLIP}


def build_model(cfg: ClipConfig) -> ContrastiveModel:
    return MODEL_CLASSES[cfg.family](cfg)


# ----------------------------------------------------------------------------------------------------
# Zero-shot classification: each class is the mean of its prompts' embeddings. The prompts arrive tokenized and
# the pixels normalised (rafale/data/image_text.py); the Composer wrapper and `rafale zero-shot` share these.


@torch.no_grad()
def class_embeddings(model, input_ids, attention_mask, num_templates: int):
    """One unit vector per class from its prompts (class-major, num_templates each): the mean of their normalised
    text features, normalised (CLIP's recipe)."""
    text = F.normalize(model.get_text_features(input_ids, attention_mask).float(), dim=-1)  # (C*K, P)
    text = text.view(-1, num_templates, text.shape[-1]).mean(dim=1)  # (C, P)
    return F.normalize(text, dim=-1)


@torch.no_grad()
def zero_shot_probabilities(model, pixel_values, classes):
    """(N, C) probabilities of each class (a softmax over the model's logits; SigLIP's bias is left out, as it
    changes no ranking)."""
    image = F.normalize(model.get_image_features(pixel_values).float(), dim=-1)  # (N, P)
    return (model.logit_scale.exp().float() * image @ classes.t()).softmax(dim=-1)  # (N, C)
