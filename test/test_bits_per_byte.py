"""Bits per byte against its definition: summed nats over (ln 2 x the UTF-8 bytes of the text), the bytes counted
from the text itself, for every kind of tokenizer rafale trains or loads: byte-level BPE (rafale's "bpe" and
"bpe-roberta", a Pythia-like one with an NFC normalizer and added runs of spaces), WordPiece (BERT's lower-casing,
accent-stripping one) and a SentencePiece-style BPE (Metaspace); all trained or built here."""

import functools
import math
import unicodedata

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rafale.config import DataConfig
from rafale.data.tokenizers import train_tokenizer
from rafale.metrics import BitsPerByte
from rafale.models.token_bytes import TextBytes, covered_bytes, token_bytes

# non-ASCII on purpose: accents (in NFC, and one in NFD), an emoji, CJK, mojibake, tabs, newlines, runs of spaces
TEXTS = ["Tom had a red ball.", "Lily said: «où est le café?» 😀", "東京タワーは高い。", "Ã¢â‚¬Å“mojibake stays bytesÃ¢â‚¬Â",
         "tabs\tand\nnewlines", "def f(x):\n        return x", "The end.\n \nThe. \n  A", " leading and trailing  ",
         unicodedata.normalize("NFD", "Zoë a mangé une crème brûlée")]


@functools.cache  # each kind trained once for the whole file
def trained(kind):
    return train_tokenizer(Dataset.from_dict({"text": TEXTS * 20}), 300, kind)


