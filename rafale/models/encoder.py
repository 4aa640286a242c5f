"""BERT and RoBERTa: bidirectional encoders, read top to bottom.

    x = LayerNorm(word(ids) + token_type(types) + position(pos))
    for each layer (post-LN):  x = LayerNorm(x + attn(x))
                               x = LayerNorm(x + mlp(x))
    masked LM:       logits = decoder(LayerNorm(gelu(dense(x))))       decoder weight = word embeddings
    classification:  BERT     classifier(tanh(dense(x[:, 0])))         (the "pooler", then a Linear)
                     RoBERTa  out_proj(tanh(dense(x[:, 0])))

RoBERTa is BERT with other embeddings: position ids count the real tokens starting at padding_idx + 1 (fairseq's
convention, kept by the checkpoints), and there is a single token type. Its sizes differ too (pad id 1,
layer_norm_eps 1e-5), but those are config values. So `RobertaModel` only swaps the embeddings class; the heads
differ because the checkpoints lay them out differently.

Module names mirror the Hugging Face checkpoints (`bert.encoder.layer.0.attention.self.query`,
`lm_head.layer_norm`, ...), so loading real weights is an identity: `model.load_state_dict(hf.state_dict())`.
Attention goes through `scaled_dot_product_attention` with a padding mask.

The module imports torch only; its Composer wrappers, `ComposerMLM` and `ComposerClassifier`, are in
rafale/models/composer.py.
"""

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class EncoderConfig:
    family: Literal["bert", "roberta"] = "bert"  # picks the embeddings and the head layout
    vocab_size: Optional[int] = None  # None: set later from the tokenizer
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512  # rows of the position table; see max_seq_len for usable tokens
    type_vocab_size: int = 2  # segments A/B for BERT; RoBERTa has a single type
    layer_norm_eps: float = 1e-12  # BERT; RoBERTa uses 1e-5
    hidden_dropout: float = 0.1  # embeddings, residual branches and (by default) the classifier
    attention_dropout: float = 0.1  # on the attention probabilities, in training only
    pad_token_id: int = 0  # BERT 0, RoBERTa 1; RoBERTa also derives position ids from it
    position_offset: int = 0  # first position id of a real token: 0 for BERT, pad_token_id + 1 for RoBERTa
    num_labels: int = 2  # classification head outputs
    classifier_dropout: Optional[float] = None  # None: hidden_dropout, as in HF
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_seq_len(self) -> int:
        """Longest input: RoBERTa's first position_offset rows are never used by a real token."""
        return self.max_position_embeddings - self.position_offset

    def validate(self):
        if self.family not in ("bert", "roberta"):
            raise ValueError(f"family must be 'bert' or 'roberta', got {self.family!r}")
        for name in (
            "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings",
            "type_vocab_size", "num_labels", "layer_norm_eps", "init_std",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            p = getattr(self, name)
            if p is not None and not 0 <= p < 1:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.pad_token_id < 0 or (self.vocab_size is not None and self.pad_token_id >= self.vocab_size):
            raise ValueError(f"pad_token_id must be in [0, vocab_size), got {self.pad_token_id}")
        # position_offset is implied by the family; it is a field so max_seq_len reads it from one place
        expected_offset = self.pad_token_id + 1 if self.family == "roberta" else 0
        if self.position_offset != expected_offset:
            raise ValueError(
                f"position_offset must be {expected_offset} for family {self.family!r} "
                f"(pad_token_id {self.pad_token_id}), got {self.position_offset}"
            )
        if self.max_seq_len <= 0:
            raise ValueError(
                f"max_position_embeddings ({self.max_position_embeddings}) must exceed position_offset "
                f"({self.position_offset})"
            )


def create_position_ids_from_input_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa's position ids (B, T): real tokens count up from padding_idx + 1, pads get padding_idx.

    [[5, 6, 7, pad, pad]] -> [[pad+1, pad+2, pad+3, pad, pad]]. Taken from the ids, not the attention mask,
    exactly as HF's function of the same name (fairseq's `make_positions`).
    """
    is_real = input_ids.ne(padding_idx).long()  # (B, T)
    return torch.cumsum(is_real, dim=1) * is_real + padding_idx


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        # padding_idx: the pad row starts at zero and gets no gradient from the lookup, as in HF
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def position_ids(self, input_ids):
        # (1, T): absolute positions 0..T-1 whatever the padding; pads are masked out of attention instead
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]

    def forward(self, input_ids, token_type_ids=None):
        T = input_ids.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len ({self.max_seq_len})")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # every token in segment A
        # summed in HF's order so fp32 results match it to the last bits
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        x = x + self.position_embeddings(self.position_ids(input_ids))
        return self.dropout(self.LayerNorm(x))


class RobertaEmbeddings(BertEmbeddings):
    """BERT's embeddings with fairseq position ids (see create_position_ids_from_input_ids)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.padding_idx = cfg.pad_token_id
        # pads sit at position padding_idx, so that row is a padding row too (zeroed at init, no gradient), as in HF
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, padding_idx=cfg.pad_token_id)

    def position_ids(self, input_ids):
        return create_position_ids_from_input_ids(input_ids, self.padding_idx)  # (B, T)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        # separate projections (not one fused Linear) because that is how the checkpoints store them
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, attn_mask=None):
        B, T, C = x.shape

        def split_heads(t):
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)

        q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
        dropout_p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh*hs)


