"""Tests for HF weight import/export (rafale/models/hf.py), against tiny random transformers models."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

transformers = pytest.importorskip("transformers")

from conftest import randomize_  # noqa: E402
from rafale.models import hf as rafale_hf  # noqa: E402
from rafale.models.decoder import DecoderConfig, GPTNeoX  # noqa: E402
from rafale.models.encoder import EncoderConfig, build_encoder  # noqa: E402
from rafale.models.hf import (  # noqa: E402
    WeightsError,
    from_pretrained,
    load_tokenizer_from_folder,
    save_pretrained,
)

ENCODERS = [(family, head) for family in ("bert", "roberta") for head in ("base", "mlm", "classification")]
ARCHITECTURES = [("gpt_neox", "causal_lm")] + ENCODERS
ARCH_IDS = ["-".join(a) for a in ARCHITECTURES]
HF_CLASS_NAMES = {
    ("gpt_neox", "causal_lm"): "GPTNeoXForCausalLM",
    ("bert", "base"): "BertModel",
    ("bert", "mlm"): "BertForMaskedLM",
    ("bert", "classification"): "BertForSequenceClassification",
    ("roberta", "base"): "RobertaModel",
    ("roberta", "mlm"): "RobertaForMaskedLM",
    ("roberta", "classification"): "RobertaForSequenceClassification",
}
AUTO_CLASSES = {
    "causal_lm": transformers.AutoModelForCausalLM,
    "base": transformers.AutoModel,
    "mlm": transformers.AutoModelForMaskedLM,
    "classification": transformers.AutoModelForSequenceClassification,
}
VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")  # test/conftest.py


def hf_config(family, head, rotary_pct=0.25, parallel_residual=True, vocab_size=VOCAB):
    if family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, rotary_pct=rotary_pct, rotary_emb_base=5000,
            use_parallel_residual=parallel_residual, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None,  # no end-of-text: generate never stops early
        )
        assert cfg.rope_parameters["partial_rotary_factor"] == rotary_pct  # the legacy keyword still lands
        return cfg
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, num_labels=3)
    if family == "bert":
        return transformers.BertConfig(max_position_embeddings=64, type_vocab_size=2, **common)
    return transformers.RobertaConfig(max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                                      layer_norm_eps=1e-5, **common)


def hf_model(family, head, seed=0, **kw):
    cls = getattr(transformers, HF_CLASS_NAMES[(family, head)])
    torch.manual_seed(seed)
    return randomize_(cls(hf_config(family, head, **kw)), seed)


def rafale_model(family, head, vocab_size=VOCAB, seed=0):
    torch.manual_seed(seed)
    if family == "gpt_neox":
        # rope settings off their defaults, so an export that dropped them would show
        model = GPTNeoX(DecoderConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                      intermediate_size=64, max_position_embeddings=128, rotary_pct=0.5,
                                      rotary_base=5000.0, parallel_residual=False))
    else:
        extra = dict(type_vocab_size=2) if family == "bert" else dict(
            type_vocab_size=1, pad_token_id=1, position_offset=2, layer_norm_eps=1e-5)
        cfg = EncoderConfig(family=family, vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=37, max_position_embeddings=66, num_labels=3, **extra)
        model = build_encoder(cfg, head)
    return randomize_(model, seed)


def padded_batch(family, lengths=(11, 7, 3), T=11, seed=1):
    """Right-padded ids (B, T), attention_mask, and token types (random for BERT, which has two)."""
    g = torch.Generator().manual_seed(seed)
    pad = 1 if family == "roberta" else 0
    ids = torch.randint(2, VOCAB, (len(lengths), T), generator=g)  # real tokens avoid the pad ids
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    ids = ids.masked_fill(mask == 0, pad)
    types = torch.randint(0, 2, ids.shape, generator=g) if family == "bert" else torch.zeros_like(ids)
    return ids, mask, types


@torch.no_grad()
def hf_output(model, head, ids, mask, types):
    if head == "causal_lm":
        return model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return out.last_hidden_state if head == "base" else out.logits


@torch.no_grad()
def rafale_output(model, head, ids, mask, types):
    if head == "causal_lm":
        return model(ids, attention_mask=mask)
    return model(ids, attention_mask=mask, token_type_ids=types)


def assert_same_outputs(model, hf, family, head, vocab_size=None):
    """Our outputs (the first vocab_size columns) equal transformers' on a padded batch, at the real tokens:
    padded positions' outputs are meaningless and differ between implementations."""
    ids, mask, types = padded_batch(family)
    ours, theirs = rafale_output(model, head, ids, mask, types), hf_output(hf, head, ids, mask, types)
    if vocab_size is not None:
        ours = ours[..., :vocab_size]
    if head != "classification":
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- transformers -> rafale


