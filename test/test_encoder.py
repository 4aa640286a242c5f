"""Tests for the BERT / RoBERTa encoders (rafale/models/encoder.py): shapes, padding, HF parity, wrappers."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers

from rafale.models.bert import BERT_PRESETS, ROBERTA_PRESETS
from rafale.models.composer import ComposerClassifier, ComposerMLM
from rafale.models.encoder import (
    EncoderConfig,
    build_encoder,
    create_position_ids_from_input_ids,
)

HEADS = ("base", "mlm", "classification")
FAMILIES = ("bert", "roberta")


def tiny_config(family: str, **overrides) -> EncoderConfig:
    """The HF test-suite size: small enough that each model builds and runs in milliseconds."""
    common = dict(
        vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, num_labels=3,
        hidden_dropout=0.1, attention_dropout=0.1,
    )
    if family == "bert":
        cfg = EncoderConfig(family="bert", max_position_embeddings=64, type_vocab_size=2, **common)
    else:
        cfg = EncoderConfig(
            family="roberta", max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5,
            pad_token_id=1, position_offset=2, **common,
        )
    return dataclasses.replace(cfg, **overrides)


def padded_batch(cfg: EncoderConfig, lengths, T: int, seed: int = 0):
    """Right-padded input_ids (B, T) with pad_token_id after each row's length, and its attention_mask."""
    g = torch.Generator().manual_seed(seed)
    # real tokens avoid the pad id: RoBERTa derives positions from the ids
    input_ids = torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (len(lengths), T), generator=g)
    attention_mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    input_ids = input_ids.masked_fill(attention_mask == 0, cfg.pad_token_id)
    return input_ids, attention_mask


# ---------------------------------------------------------------- config


def test_validate_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        tiny_config("bert", num_heads=5).validate()
    with pytest.raises(ValueError, match="position_offset"):
        tiny_config("roberta", position_offset=0).validate()
    with pytest.raises(ValueError, match="attention_dropout"):
        tiny_config("bert", attention_dropout=1.5).validate()
    with pytest.raises(ValueError, match="family"):
        dataclasses.replace(tiny_config("bert"), family="electra").validate()
    with pytest.raises(ValueError, match="vocab_size"):
        build_encoder(dataclasses.replace(tiny_config("bert"), vocab_size=None))
    with pytest.raises(ValueError, match="head"):
        build_encoder(tiny_config("bert"), head="qa")


def test_presets_validate_and_max_seq_len():
    presets = {**BERT_PRESETS, **ROBERTA_PRESETS}
    for cfg in presets.values():
        cfg.validate()
    assert presets["bert-base"].max_seq_len == 512
    assert presets["roberta-base"].max_seq_len == 512
    assert presets["roberta-tiny"].max_seq_len == 512


@pytest.mark.parametrize(
    "preset, hf_class, hf_config",
    [
        ("bert-base", transformers.BertModel, transformers.BertConfig()),
        (
            "roberta-base",
            transformers.RobertaModel,
            transformers.RobertaConfig(
                vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5
            ),
        ),
    ],
)
def test_base_presets_match_hf_parameter_shapes(preset, hf_class, hf_config):
    # on the meta device nothing is allocated, so the real sizes cost nothing to build
    with torch.device("meta"):
        ours = build_encoder({**BERT_PRESETS, **ROBERTA_PRESETS}[preset], "base")
        theirs = hf_class(hf_config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_too_long_sequence_is_an_error():
    cfg = tiny_config("roberta")
    model = build_encoder(cfg)
    model(torch.full((1, cfg.max_seq_len), 5))  # the longest allowed
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.full((1, cfg.max_seq_len + 1), 5))


