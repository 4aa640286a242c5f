"""Tokenizers: the one a datapipe tokenizes with, trained here on the training split (data.tokenizer: train), read
from a tokenizers JSON file, or loaded from the hub (hf:<name>).

The kind a `train` tokenizer is (`tokenizer_kind`, which the model side hands the datapipe) fixes its model and
its special tokens: "bpe" (byte-level BPE, Pythia's <|endoftext|> <|padding|>), "wordpiece" (BERT's lower-cased
WordPiece, [PAD] [UNK] [CLS] [SEP] [MASK]) or "bpe-roberta" (byte-level BPE with RoBERTa's <s> <pad> </s> <unk>
<mask>), in the ids of those models' own tokenizers. `tokenizer_identity` and `tokenizer_name` are what the cache's
fingerprint and folder name take of a tokenizer (rafale/data/cache.py).
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rafale.config import DataConfig
from rafale.data.sources import safe_name
from rafale.errors import DataError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]")


def tokenizer_identity(cfg: DataConfig, kind: str = "bpe") -> list:
    if cfg.tokenizer == "train":
        return [kind, cfg.vocab_size]
    if cfg.tokenizer.startswith("hf:"):
        return [cfg.tokenizer]
    return [hashlib.sha256(Path(cfg.tokenizer).expanduser().read_bytes()).hexdigest()]


def tokenizer_name(cfg: DataConfig, kind: str = "bpe", vocab_size: int | None = None) -> str:
    """The tokenizer's part of a cache folder's name; a trained one by its size, `vocab_size` once trained
    (the trainer may learn fewer tokens than data.vocab_size asks for)."""
    if cfg.tokenizer == "train":
        return f"{kind}{vocab_size or cfg.vocab_size}"
    if cfg.tokenizer.startswith("hf:"):
        return safe_name(cfg.tokenizer[3:].replace("/", "--"))
    path = Path(cfg.tokenizer)
    return safe_name(path.parent.name if path.stem == "tokenizer" else path.stem)


# special tokens of the tokenizers trained here, in id order: the ids of Pythia's, BERT's and RoBERTa's own
TRAINED_SPECIALS = {
    "bpe": ["<|endoftext|>", "<|padding|>"],
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "bpe-roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
}


def train_tokenizer(texts: Dataset, vocab_size: int, kind: str = "bpe") -> Tokenizer:
    """A tokenizer trained on `texts`: byte-level BPE (GPT-2 / GPT-NeoX / RoBERTa) or lower-cased WordPiece (BERT)."""
    specials = TRAINED_SPECIALS[kind]
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=sys.stderr.isatty()
        )
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=sys.stderr.isatty(),
        )
    batches = (texts[i : i + 1000]["text"] for i in range(0, len(texts), 1000))
    tokenizer.train_from_iterator(batches, trainer, length=len(texts))
    if kind != "bpe":
        tokenizer.post_processor = encoder_post_processor(kind)
    return tokenizer


def encoder_post_processor(kind: str):
    """The framing BERT's and RoBERTa's own tokenizers add (`encode(text)`, HF's `tokenizer(text)`), so that the
    exported tokenizer gives the ids the model was trained on (the decoder's BPE adds nothing, as Pythia's).
    The datapipes encode with add_special_tokens=False and frame by hand (blocks of several documents)."""
    ids = {token: i for i, token in enumerate(TRAINED_SPECIALS[kind])}
    if kind == "wordpiece":
        return processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
    if kind == "bpe-roberta":  # <s> A </s> and <s> A </s></s> B </s>, as roberta-base's tokenizer.json
        return processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"]), add_prefix_space=False)
    raise ValueError(f"no post-processor for a {kind} tokenizer")


def smallest_vocabulary(kind: str, size: int) -> str:
    """What the smallest vocabulary of a `kind` tokenizer trained here is made of, `size` tokens in all: the
    trainer always keeps its whole alphabet (every byte for byte-level BPE; for WordPiece every character of the
    training text, and as '##c' each that continues a word) and its special tokens, so data.vocab_size below that
    gets that."""
    specials = len(TRAINED_SPECIALS[kind])
    if kind == "wordpiece":
        return (f"the smallest a WordPiece tokenizer can be is the characters of the corpus, with their ## "
                f"continuation forms ({size - specials:,}), plus its {specials} special tokens: {size:,}")
    return f"the smallest a byte-level BPE can be is its byte alphabet (256) plus its {specials} special tokens: {size:,}"


def warn_if_smaller(trained: int, asked: int, kind: str):
    """Say when the trainer learned another number of tokens than data.vocab_size asks for: fewer (it ran out of
    merges) or more (the size asked is below the smallest possible). The model and the cache name use the size it
    got, and a researcher comparing vocabulary sizes must know."""
    if trained < asked:
        print(f"rafale: warning: data.vocab_size asks for {asked:,} tokens but the {kind} tokenizer trained on this "
              f"data has {trained:,} (the trainer ran out of merges); using {trained:,}")
    elif trained > asked:
        print(f"rafale: warning: data.vocab_size asks for {asked:,} tokens but {smallest_vocabulary(kind, trained)}; "
              f"using {trained:,}")


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizers JSON file, or 'hf:<name>' from the hub."""
    if spec.startswith("hf:"):
        try:
            return Tokenizer.from_pretrained(spec[3:])
        except Exception as err:
            raise DataError(f"data.tokenizer: could not load hub tokenizer '{spec[3:]}' (needs internet): {err}") from None
    try:
        return Tokenizer.from_file(str(Path(spec).expanduser()))
    except Exception as err:
        raise DataError(f"data.tokenizer: {spec} is not a tokenizers JSON file: {err}") from None


def special_token_ids(tokenizer: Tokenizer, where: str) -> tuple[int, int]:
    """(end-of-text id, padding id); padding falls back to end-of-text (padded labels are ignored anyway)."""
    vocab = tokenizer.get_vocab()
    eos = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise DataError(f"{where}: the tokenizer has no end-of-text token; expected one of {list(EOS_CANDIDATES)}")
    pad = next((vocab[t] for t in PAD_CANDIDATES if t in vocab), eos)
    return eos, pad


# ----------------------------------------------------------------------------------------------------
# how many bytes of text each token covers (rafale score's bits per byte, validation's for byte-level BPE)
#
# The convention: a document's bytes are shared out among its tokens, so that they add up to len(text.encode())
# less the text of special tokens spelled out in it. Each token covers its own text and the whitespace before it
# (as byte-level BPE's "Ġword" does), so WordPiece's "cafe" covers " Café", 6 bytes, whatever its normalizer made
# of it; the first token also covers the document's leading whitespace, the last its trailing whitespace. Special
# tokens (<|endoftext|>, [SEP], and such a token spelled in the text) cover nothing: 0.


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character: that character -> its byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def special_tokens(tokenizer: Tokenizer) -> dict[int, str]:
    """id -> text of the tokenizer's special tokens (an encoding's special_tokens_mask misses those spelled in a text)."""
    return {i: token.content for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}


def token_bytes(tokenizer: Tokenizer) -> torch.Tensor | None:
    """(vocab_size,) int64: how many UTF-8 bytes of text each token id stands for, for a byte-level BPE (GPT-2,
    GPT-NeoX, RoBERTa, rafale's "bpe" and "bpe-roberta"); None for any other kind.

    Byte-level BPE writes each byte of the text as one character of a token, so a token's length is exact without
    its text: this is what validation's BitsPerByte takes, seeing only the ids of its blocks. Special tokens cover
    no text: 0. Added tokens that are not special (GPT-NeoX's 23 runs of 2 to 24 spaces, ids 50254-50276) are
    literal text, matched before the byte-level step: their content's UTF-8 length. A normalizer runs first
    (GPT-NeoX's NFC): the table counts the normalised text's bytes, the same on NFC text, as nearly all text is.
    Other kinds have no such table: WordPiece's "##e" is 1 byte of text but 3 when decoded alone, and its
    normalizer lower-cases and strips accents ("café" -> "cafe"); their bytes come from the text (`covered_bytes`)."""
    spec = json.loads(tokenizer.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    alphabet = byte_level_alphabet()
    sizes = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.long)
    for token, i in tokenizer.get_vocab().items():
        if i >= len(sizes):
            continue
        if i in added:
            sizes[i] = 0 if added[i].get("special") else len(added[i]["content"].encode("utf-8"))
        else:
            sizes[i] = sum(1 for c in token if c in alphabet)
    return sizes


def byte_offsets(text: str) -> np.ndarray:
    """(len(text) + 1,) int64: the UTF-8 byte offset of each character offset of `text` (the tokenizers library's
    offsets count characters)."""
    code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    lengths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


class TextBytes:
    """How many UTF-8 bytes of a text each of its tokens covers, by the convention above, from the tokens' offsets:
    `TextBytes(tokenizer)(texts)` -> [(ids, bytes)] of each text encoded without special tokens (as the datapipes
    encode it). Built once per tokenizer (its byte table takes a second for a 50k vocabulary).

    Each token covers from where the previous one stopped to the end of its own offsets. The offsets count
    characters, and a byte-level BPE cuts characters into bytes: its pieces of "😀" all have the offsets of the
    whole character, and a token may end inside a character ("±ä" ends in 東 and starts 京). So a byte-level
    token covers at most its own length (`token_bytes`), which is exact; what a normalizer grew is given to the
    tokens after it, and what is left at the end to the last token, so the sum is always the text's. A special
    token spelled in the text covers nothing; an unknown token ([UNK], special too) covers its text."""

    def __init__(self, tokenizer: Tokenizer):
        self.table = token_bytes(tokenizer)
        self.lengths = None if self.table is None else self.table.tolist()
        self.specials = special_tokens(tokenizer)
        # the post-processor adds nothing without special tokens, but trims whitespace off byte-level offsets
        # (GPT-NeoX's "ĊĠ" would cover only the newline): offsets without it, the same ids
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.post_processor = None

    def __call__(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(encoding.ids, self.shares(text, encoding))
                for text, encoding in zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False))]

    def shares(self, text: str, encoding) -> list[int]:
        at = byte_offsets(text).tolist()  # (a list: indexing it is much faster than an array's)
        shares, cursor, last = [], 0, None
        for i, (token, (start, stop)) in enumerate(zip(encoding.ids, encoding.offsets)):
            end = at[stop]  # in bytes
            if token in self.specials and text[start:stop] == self.specials[token]:
                shares.append(0)
                cursor = max(cursor, end)  # its text is not counted
                continue
            share = max(0, end - cursor)
            if self.lengths is not None:
                share = min(share, self.lengths[token])
            shares.append(share)
            cursor += share
            last = i
        if last is not None:
            shares[last] += at[-1] - cursor  # trailing whitespace, and what a byte-level normalizer grew
        return shares


def covered_bytes(tokenizer: Tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """[(ids, bytes)] of each text: how many UTF-8 bytes of it each token covers (`TextBytes`)."""
    return TextBytes(tokenizer)(texts)
