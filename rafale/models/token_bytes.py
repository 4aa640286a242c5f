"""How many bytes of text each token covers: the id table validation's bits per byte divides by
(`token_bytes`, for rafale.metrics.BitsPerByte, built with a causal LM's Composer wrapper: validation sees ids, not
text) and the count from the text `rafale score` makes for every kind of tokenizer (`TextBytes`, from the tokens'
offsets). Kept apart from rafale.metrics, which imports torchmetrics, so `rafale score` starts without it; it reads
the tokenizer object only.

The convention: a document's bytes are shared out among its tokens, so that they add up to len(text.encode())
less the text of special tokens spelled out in it. Each token covers its own text and the whitespace before it
(as byte-level BPE's "Ġword" does), so WordPiece's "cafe" covers " Café", 6 bytes, whatever its normalizer made
of it; the first token also covers the document's leading whitespace, the last its trailing whitespace. Special
tokens (<|endoftext|>, [SEP], and such a token spelled in the text) cover nothing: 0. A space that a byte-level
pre-tokenizer adds before a document's first word (`add_prefix_space`) is not the document's: its first token
covers one byte less than its length (`adds_prefix_space`; validation takes it off the token after each
end-of-text).
"""

import json

import numpy as np
import torch


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


def special_tokens(tokenizer) -> dict[int, str]:
    """id -> text of the tokenizer's special tokens (an encoding's special_tokens_mask misses those spelled in a text)."""
    return {i: token.content for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}


def token_bytes(tokenizer) -> torch.Tensor | None:
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


def adds_prefix_space(tokenizer) -> bool:
    """Whether the tokenizer's byte-level pre-tokenizer puts a space before a document's first word
    (`add_prefix_space: true`, as GPT-2's and RoBERTa's tokenizers may): "Hello" is encoded as "ĠHello", whose
    table length counts a byte the document does not have. rafale's own tokenizers add none."""
    spec = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    return any(part.get("type") == "ByteLevel" and part.get("add_prefix_space") for part in parts)


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

    def __init__(self, tokenizer):
        self.table = token_bytes(tokenizer)
        self.lengths = None if self.table is None else self.table.tolist()
        self.specials = special_tokens(tokenizer)
        self.prefix_space = adds_prefix_space(tokenizer)
        # the post-processor adds nothing without special tokens, but trims whitespace off byte-level offsets
        # (GPT-NeoX's "ĊĠ" would cover only the newline): offsets without it, the same ids
        self.tokenizer = type(tokenizer).from_str(tokenizer.to_str())  # a tokenizers.Tokenizer
        self.tokenizer.post_processor = None

    def __call__(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(encoding.ids, self.shares(text, encoding))
                for text, encoding in zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False))]

    def shares(self, text: str, encoding) -> list[int]:
        at = byte_offsets(text).tolist()  # (a list: indexing it is much faster than an array's)
        shares, cursor, last = [], 0, None
        # the space the pre-tokenizer puts before a text that does not start with one is in the first token's
        # length but not in the text (its offsets give it the text's first character, so it is capped here)
        added_space = 1 if self.prefix_space and not text.startswith(" ") else 0
        for i, (token, (start, stop)) in enumerate(zip(encoding.ids, encoding.offsets)):
            end = at[stop]  # in bytes
            if token in self.specials and text[start:stop] == self.specials[token]:
                shares.append(0)
                cursor = max(cursor, end)  # its text is not counted
                continue
            share = max(0, end - cursor)
            if self.lengths is not None:
                share = min(share, self.lengths[token] - added_space)
            added_space = 0
            shares.append(share)
            cursor += share
            last = i
        if last is not None:
            shares[last] += at[-1] - cursor  # trailing whitespace, and what a byte-level normalizer grew
        return shares


def covered_bytes(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """[(ids, bytes)] of each text: how many UTF-8 bytes of it each token covers (`TextBytes`)."""
    return TextBytes(tokenizer)(texts)