@pytest.mark.parametrize("parallel_residual", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_gpt_neox_parity(tmp_path, rotary_pct, parallel_residual):
    hf = hf_model("gpt_neox", "causal_lm", rotary_pct=rotary_pct, parallel_residual=parallel_residual)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert not model.training
    assert model.cfg.rotary_pct == rotary_pct and model.cfg.rotary_base == 5000
    assert model.cfg.parallel_residual == parallel_residual
    assert_same_outputs(model, hf, "gpt_neox", "causal_lm")


@pytest.mark.parametrize("family, head", ENCODERS, ids=["-".join(a) for a in ENCODERS])
def test_encoder_parity(tmp_path, family, head):
    hf = hf_model(family, head)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert type(model).__name__ == HF_CLASS_NAMES[(family, head)]
    assert model.cfg.family == family and model.cfg.num_labels == 3
    assert_same_outputs(model, hf, family, head)


@pytest.mark.parametrize("way", ["linear", "weight_at_x", "x_at_weight_t", "fastest"])
def test_greedy_generation_matches_transformers(tmp_path, monkeypatch, way):
    """Every way a CPU may multiply a decoding step's rows (rafale/models/decoding.py), each forced on every
    weight, and the one timed fastest for each; for one prompt and for two."""
    from rafale.models import decoding

    if way != "fastest":
        monkeypatch.setattr(decoding, "WAYS", (way,))
    called, multiply = [], decoding._multiply
    monkeypatch.setattr(decoding, "_multiply", lambda w, *a: called.append(w) or multiply(w, *a))
    hf = hf_model("gpt_neox", "causal_lm", seed=3)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    for B, length in ((1, 1), (2, 1), (1, 5), (2, 5), (1, 12), (2, 12)):  # B=1: one row a step; B=2: a few rows
        prompt = torch.randint(0, VOCAB, (B, length), generator=g)
        ours = model.generate(prompt, 32)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32)
        assert ours.shape == (B, length + 32)
        assert torch.equal(ours, theirs)
    assert way == "fastest" or way == "linear" or set(called) == {way}  # the forced way ran, and only it


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model("gpt_neox", "causal_lm")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = from_pretrained(tmp_path)
    assert_same_outputs(model, hf, "gpt_neox", "causal_lm")


def test_old_checkpoints_load(tmp_path):
    """What older files hold besides the weights: buffers (dropped knowingly), other names for the same tensors,
    a pickled pytorch_model.bin."""
    hf = hf_model("gpt_neox", "causal_lm", rotary_pct=1.0)
    hf.save_pretrained(tmp_path)
    # Pythia's config.json spells the rope settings the old way
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rotary_pct=1.0, rotary_emb_base=5000)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")  # transformers 5's in-memory name
    tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool).tril()
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    tensors["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = torch.ones(2)
    (tmp_path / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    model = from_pretrained(tmp_path)
    assert_same_outputs(model, hf, "gpt_neox", "causal_lm")


def test_old_bert_checkpoint_loads(tmp_path):
    """bert-base-uncased's layout: gamma/beta LayerNorm names, position_ids, the decoder stored besides the word
    embeddings, and the pretraining-only pooler and next-sentence head."""
    hf = hf_model("bert", "mlm")
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["bert.embeddings.LayerNorm.gamma"] = tensors.pop("bert.embeddings.LayerNorm.weight")
    tensors["bert.embeddings.LayerNorm.beta"] = tensors.pop("bert.embeddings.LayerNorm.bias")
    tensors["bert.embeddings.position_ids"] = torch.arange(64)[None]
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].clone()
    tensors["bert.pooler.dense.weight"], tensors["bert.pooler.dense.bias"] = torch.zeros(32, 32), torch.zeros(32)
    tensors["cls.seq_relationship.weight"], tensors["cls.seq_relationship.bias"] = torch.zeros(2, 32), torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = from_pretrained(tmp_path)
    assert_same_outputs(model, hf, "bert", "mlm")

    # a decoder that is not the word embeddings cannot be tied silently
    tensors["cls.predictions.decoder.weight"] += 1
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="cls.predictions.decoder.weight"):
        from_pretrained(tmp_path)


