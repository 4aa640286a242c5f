"""How many bytes of text each token id stands for: the table validation's bits per byte divides by
(rafale.metrics.BitsPerByte, built with a causal LM's Composer wrapper) and `rafale score` too. Kept apart from
rafale.metrics, which imports torchmetrics, so `rafale score` starts without it; it reads the tokenizer object only.
"""

import json

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


def token_bytes(tokenizer) -> torch.Tensor:
    """(vocab_size,) int64: how many UTF-8 bytes of text each token id stands for: what it decodes to.

    Special tokens (<|endoftext|>) cover no text: 0. Added tokens that are not special (GPT-NeoX's 23 runs of 2 to
    24 spaces, ids 50254-50276) are literal text, matched before the byte-level step: the UTF-8 length of their
    content. Byte-level BPE's own entries (GPT-2, GPT-NeoX, RoBERTa, rafale's) are exact: each character of a
    token is one byte. Other tokenizers (WordPiece) decode each token alone, which is exact for whole characters."""
    spec = json.loads(tokenizer.to_str())
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    alphabet = byte_level_alphabet()
    sizes = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.long)
    for token, i in tokenizer.get_vocab().items():
        if i >= len(sizes):
            continue
        if i in added:
            sizes[i] = 0 if added[i].get("special") else len(added[i]["content"].encode("utf-8"))
        elif byte_level:
            sizes[i] = sum(1 for c in token if c in alphabet)
        else:
            sizes[i] = len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return sizes