class ResidualOutput(nn.Module):
    """Post-LN residual: LayerNorm(residual + dropout(dense(h))). The checkpoints use it twice per layer, after
    attention (`attention.output`, C -> C) and after the MLP (`output`, intermediate -> C)."""

    def __init__(self, in_features: int, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(cfg)  # `attention.self.query` in the checkpoints
        self.output = ResidualOutput(cfg.hidden_size, cfg)

    def forward(self, x, attn_mask=None):
        return self.output(self.self(x, attn_mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU: HF's "gelu"


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = ResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x, attn_mask=None):
        x = self.attention(x, attn_mask)  # LayerNorm(x + attn(x))
        return self.output(self.intermediate(x), x)  # LayerNorm(x + mlp(x))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))  # `encoder.layer.{i}`
        self.activation_checkpointing = False  # training.activation_checkpointing

    def forward(self, x, attn_mask=None):
        for layer in self.layer:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only each block's input; the backward pass recomputes the rest (less memory, ~1/3 more compute)
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return x


class Pooler(nn.Module):
    """dense + tanh on the first token ([CLS]): BERT's sentence vector, trained by next-sentence prediction."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))  # (B, T, C) -> (B, C)


def padding_mask(attention_mask):
    """Boolean SDPA mask (B, 1, 1, S) from attention_mask (B, S) of 1/0: every query sees every real key.

    Padded queries still see the real keys, so no row is all False; their outputs are ignored anyway.
    """
    return attention_mask[:, None, None, :].bool()


class EncoderModule(nn.Module):
    """What every model below shares: the config, HF's initialisation, the parameter count and the FLOPs count
    (each head adds its own, `head_macs_per_token`)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("vocab_size must be set before building the model")
        cfg.validate()
        self.cfg = cfg

    @torch.no_grad()
    def reset_parameters(self):
        # HF's _init_weights: N(0, init_std) for Linear and Embedding weights, zero biases, LayerNorm 1/0
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # a second pass: a tied MLM decoder, visited after the word embeddings, would refill their pad row
        for m in self.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, tied ones once. non_embedding leaves out the embedding tables, which are lookups, except
        one that is also the MLM decoder, which is a (C x V) matmul per token."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            matmul_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
            n -= sum(
                m.weight.numel()
                for m in self.modules()
                if isinstance(m, nn.Embedding) and id(m.weight) not in matmul_weights
            )
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs per token of a training step at sequence length seq_len: 3x the forward's (the backward
        multiplies twice as much), 2 FLOPs per multiply-add. Per layer: query, key, value (3 C^2 multiply-adds),
        attention scores and values over all T positions (2 T C: bidirectional, nothing masked), the attention's
        output dense (C^2), the MLP (2 C I); then the head's (`head_macs_per_token`). The embeddings are lookups;
        biases, norms and the softmax are not matmuls (a few percent more work, uncounted)."""
        c = self.cfg
        C, T = c.hidden_size, seq_len
        per_layer = 3 * C * C + 2 * T * C + C * C + 2 * C * c.intermediate_size
        return 6 * (c.num_layers * per_layer + self.head_macs_per_token(seq_len))

    def head_macs_per_token(self, seq_len: int) -> float:
        """Multiply-adds per token of what follows the encoder: none for the bare encoder (its pooler is built for
        the checkpoints, not called)."""
        return 0


class BertModel(EncoderModule):
    """The encoder. forward(input_ids, attention_mask, token_type_ids) -> last hidden state (B, T, C).

    The pooler is built (so HF's BertModel checkpoints load) but only the classification head calls it.
    """

    embeddings_class = BertEmbeddings

    def __init__(self, cfg: EncoderConfig, add_pooling_layer: bool = True):
        super().__init__(cfg)
        self.embeddings = self.embeddings_class(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg) if add_pooling_layer else None
        self.reset_parameters()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids: (B, T); attention_mask: (B, T), 1 for real tokens, 0 for padding."""
        # without padding no mask, so SDPA may pick the flash kernel
        attn_mask = padding_mask(attention_mask) if attention_mask is not None else None
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        return self.encoder(x, attn_mask)  # (B, T, C)


class RobertaModel(BertModel):
    embeddings_class = RobertaEmbeddings


# ----------------------------------------------------------------------------------------------------
# Heads. Each family keeps its checkpoint's layout: `bert` + `cls.predictions` / `classifier`,
# `roberta` + `lm_head` / `classifier.{dense,out_proj}`.


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)  # weight tied to the word embeddings by the model
        # the checkpoints store the decoder's bias under both names; one Parameter, two names, like HF
        self.bias = self.decoder.bias

    def forward(self, x):
        return self.decoder(self.transform(x))  # (B, T, C) -> (B, T, V)


class BertForMaskedLM(EncoderModule):
    """forward(input_ids, attention_mask, token_type_ids) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.cls = nn.ModuleDict({"predictions": BertLMPredictionHead(cfg)})  # `cls.predictions.*`
        # input and output embeddings share one matrix (BERT was pretrained that way)
        self.cls["predictions"].decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.reset_parameters()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.cls["predictions"](self.bert(input_ids, attention_mask, token_type_ids))

    def output_head(self) -> nn.Linear:
        """The decoder onto the vocabulary, tied to the word embeddings (rafale.record.non_embedding_parameters
        leaves it, and its bias, out of N)."""
        return self.cls["predictions"].decoder

    def head_macs_per_token(self, seq_len: int) -> float:
        # the transform's dense (C^2), then the decoder (C V, tied to the word embeddings) on every token: the
        # logits of all positions are computed, the loss reads the masked ones
        return self.cfg.hidden_size * (self.cfg.hidden_size + self.cfg.vocab_size)


class BertForSequenceClassification(EncoderModule):
    """forward(input_ids, attention_mask, token_type_ids) -> logits (B, num_labels), from the pooled [CLS]."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.bert = BertModel(cfg, add_pooling_layer=True)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self.reset_parameters()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        pooled = self.bert.pooler(self.bert(input_ids, attention_mask, token_type_ids))  # (B, C)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)

    def head_macs_per_token(self, seq_len: int) -> float:
        # the pooler (C^2) and the classifier (C x num_labels) run once per sequence, on its first token
        return self.cfg.hidden_size * (self.cfg.hidden_size + self.cfg.num_labels) / seq_len


class RobertaLMHead(nn.Module):
    """BERT's prediction head flattened into one module, with `layer_norm` spelled as in the checkpoints."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)  # weight tied to the word embeddings by the model
        self.bias = self.decoder.bias  # stored under both names, as for BERT

    def forward(self, x):
        return self.decoder(self.layer_norm(F.gelu(self.dense(x))))  # (B, T, C) -> (B, T, V)


class RobertaForMaskedLM(EncoderModule):
    """forward(input_ids, attention_mask, token_type_ids) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.roberta = RobertaModel(cfg, add_pooling_layer=False)
        self.lm_head = RobertaLMHead(cfg)
        self.lm_head.decoder.weight = self.roberta.embeddings.word_embeddings.weight
        self.reset_parameters()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.lm_head(self.roberta(input_ids, attention_mask, token_type_ids))

    def output_head(self) -> nn.Linear:
        """The decoder onto the vocabulary, tied to the word embeddings (rafale.record.non_embedding_parameters
        leaves it, and its bias, out of N)."""
        return self.lm_head.decoder

    def head_macs_per_token(self, seq_len: int) -> float:
        # dense (C^2), then the decoder tied to the word embeddings (C V), on every token
        return self.cfg.hidden_size * (self.cfg.hidden_size + self.cfg.vocab_size)


class RobertaClassificationHead(nn.Module):
    """BERT's pooler and classifier in one module: RoBERTa has no next-sentence task to pretrain a pooler."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, x):
        x = self.dropout(x[:, 0])  # (B, T, C) -> (B, C): the <s> token
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)  # (B, num_labels)


class RobertaForSequenceClassification(EncoderModule):
    """forward(input_ids, attention_mask, token_type_ids) -> logits (B, num_labels)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.roberta = RobertaModel(cfg, add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(cfg)
        self.reset_parameters()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.classifier(self.roberta(input_ids, attention_mask, token_type_ids))

    def head_macs_per_token(self, seq_len: int) -> float:
        # dense (C^2) and out_proj (C x num_labels), once per sequence, on its <s> token
        return self.cfg.hidden_size * (self.cfg.hidden_size + self.cfg.num_labels) / seq_len


MODEL_CLASSES = {
    "bert": {"base": BertModel, "mlm": BertForMaskedLM, "classification": BertForSequenceClassification},
    "roberta": {"base": RobertaModel, "mlm": RobertaForMaskedLM, "classification": RobertaForSequenceClassification},
}


def build_encoder(cfg: EncoderConfig, head: Literal["base", "mlm", "classification"] = "base") -> EncoderModule:
    cfg.validate()
    heads = MODEL_CLASSES[cfg.family]
    if head not in heads:
        raise ValueError(f"head must be one of {sorted(heads)}, got {head!r}")
    return heads[head](cfg)