def test_dtype_kept_or_converted(tmp_path):
    hf = hf_model("gpt_neox", "causal_lm").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")  # half-precision Pythia files keep this buffer in fp32
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2, dtype=torch.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = from_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.positions.inv_freq.dtype == torch.float32  # rotary tables stay fp32, as in transformers
    torch.testing.assert_close(model.head.weight, hf.lm_head.weight, atol=0, rtol=0)
    assert {p.dtype for p in from_pretrained(tmp_path, dtype=torch.float32).parameters()} == {torch.float32}

    save_pretrained(model, tmp_path / "fp16", dtype=torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "fp16" / "model.safetensors").values()} == {torch.float16}
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"


# ---------------------------------------------------------------- rafale -> transformers


def load_in_transformers(folder, head):
    model, info = AUTO_CLASSES[head].from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("family, head", ARCHITECTURES, ids=ARCH_IDS)
def test_rafale_model_loads_in_transformers(tmp_path, family, head):
    model = rafale_model(family, head)
    save_pretrained(model, tmp_path / "export")
    hf = load_in_transformers(tmp_path / "export", head)
    assert type(hf).__name__ == HF_CLASS_NAMES[(family, head)]
    if family == "gpt_neox":  # the spelling transformers 4 reads (5 reads rope_parameters, checked by the outputs)
        config = json.loads((tmp_path / "export" / "config.json").read_text())
        assert (config["rotary_pct"], config["rotary_emb_base"]) == (0.5, 5000.0)
    assert_same_outputs(model, hf, family, head)


@pytest.mark.parametrize("family, head", ARCHITECTURES, ids=ARCH_IDS)
def test_transformers_rafale_transformers_round_trip(tmp_path, family, head):
    hf = hf_model(family, head)
    if head == "classification":
        hf.config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
        hf.config.label2id = {v: k for k, v in hf.config.id2label.items()}
    hf.save_pretrained(tmp_path / "hf")
    save_pretrained(from_pretrained(tmp_path / "hf"), tmp_path / "rafale")

    # the same tensors under the same names: tied tensors written once, as transformers writes them
    theirs = load_file(tmp_path / "hf" / "model.safetensors")
    ours = load_file(tmp_path / "rafale" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name

    again = load_in_transformers(tmp_path / "rafale", head)
    original = hf.state_dict()
    assert sorted(again.state_dict()) == sorted(original)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
                "layer_norm_eps", "pad_token_id"):
        assert getattr(again.config, key) == getattr(hf.config, key), key
    if family == "gpt_neox":
        assert again.config.rope_parameters == hf.config.rope_parameters
        assert again.config.use_parallel_residual == hf.config.use_parallel_residual
    if head == "classification":
        assert again.config.id2label == hf.config.id2label


@pytest.mark.parametrize("family, head", [("gpt_neox", "causal_lm"), ("bert", "mlm"), ("roberta", "mlm")])
def test_export_slices_padded_vocabulary(tmp_path, family, head):
    model = rafale_model(family, head, vocab_size=128)  # rafale rounds the tokenizer's 100 up to 128
    save_pretrained(model, tmp_path / "export", vocab_size=VOCAB)
    hf = load_in_transformers(tmp_path / "export", head)
    assert hf.config.vocab_size == VOCAB
    assert_same_outputs(model, hf, family, head, vocab_size=VOCAB)


