"""An exported tokenizer, loaded with HF's Auto classes, gives the ids rafale trained on; a classifier's export
predicts through HF on raw text what rafale predicts on the datapipe's ids."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rafale.config import load_config  # noqa: E402
from rafale.resolve import resolve_model_config  # noqa: E402
from rafale.models.families import FAMILIES  # noqa: E402
from rafale.data.causal_lm import CausalLMDataPipe  # noqa: E402
from rafale.data.classification import ClassificationCollator, ClassificationDataPipe  # noqa: E402
from rafale.data.sources import load_source  # noqa: E402
from rafale.run_folder import export_model  # noqa: E402
from rafale.models.hf import save_pretrained  # noqa: E402
from conftest import write_config  # noqa: E402

BLOCK = 32
FRAMING = {"bert": ("[CLS]", "[SEP]"), "roberta": ("<s>", "</s>")}


def classifier_export(tmp_path, family):
    """(datapipe's data, its raw validation texts, rafale's classifier, the HF export folder), with random weights."""
    path = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                        data={"vocab_size": 400, "block_size": BLOCK, "num_train_stories": 150, "num_val_stories": 12,
                              "cache_dir": str(tmp_path / "cache")},
                        model={"type": family, "task": "classification", "preset": f"{family}-tiny"})
    cfg = load_config(path)
    data = ClassificationDataPipe(cfg.data, **FAMILIES[family].data).load(verbose=False)
    texts = list(load_source(cfg.data, tmp_path, labelled=True)["validation"]["text"])
    torch.manual_seed(0)
    composer_model = FAMILIES[family].build(resolve_model_config(cfg), "classification", data.meta, data.tokenizer)
    model = composer_model.model.eval()
    return data, texts, model, export_model(model, tmp_path / "export", data)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_export_tokenizes_and_classifies_raw_text_as_rafale(tmp_path, family):
    data, texts, model, export = classifier_export(tmp_path, family)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    ours = [ids.tolist() for ids in data.splits["validation"]["input_ids"]]
    theirs = hf_tokenizer(texts, truncation=True, max_length=BLOCK).input_ids
    assert theirs == ours  # framing included: [CLS] ... [SEP] or <s> ... </s>
    cls, sep = FRAMING[family]
    assert hf_tokenizer.cls_token == cls and hf_tokenizer.sep_token == sep and hf_tokenizer.mask_token is not None
    assert hf_tokenizer.pad_token_id == data.pad_token_id and hf_tokenizer.unk_token is not None
    assert hf_tokenizer.model_max_length == model.cfg.max_seq_len

    batch = ClassificationCollator(data.pad_token_id)([data.splits["validation"][i] for i in range(len(texts))])
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
        encoded = hf_tokenizer(texts, truncation=True, max_length=BLOCK, padding=True, return_tensors="pt")
        hf_logits = hf_model(**encoded).logits
        unframed = hf_tokenizer(texts, truncation=True, max_length=BLOCK, padding=True, return_tensors="pt",
                                add_special_tokens=False)
        unframed_logits = hf_model(**unframed).logits
    torch.testing.assert_close(hf_logits, logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(hf_logits.argmax(-1), logits.argmax(-1))
    assert not torch.allclose(unframed_logits, logits, atol=1e-3)  # the check can see a missing framing


def test_decoder_export_tokenizer_keeps_eos_and_pad_and_adds_nothing(tmp_path):
    from rafale.config import DataConfig
    from rafale.models.decoder import DecoderConfig, GPTNeoX

    cfg = DataConfig(vocab_size=300, block_size=32, num_train_stories=100, num_val_stories=10,
                     cache_dir=str(tmp_path / "cache"), num_proc=1)
    tokenizer = CausalLMDataPipe(cfg).load(verbose=False).tokenizer
    model = GPTNeoX(DecoderConfig(vocab_size=320, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                                  max_position_embeddings=64))
    save_pretrained(model, tmp_path / "export", tokenizer=tokenizer, vocab_size=300)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.pad_token == "<|padding|>"
    text = "Once upon a time, Lily saw a dog."
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text, add_special_tokens=False).ids
    padded = hf_tokenizer(["a dog", text], padding=True).input_ids
    assert padded[0][-1] == hf_tokenizer.pad_token_id == tokenizer.token_to_id("<|padding|>")


def test_a_user_tokenizer_file_is_exported_as_given(tmp_path, capsys):
    """A tokenizer file without a post-processor stays without one (the export warns that it does not frame)."""
    data, _, model, _ = classifier_export(tmp_path, "bert")
    user = json.loads(data.tokenizer.to_str())
    user["post_processor"] = None
    (tmp_path / "user.json").write_text(json.dumps(user))
    path = write_config(tmp_path / "user.yaml", run={"output_dir": str(tmp_path / "runs")},
                        data={"tokenizer": str(tmp_path / "user.json"), "block_size": BLOCK, "num_train_stories": 150,
                              "num_val_stories": 12, "cache_dir": str(tmp_path / "cache")},
                        model={"type": "bert", "task": "classification", "preset": "bert-tiny"})
    user_data = ClassificationDataPipe(load_config(path).data, tokenizer_kind="wordpiece").load(verbose=False)
    assert [ids.tolist() for ids in user_data.splits["validation"]["input_ids"]] == \
        [ids.tolist() for ids in data.splits["validation"]["input_ids"]]  # the datapipe frames either way
    capsys.readouterr()
    export_model(model, tmp_path / "user-export", user_data)
    assert "does not add [CLS] ... [SEP]" in capsys.readouterr().out
    assert json.loads((tmp_path / "user-export" / "tokenizer.json").read_text()) == user
