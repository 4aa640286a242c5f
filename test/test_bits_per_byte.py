"""Bits per byte against its definition: summed nats over (ln 2 x the UTF-8 bytes of the text), counted from the
text itself, for byte-level BPE (rafale's trained one and, when present, Pythia's) and WordPiece."""

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from rafale.config import DataConfig
from rafale.data.tokenizers import train_tokenizer
from rafale.metrics import BitsPerByte
from rafale.models.token_bytes import token_bytes
from conftest import SHARED_DATA

TEXTS = ["Tom had a red ball.", "Lily said: «où est le café?» 😀", "Ã¢â‚¬Å“mojibake stays bytesÃ¢â‚¬Â", "tabs\tand\nnewlines"]


def trained(kind):
    from datasets import Dataset

    return train_tokenizer(Dataset.from_dict({"text": TEXTS * 20}), 300, kind)


TOKENIZERS = {"bpe": lambda: trained("bpe"), "wordpiece": lambda: trained("wordpiece")}
if (SHARED_DATA / "pythia-tokenizer" / "tokenizer.json").is_file():
    TOKENIZERS["pythia"] = lambda: Tokenizer.from_file(str(SHARED_DATA / "pythia-tokenizer" / "tokenizer.json"))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_token_bytes_add_up_to_the_texts_utf8_length(name):
    tokenizer = TOKENIZERS[name]()
    sizes = token_bytes(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        expected = len(text.encode("utf-8"))
        if name == "wordpiece":  # WordPiece covers the normalised text (lower case, no accents) without whitespace
            expected = len("".join(tokenizer.normalizer.normalize_str(text).split()).encode("utf-8"))
        assert int(sizes[ids].sum()) == expected, (text, ids)
    special = tokenizer.token_to_id("<|endoftext|>")
    if special is not None:
        assert sizes[special] == 0


def test_bits_per_byte_is_summed_nats_over_ln2_bytes():
    tokenizer = trained("bpe")
    eos = tokenizer.token_to_id("<|endoftext|>")
    stream = [t for text in TEXTS for t in tokenizer.encode(text).ids + [eos]]
    labels = torch.tensor(stream[1:] + [-100]).view(1, -1)
    logits = torch.randn(1, labels.shape[1], tokenizer.get_vocab_size(), generator=torch.Generator().manual_seed(0))
    metric = BitsPerByte(token_bytes(tokenizer))
    half = labels.shape[1] // 2  # two updates, as two batches would
    metric.update(logits[:, :half], labels[:, :half])
    metric.update(logits[:, half:], labels[:, half:])
    nats = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    covered = sum(len(t.encode("utf-8")) for t in TEXTS) - len(tokenizer.decode([stream[0]]).encode())  # the first token is never a label
    assert float(metric.compute()) == pytest.approx(float(nats) / (math.log(2) * covered), rel=1e-6)
