"""Masked language modelling (BERT, RoBERTa): documents joined by [SEP], cut into blocks of block_size - 2, each
framed by [CLS] ... [SEP] (rafale/data/encoder.py); the collator masks them afresh every batch.
"""

import hashlib
from dataclasses import dataclass, replace

import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer

from rafale.data.cache import IMAGE_FIELDS, LABEL_FIELDS
from rafale.data.causal_lm import TOKEN_FEATURES, chunk_into_blocks, describe_blocks
from rafale.data.encoder import EncoderDataPipe, pad_batch
from rafale.errors import IGNORE_INDEX


class MLMDataPipe(EncoderDataPipe):
    """Masked LM: documents joined by [SEP], cut into blocks of block_size - 2, each framed by [CLS] ... [SEP].

    Masking is the collator's job, so each epoch masks afresh."""

    name = "mlm"
    head = "mlm"
    # mlm_probability is the collator's (it masks each batch afresh), not the cache's
    not_in_cache = IMAGE_FIELDS | LABEL_FIELDS | {"mlm_probability"}

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        sep = meta["sep_token_id"]

        def tokenize(batch):
            encodings = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
            return {"input_ids": [e.ids + [sep] for e in encodings]}

        out = {}
        for split, ds in raw.items():
            tokenized = self._tokenize(ds, split, tokenize, TOKEN_FEATURES)
            blocks = chunk_into_blocks(tokenized.data.column("input_ids"), self.cfg.block_size - 2)
            framed = self.frame(blocks.to_pylist(), meta)
            out[split] = Dataset.from_dict({"input_ids": framed}, features=TOKEN_FEATURES)
        return DatasetDict(out)

    def _describe(self, ds: Dataset) -> dict:
        return describe_blocks(ds)

    def collator(self, meta: dict):
        return MLMCollator(
            pad_token_id=meta["pad_token_id"],
            mask_token_id=meta["mask_token_id"],
            special_ids=tuple(meta[k] for k in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id")),
            vocab_size=meta["vocab_size"],
            mlm_probability=self.cfg.mlm_probability,
        )


@dataclass
class MLMCollator:
    """Pad blocks and mask them (BERT): `mlm_probability` of the non-special tokens are chosen; of those 80%
    become the mask token, 10% a random token, 10% stay. Labels hold the original ids there, IGNORE_INDEX elsewhere.

    Fresh masks each call (training), unless `fixed_seed` is set (DEBUG=1: the target must not move), or
    `per_example` is (evaluation, see `for_evaluation`): each example's masks come from its own tokens, so every
    evaluation scores the same masks and leaves the global RNG, which training draws from, alone."""

    pad_token_id: int
    mask_token_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    mlm_probability: float = 0.15
    fixed_seed: int | None = None
    per_example: bool = False

    def for_evaluation(self) -> "MLMCollator":
        return replace(self, per_example=True)

    def __call__(self, examples: list[dict]) -> dict:
        input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], self.pad_token_id)
        special = torch.isin(input_ids, torch.tensor(self.special_ids)) | (attention_mask == 0)
        probability = torch.full(input_ids.shape, self.mlm_probability).masked_fill(special, 0.0)
        if self.per_example and self.fixed_seed is None:
            chosen, roll, random_ids = self._draw_per_example(probability, attention_mask.sum(dim=1).tolist(), input_ids)
        else:
            generator = None if self.fixed_seed is None else torch.Generator().manual_seed(self.fixed_seed)
            chosen, roll, random_ids = self._draw(probability, generator)
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        to_mask = chosen & (roll < 0.8)
        to_random = chosen & (roll >= 0.8) & (roll < 0.9)
        input_ids = torch.where(to_mask, self.mask_token_id, torch.where(to_random, random_ids, input_ids))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _draw(self, probability, generator):
        """Which positions are chosen, the roll that picks mask/random/keep, and the random ids: each (B, T)."""
        chosen = torch.bernoulli(probability, generator=generator).bool()
        roll = torch.rand(probability.shape, generator=generator)
        random_ids = torch.randint(self.vocab_size, probability.shape, generator=generator)
        return chosen, roll, random_ids

    def _draw_per_example(self, probability, lengths: list[int], input_ids):
        """`_draw` row by row, each row seeded by a hash of its unpadded tokens (whatever batch it lands in)."""
        chosen = torch.zeros(probability.shape, dtype=torch.bool)
        roll = torch.ones(probability.shape)
        random_ids = torch.zeros(probability.shape, dtype=torch.long)
        for i, n in enumerate(lengths):
            tokens = input_ids[i, :n].numpy().astype("int64").tobytes()
            seed = int.from_bytes(hashlib.sha256(tokens).digest()[:8], "little") >> 1  # manual_seed wants < 2**63
            drawn = self._draw(probability[i, :n], torch.Generator().manual_seed(seed))
            for full, part in zip((chosen, roll, random_ids), drawn):
                full[i, :n] = part
        return chosen, roll, random_ids