@functools.cache
def pythia_like():
    """A byte-level BPE built as GPT-NeoX's: NFC normalizer, special tokens, added plain-text runs of spaces, and
    a post-processor that trims whitespace off the offsets ("\n " would seem to cover only the newline)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    tokenizer.add_tokens([AddedToken(" " * n, normalized=True) for n in range(8, 1, -1)])
    return tokenizer


@functools.cache
def metaspace():
    """A SentencePiece-style BPE (Llama's kind of tokenizer.json): NFKC, '▁' for spaces, an <unk>."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(TEXTS[:3] * 20, trainer)  # not every character: some are <unk>
    return tokenizer


@functools.cache
def prefix_space():
    """A byte-level BPE whose pre-tokenizer adds a space before each document (`add_prefix_space: true`, as GPT-2's
    and RoBERTa's tokenizers may): "Tom had" is encoded as "ĠTom", "Ġhad", one byte more than the text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    return tokenizer


TOKENIZERS = {"bpe": lambda: trained("bpe"), "bpe-roberta": lambda: trained("bpe-roberta"),
              "wordpiece": lambda: trained("wordpiece"), "pythia-like": pythia_like, "metaspace": metaspace,
              "prefix-space": prefix_space}
BYTE_LEVEL = ("bpe", "bpe-roberta", "pythia-like")


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_covered_bytes_add_up_to_the_texts_utf8_length(name):
    tokenizer = TOKENIZERS[name]()
    for text, (ids, sizes) in zip(TEXTS, covered_bytes(tokenizer, TEXTS)):
        assert ids == tokenizer.encode(text, add_special_tokens=False).ids
        assert sum(sizes) == len(text.encode("utf-8")), (name, text, sizes)
        assert min(sizes) >= 0
    if name == "metaspace":  # its unknown characters are <unk>, special, but covering text
        assert tokenizer.token_to_id("<unk>") in tokenizer.encode(TEXTS[3]).ids


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_byte_level_tokens_cover_their_own_length_which_validation_takes(name):
    """On NFC text a byte-level token covers exactly its own bytes (the pieces of 😀 and of 東京 included), so
    validation's table (ids only) and rafale score's count (from the text) agree token by token."""
    tokenizer = TOKENIZERS[name]()
    table = token_bytes(tokenizer)
    nfc = [unicodedata.normalize("NFC", text) for text in TEXTS]
    for text, (ids, sizes) in zip(nfc, covered_bytes(tokenizer, nfc)):
        assert sizes == table[ids].tolist(), text
    # an NFD text: the NFC normalizer makes "ë" of "e" + U+0308 (3 bytes -> 2); the text's bytes are still counted
    ids, sizes = covered_bytes(tokenizer, [TEXTS[-1]])[0]
    assert sum(sizes) == len(TEXTS[-1].encode())
    if name == "pythia-like":
        assert int(table[ids].sum()) < len(TEXTS[-1].encode())


def test_wordpiece_tokens_cover_the_text_not_their_decoded_form():
    """The issue's two errors, by hand: a '##' continuation decoded alone counts 2 bytes that are not in the text,
    and the lower-casing, accent-stripping normalizer makes 'Café' 'cafe', one byte short. Each token covers its
    own text and the whitespace before it."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "caf", "##e", "!"])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    text = "Un  Café! 😀"
    ids, sizes = covered_bytes(tokenizer, [text])[0]
    assert [tokenizer.id_to_token(i) for i in ids] == ["un", "caf", "##e", "!", "[UNK]"]
    assert sizes == [len("Un".encode()), len("  Caf".encode()), len("é".encode()), 1, len(" 😀".encode())]
    assert sum(sizes) == len(text.encode()) == 15
    assert token_bytes(tokenizer) is None  # no table from ids alone: validation reports no BitsPerByte


@pytest.mark.parametrize("name", ["bpe", "pythia-like"])
def test_special_tokens_cover_nothing(name):
    """<|endoftext|> covers 0 bytes, in the table and spelled out in a text (whose text is then not counted)."""
    tokenizer = TOKENIZERS[name]()
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert token_bytes(tokenizer)[eos] == 0
    text = "one 😀<|endoftext|> two"
    ids, sizes = covered_bytes(tokenizer, [text])[0]
    assert eos in ids and sizes[ids.index(eos)] == 0
    assert sum(sizes) == len(text.encode()) - len("<|endoftext|>")


@pytest.mark.parametrize("kind, task", [("wordpiece", "mlm"), ("bpe-roberta", "mlm"), ("bpe", "causal_lm")])
def test_scores_bytes_of_the_datapipes_blocks_add_up_to_the_file(kind, task, tmp_path):
    """rafale score's count on the blocks a datapipe cuts (documents joined by <|endoftext|> or [SEP], blocks framed
    by [CLS] ... [SEP]): every byte of every document once, the special tokens none."""
    from rafale.data import DATAPIPES
    from rafale.score import bytes_of_blocks

    tokenizer = trained(kind)
    pipe = DATAPIPES[task](DataConfig(block_size=16), tokenizer_kind=kind)
    pipe.scratch = tmp_path
    meta = {"vocab_size": tokenizer.get_vocab_size(), **pipe.special_ids(tokenizer)}
    blocks = pipe._prepare(DatasetDict({"file": Dataset.from_dict({"text": TEXTS})}), tokenizer, meta)["file"]
    sizes = bytes_of_blocks(blocks, TEXTS, TextBytes(tokenizer))
    assert [len(s) for s in sizes] == [len(b) for b in blocks["input_ids"]]
    assert sum(map(sum, sizes)) == sum(len(t.encode()) for t in TEXTS)


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


def test_validation_counts_a_document_s_own_bytes_not_the_space_its_tokenizer_adds():
    """Issue 34, 1.6: validation's bits per byte of a known model against the hand count, total nats / ln 2 / the
    documents' UTF-8 bytes (less those of each block's first token, which is not predicted), and against the bytes
    `rafale score` counts in the text (TextBytes). The documents are stripped, as rafale's sources strip them."""
    import copy

    from rafale.data.causal_lm import CausalLMCollator
    from rafale.models.pythia import PRESETS, build

    tokenizer = prefix_space()
    docs = [text.strip() for text in TEXTS]
    eos, pad = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|padding|>")
    encoded = [tokenizer.encode(doc, add_special_tokens=False).ids for doc in docs]
    assert all(tokenizer.id_to_token(ids[0]).startswith("Ġ") for ids in encoded)  # the space it adds
    stream = [t for ids in encoded for t in ids + [eos]]  # as the causal LM datapipe joins them
    torch.manual_seed(0)
    model = build(copy.deepcopy(PRESETS["pythia-debug"]), "causal_lm",
                  {"vocab_size": tokenizer.get_vocab_size(), "eos_token_id": eos}, tokenizer)
    metric = model.val_metrics["BitsPerByte"]
    T = 16
    blocks = [stream[start : start + T] for start in range(0, len(stream), T)]
    batch = CausalLMCollator(pad_token_id=pad)([{"input_ids": torch.tensor(block)} for block in blocks])
    logits = model.eval_forward(batch)
    model.update_metric(batch, logits, metric)
    nats = float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"))

    # by hand: each block's first token is not predicted; one that starts a document (the first block's, or one
    # after an end-of-text) covers its length less the added space, any other its length (the eos none)
    def unpredicted_bytes(position: int) -> int:
        token = stream[position]
        if token == eos:
            return 0
        size = len(tokenizer.id_to_token(token))  # byte-level: one character a byte (decoding a piece of "東" alone would not be)
        return size - 1 if position == 0 or stream[position - 1] == eos else size

    by_hand = sum(len(doc.encode("utf-8")) for doc in docs) - sum(map(unpredicted_bytes, range(0, len(stream), T)))
    assert int(metric.bytes) == by_hand
    assert float(metric.compute()) == pytest.approx(nats / (math.log(2) * by_hand), rel=1e-6)  # fp32 sums
    # rafale score's count: the bytes TextBytes finds in the text for each predicted token
    text_sizes = [size for ids, sizes in TextBytes(tokenizer)(docs) for size in sizes + [0]]
    predicted = [size for position, size in enumerate(text_sizes) if position % T]
    assert sum(predicted) == by_hand


def test_validation_reports_bits_per_byte_only_where_its_table_is_exact():
    """Validation sees ids, not text: a decoder with a byte-level BPE gets BitsPerByte from the id table (exact);
    with a WordPiece tokenizer file it gets none (the table would count '##' and lose accents), not a wrong one."""
    import copy

    from rafale.models.pythia import PRESETS, build

    for kind, expected in (("bpe", True), ("wordpiece", False)):
        tokenizer = trained(kind)
        model = build(copy.deepcopy(PRESETS["pythia-debug"]), "causal_lm", {"vocab_size": tokenizer.get_vocab_size()},
                      tokenizer)
        assert ("BitsPerByte" in model.val_metrics) == expected, kind
