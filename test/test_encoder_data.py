"""The encoder datapipes: masked-LM blocks and masking, classification texts and labels."""

import json

import pytest
import torch

from rafale.config import DataConfig
from rafale.data.classification import ClassificationCollator, ClassificationDataPipe
from rafale.data.mlm import MLMCollator, MLMDataPipe
from rafale.errors import IGNORE_INDEX, DataError
from rafale.models.families import FAMILIES

SPECIALS = {"bert": ("[CLS]", "[SEP]", "[PAD]", "[MASK]"), "roberta": ("<s>", "</s>", "<pad>", "<mask>")}


def cfg(tmp_path, **kw) -> DataConfig:
    defaults = dict(source="stories", vocab_size=400, block_size=48, num_train_stories=150, num_val_stories=30,
                    cache_dir=str(tmp_path / "cache"), num_proc=1)
    return DataConfig(**(defaults | kw))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mlm_blocks_are_framed_and_cover_the_stream(tmp_path, family):
    data = MLMDataPipe(cfg(tmp_path), **FAMILIES[family].data).load(verbose=False)
    cls, sep, pad, mask = (data.tokenizer.token_to_id(t) for t in SPECIALS[family])
    assert (data.meta["cls_token_id"], data.meta["sep_token_id"], data.meta["pad_token_id"], data.meta["mask_token_id"]) == (cls, sep, pad, mask)
    assert pad == (0 if family == "bert" else 1)  # the ids the presets (and the real checkpoints) use
    blocks = [b.tolist() for b in data.splits["train"]["input_ids"]]
    assert all(b[0] == cls and b[-1] == sep for b in blocks)
    assert all(len(b) == 48 for b in blocks[:-1])
    inner = [t for b in blocks for t in b[1:-1]]
    assert inner.count(sep) == 150  # one separator per story in the stream
    tokenizer_kind = "wordpiece" if family == "bert" else "bpe-roberta"
    assert data.path.name.startswith(f"stories_{tokenizer_kind}400_bs48_")


def test_bert_tokenizer_is_a_lowercased_wordpiece(tmp_path):
    data = MLMDataPipe(cfg(tmp_path), tokenizer_kind="wordpiece").load(verbose=False)
    tokens = data.tokenizer.encode("Lily LOVED her red ball.", add_special_tokens=False).tokens
    assert "".join(t.removeprefix("##") for t in tokens) == "lilylovedherredball."  # lower-cased pieces
    assert data.tokenizer.decode(data.tokenizer.encode("the dog ran home").ids) == "the dog ran home"


def mlm_collator(**kw):
    defaults = dict(pad_token_id=0, mask_token_id=4, special_ids=(2, 3, 0, 4), vocab_size=1000)
    return MLMCollator(**(defaults | kw))