# ---------------------------------------------------------------- shapes, padding, positions, tying


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_output_shapes(family, head):
    cfg = tiny_config(family)
    model = build_encoder(cfg, head)
    input_ids, attention_mask = padded_batch(cfg, [7, 4], T=7)
    out = model(input_ids, attention_mask=attention_mask)
    expected = {"base": (2, 7, 32), "mlm": (2, 7, 99), "classification": (2, 3)}[head]
    assert out.shape == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_padding_does_not_change_real_positions(family, head):
    torch.manual_seed(0)
    cfg = tiny_config(family, init_std=0.3)  # large weights, so that attending to pads would show
    model = build_encoder(cfg, head).eval()
    input_ids, attention_mask = padded_batch(cfg, [6, 6], T=6)
    short = model(input_ids, attention_mask=attention_mask)
    pad = torch.full((2, 3), cfg.pad_token_id)
    longer = model(torch.cat([input_ids, pad], 1), attention_mask=torch.cat([attention_mask, torch.zeros_like(pad)], 1))
    if head == "classification":
        torch.testing.assert_close(longer, short)
    else:
        torch.testing.assert_close(longer[:, :6], short)
    # and the mask matters: attending to the pads would change the outputs
    unmasked = model(torch.cat([input_ids, pad], 1))
    if head != "classification":
        unmasked = unmasked[:, :6]
    assert not torch.allclose(unmasked, short, atol=1e-4)