def bpe_tokenizer(vocab_size=300) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = ["Once upon a time a little fox found a shiny stone.", "The dog and the cat played in the sun all day."]
    tokenizer.train_from_iterator(texts * 50, trainer)
    return tokenizer


def test_tokenizer_export(tmp_path):
    tokenizer = bpe_tokenizer()
    assert tokenizer.get_vocab_size() == 300
    model = rafale_model("gpt_neox", "causal_lm", vocab_size=320)
    save_pretrained(model, tmp_path / "export", tokenizer=tokenizer, vocab_size=300)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "Once upon a time, a fox and a zebra played.<|endoftext|>"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == 0
    assert hf_tokenizer.pad_token_id == 1 and hf_tokenizer.model_max_length == 128
    assert load_tokenizer_from_folder(tmp_path / "export").encode(text).ids == tokenizer.encode(text).ids
    assert load_tokenizer_from_folder(tmp_path) is None
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["vocab_size"] == 300 and config["eos_token_id"] == 0 and config["bos_token_id"] == 0

    with pytest.raises(WeightsError, match="300 tokens"):
        save_pretrained(model, tmp_path / "too-small", tokenizer=tokenizer, vocab_size=256)


def test_save_is_all_or_nothing(tmp_path, monkeypatch):
    model = rafale_model("gpt_neox", "causal_lm")
    save_pretrained(model, tmp_path / "export")
    with pytest.raises(WeightsError, match="not empty"):
        save_pretrained(model, tmp_path / "export")
    save_pretrained(model, tmp_path / "export", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rafale_hf, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no half-written folder, no staging left


# ---------------------------------------------------------------- strict loading errors


@pytest.fixture
def neox_folder(tmp_path):
    hf_model("gpt_neox", "causal_lm").save_pretrained(tmp_path)
    return tmp_path


def test_every_problem_reported_at_once(neox_folder):
    tensors = load_file(neox_folder / "model.safetensors")
    del tensors["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]
    tensors["gpt_neox.layers.0.attention.surprise"] = torch.zeros(3)
    tensors["gpt_neox.layers.5.mlp.dense_h_to_4h.bias"] = torch.zeros(64)  # a layer the config does not have
    tensors["gpt_neox.final_layer_norm.weight"] = torch.ones(31)
    save_file(tensors, neox_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError) as err:
        from_pretrained(neox_folder)
    message = str(err.value)
    assert "missing: gpt_neox.layers.1.mlp.dense_h_to_4h.bias" in message
    assert "gpt_neox.layers.0.attention.surprise" in message and "gpt_neox.layers.5.mlp.dense_h_to_4h.bias" in message
    assert "gpt_neox.final_layer_norm.weight (expected (32,), found (31,))" in message


def test_unsupported_architecture(neox_folder):
    config = json.loads((neox_folder / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (neox_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as err:
        from_pretrained(neox_folder)
    message = str(err.value)
    assert str(neox_folder / "config.json") in message and "MistralForCausalLM" in message
    assert "GPTNeoXForCausalLM" in message and "RobertaForSequenceClassification" in message


@pytest.mark.parametrize("key, value", [("hidden_act", "gelu_new"), ("tie_word_embeddings", True)])
def test_unsupported_config_values(neox_folder, key, value):
    config = json.loads((neox_folder / "config.json").read_text())
    config[key] = value
    (neox_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=key):
        from_pretrained(neox_folder)


def test_corrupt_safetensors(neox_folder):
    path = neox_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=str(path)):
        from_pretrained(neox_folder)


def test_folder_without_weights_or_config(neox_folder, tmp_path_factory):
    (neox_folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weights found"):
        from_pretrained(neox_folder)
    with pytest.raises(WeightsError, match="no config.json"):
        from_pretrained(tmp_path_factory.mktemp("empty"))