def test_masking_statistics_and_special_tokens_are_never_masked():
    torch.manual_seed(0)
    rows = [torch.cat([torch.tensor([2]), torch.randint(10, 1000, (200,)), torch.tensor([3])]) for _ in range(40)]
    rows.append(torch.tensor([2, 50, 3]))  # short: padded
    batch = mlm_collator()([{"input_ids": r} for r in rows])
    original = torch.zeros_like(batch["input_ids"])
    for i, r in enumerate(rows):
        original[i, : len(r)] = r
    chosen = batch["labels"] != IGNORE_INDEX
    real = (batch["attention_mask"] == 1) & ~torch.isin(original, torch.tensor([2, 3, 0, 4]))
    # only real, non-special tokens are chosen, and labels hold the original ids there
    assert not (chosen & ~real).any()
    assert torch.equal(batch["labels"][chosen], original[chosen])
    n_real, n_chosen = real.sum().item(), chosen.sum().item()
    assert abs(n_chosen / n_real - 0.15) < 0.02  # 8000 tokens: 3 sigma is about 0.012
    masked = (batch["input_ids"] == 4) & chosen
    unchanged = (batch["input_ids"] == original) & chosen
    randomized = chosen & ~masked & ~unchanged
    assert abs(masked.sum().item() / n_chosen - 0.8) < 0.05
    assert abs(unchanged.sum().item() / n_chosen - 0.1) < 0.04
    assert abs(randomized.sum().item() / n_chosen - 0.1) < 0.04
    # padding and specials pass through untouched
    assert torch.equal(batch["input_ids"][~real & (batch["attention_mask"] == 1)], original[~real & (batch["attention_mask"] == 1)])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_masks_are_fresh_each_call_unless_fixed():
    examples = [{"input_ids": torch.randint(10, 1000, (100,))} for _ in range(4)]
    free = mlm_collator(mlm_probability=0.3)
    assert not torch.equal(free(examples)["labels"], free(examples)["labels"])
    fixed = mlm_collator(mlm_probability=0.3, fixed_seed=7)
    a, b = fixed(examples), fixed(examples)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_mlm_probability_is_configurable():
    torch.manual_seed(1)
    examples = [{"input_ids": torch.randint(10, 1000, (500,))} for _ in range(8)]
    batch = mlm_collator(mlm_probability=0.4)(examples)
    assert abs((batch["labels"] != IGNORE_INDEX).float().mean().item() - 0.4) < 0.03


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_labelled_stories_are_truncated_and_mapped(tmp_path, family):
    data = ClassificationDataPipe(cfg(tmp_path, block_size=32), **FAMILIES[family].data).load(verbose=False)
    assert data.meta["label_names"] == ["happy", "sad", "surprised"]
    train = data.splits["train"]
    assert max(len(x) for x in train["input_ids"]) == 32  # stories are longer than 32 tokens: truncated
    assert {int(x) for x in train["label"]} == {0, 1, 2}
    cls, sep = data.meta["cls_token_id"], data.meta["sep_token_id"]
    assert all(x[0] == cls and x[-1] == sep for x in train["input_ids"])
    assert sum(data.meta["splits"]["train"]["examples_per_class"]) == 150


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_classification_from_a_local_file_with_named_columns(tmp_path):
    rows = [{"review": f"review {i} was {'good' if i % 2 else 'bad'}", "stars": "pos" if i % 2 else "neg"} for i in range(60)]
    source = write_jsonl(tmp_path / "reviews.jsonl", rows)
    c = cfg(tmp_path, source=source, text_column="review", label_column="stars", val_fraction=0.2)
    data = ClassificationDataPipe(c, tokenizer_kind="wordpiece").load(verbose=False)
    assert data.meta["label_names"] == ["neg", "pos"]
    example = data.splits["validation"][0]
    text = data.tokenizer.decode(example["input_ids"].tolist())
    assert ("good" in text) == (example["label"].item() == 1)
    # configured classes fix the order
    c2 = cfg(tmp_path, source=source, text_column="review", label_column="stars", label_names=["pos", "neg"])
    assert ClassificationDataPipe(c2, tokenizer_kind="wordpiece").load(verbose=False).meta["label_names"] == ["pos", "neg"]


def test_integer_labels(tmp_path):
    rows = [{"text": f"text number {i}", "label": i % 3} for i in range(30)]
    data = ClassificationDataPipe(cfg(tmp_path, source=write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer_kind="wordpiece").load(verbose=False)
    assert data.meta["label_names"] == ["0", "1", "2"]


@pytest.mark.parametrize(
    "rows, kw, message",
    [
        ([{"text": "a b", "label": "x"}] * 5 + [{"text": "c", "label": "y"}] * 5, {"label_names": ["x", "z"]},
         r"row \d+ of the \w+ split has label 'y', not one of the 2 classes"),
        ([{"text": "a b", "label": 0}] * 9 + [{"text": "  ", "label": 1}], {"val_fraction": 0.5}, r"row \d+ of the \w+ split has an empty text"),
        ([{"body": "a b", "label": 0}] * 10, {}, r"data.text_column: no column 'text'"),
        ([{"text": "a b", "y": 0}] * 10, {}, r"data.label_column: no column 'label'"),
    ],
)
def test_bad_classification_data_names_the_row_or_column(tmp_path, rows, kw, message):
    c = cfg(tmp_path, source=write_jsonl(tmp_path / "d.jsonl", rows), **kw)
    with pytest.raises(DataError, match=message):
        ClassificationDataPipe(c, tokenizer_kind="wordpiece").load(verbose=False)


def test_classification_collator_pads_with_an_attention_mask():
    batch = ClassificationCollator(pad_token_id=1)([
        {"input_ids": torch.tensor([0, 5, 6, 2]), "label": torch.tensor(1)},
        {"input_ids": torch.tensor([0, 7, 2]), "label": torch.tensor(0)},
    ])
    assert batch["input_ids"].tolist() == [[0, 5, 6, 2], [0, 7, 2, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_tokenizer_without_encoder_specials_is_rejected(tmp_path):
    from rafale.data.causal_lm import CausalLMDataPipe

    gpt_style = CausalLMDataPipe(cfg(tmp_path)).load(verbose=False).path / "tokenizer.json"
    with pytest.raises(DataError, match=r"data.tokenizer: the tokenizer has no \[CLS\] or <s> token"):
        MLMDataPipe(cfg(tmp_path, tokenizer=str(gpt_style)), tokenizer_kind="wordpiece").load(verbose=False)