def test_roberta_position_ids():
    input_ids = torch.tensor([[0, 5, 6, 7, 1, 1], [0, 8, 1, 1, 1, 1]])
    expected = torch.tensor([[2, 3, 4, 5, 1, 1], [2, 3, 1, 1, 1, 1]])
    assert torch.equal(create_position_ids_from_input_ids(input_ids, padding_idx=1), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlm_decoder_is_tied_to_word_embeddings(family):
    model = build_encoder(tiny_config(family), "mlm")
    body, head = (model.bert, model.cls["predictions"]) if family == "bert" else (model.roberta, model.lm_head)
    word = body.embeddings.word_embeddings.weight
    assert head.decoder.weight is word
    assert head.decoder.weight.data_ptr() == word.data_ptr()
    assert head.bias is head.decoder.bias
    # tied parameters are counted (and optimised) once
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("decoder.weight") for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_init_like_hf(family):
    cfg = tiny_config(family)
    model = build_encoder(cfg, "mlm")
    emb = model.get_submodule(f"{family}.embeddings")
    assert torch.all(emb.word_embeddings.weight[cfg.pad_token_id] == 0)
    assert 0.015 < emb.word_embeddings.weight[cfg.pad_token_id + 1 :].std() < 0.025
    assert torch.all(emb.LayerNorm.weight == 1) and torch.all(emb.LayerNorm.bias == 0)
    assert torch.all(model.get_submodule(f"{family}.encoder.layer.0.attention.self.query").bias == 0)


def test_num_params_leaves_out_lookups_but_not_the_tied_decoder():
    cfg = tiny_config("bert")
    base, mlm = build_encoder(cfg, "base"), build_encoder(cfg, "mlm")
    C, V = cfg.hidden_size, cfg.vocab_size
    tables = (V + cfg.max_position_embeddings + cfg.type_vocab_size) * C
    assert base.num_params(non_embedding=False) - base.num_params() == tables
    pooler = C * C + C
    head = (C * C + C) + 2 * C + V * C + V  # transform dense, LayerNorm, tied decoder weight, bias
    assert mlm.num_params() == base.num_params() - pooler + head


# ---------------------------------------------------------------- parity with Hugging Face

# our head -> the HF class whose state_dict loads into it unchanged
HF_CLASSES = {
    ("bert", "base"): transformers.BertModel,
    ("bert", "mlm"): transformers.BertForMaskedLM,
    ("bert", "classification"): transformers.BertForSequenceClassification,
    ("roberta", "base"): transformers.RobertaModel,
    ("roberta", "mlm"): transformers.RobertaForMaskedLM,
    ("roberta", "classification"): transformers.RobertaForSequenceClassification,
}
# HF's non-parameter buffers (non-persistent in transformers 5, so usually absent from state_dict)
HF_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def hf_config(cfg: EncoderConfig):
    config_class = transformers.BertConfig if cfg.family == "bert" else transformers.RobertaConfig
    return config_class(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, hidden_act="gelu",
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id, num_labels=cfg.num_labels,
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        attn_implementation="eager",  # the plain softmax(QK^T)V path: an independent check of our SDPA call
    )


@pytest.mark.parametrize("family, head", list(HF_CLASSES))
def test_parity_with_hf(family, head):
    torch.manual_seed(0)
    cfg = tiny_config(family)
    theirs = HF_CLASSES[family, head](hf_config(cfg)).eval()
    # HF's init leaves biases at 0 and LayerNorms at 1/0, which would hide a missing bias or a swapped norm
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.2)
    ours = build_encoder(cfg, head).eval()

    state = {k: v for k, v in theirs.state_dict().items() if not k.endswith(HF_BUFFERS)}
    # The names are an identity, tied weights included: HF's MLM state_dict lists the decoder weight under
    # both `*.word_embeddings.weight` and `*.decoder.weight`, and the decoder bias under both `*.bias` and
    # `*.decoder.bias`; ours registers the same tied Parameters under the same names, so strict loading
    # needs no special case (it copies each shared tensor twice, with the same values).
    ours.load_state_dict(state, strict=True)

    input_ids, attention_mask = padded_batch(cfg, [9, 6, 3], T=9, seed=1)
    token_type_ids = None
    if cfg.type_vocab_size > 1:
        token_type_ids = (torch.arange(9)[None] >= 4).long().expand(3, 9)  # segment B from position 4
    with torch.no_grad():
        out = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        ref = theirs(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    ref = ref.last_hidden_state if head == "base" else ref.logits
    if head == "classification":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    else:
        real = attention_mask.bool()  # padded positions are not defined to agree
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- Composer wrappers


@pytest.mark.parametrize("family", FAMILIES)
def test_composer_mlm_loss_covers_masked_positions_only(family):
    torch.manual_seed(0)
    cfg = tiny_config(family)
    composer_model = ComposerMLM(build_encoder(cfg, "mlm")).eval()
    input_ids, attention_mask = padded_batch(cfg, [8, 5], T=8)
    labels = torch.full_like(input_ids, -100)
    masked = torch.tensor([[0, 2], [0, 6], [1, 1], [1, 3]])
    labels[masked[:, 0], masked[:, 1]] = input_ids[masked[:, 0], masked[:, 1]]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    logits = composer_model(batch)
    loss = composer_model.loss(logits, batch)
    expected = F.cross_entropy(logits[masked[:, 0], masked[:, 1]], labels[masked[:, 0], masked[:, 1]])
    torch.testing.assert_close(loss, expected)

    metrics = composer_model.get_metrics(is_train=False)
    assert composer_model.get_metrics(is_train=True) == {}
    for metric in metrics.values():
        composer_model.update_metric(batch, composer_model.eval_forward(batch, logits), metric)
    torch.testing.assert_close(metrics["LanguageCrossEntropy"].compute(), expected)
    predicted = logits[masked[:, 0], masked[:, 1]].argmax(-1)
    accuracy = (predicted == labels[masked[:, 0], masked[:, 1]]).float().mean()
    torch.testing.assert_close(metrics["MaskedAccuracy"].compute(), accuracy)

    T = input_ids.shape[1]
    assert composer_model.flops_per_batch(batch) == composer_model.model.flops_per_token(T) * input_ids.numel()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_labels", [2, 3])
def test_composer_classifier_metrics(family, num_labels):
    cfg = tiny_config(family, num_labels=num_labels)
    composer_model = ComposerClassifier(build_encoder(cfg, "classification"), num_labels=num_labels)
    input_ids, attention_mask = padded_batch(cfg, [5, 3, 5, 2], T=5)
    labels = torch.tensor([0, 1, 1, 0]) if num_labels == 2 else torch.tensor([0, 2, 1, 2])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    outputs = composer_model(batch)
    assert outputs.shape == (4, num_labels)
    torch.testing.assert_close(composer_model.loss(outputs, batch), F.cross_entropy(outputs, labels))

    metrics = composer_model.get_metrics(is_train=False)
    assert set(metrics) == ({"CrossEntropy", "Accuracy", "F1"} if num_labels == 2 else {"CrossEntropy", "Accuracy"})
    perfect = F.one_hot(labels, num_labels).float() * 10.0  # logits that pick every label
    for metric in metrics.values():
        composer_model.update_metric(batch, perfect, metric)
    assert metrics["Accuracy"].compute().item() == 1.0
    torch.testing.assert_close(metrics["CrossEntropy"].compute(), F.cross_entropy(perfect, labels))
    if num_labels == 2:
        assert metrics["F1"].compute().item() == 1.0

    # and a wrong prediction counts: one of four flipped
    metrics["Accuracy"].reset()
    wrong = perfect.clone()
    wrong[0] = wrong[0].roll(1)
    composer_model.update_metric(batch, wrong, metrics["Accuracy"])
    assert metrics["Accuracy"].compute().item() == 0.75
