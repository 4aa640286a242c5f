"""Sequence classification (BERT, RoBERTa): each text truncated to block_size with its framing
(rafale/data/encoder.py), and its class id; the collator pads them.
"""

from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value
from tokenizers import Tokenizer

from rafale.data.cache import IMAGE_FIELDS, counted
from rafale.data.encoder import EncoderDataPipe, pad_batch
from rafale.errors import DataError
from rafale.progress import Progress


class ClassificationDataPipe(EncoderDataPipe):
    """Sequence classification: each text truncated to block_size (framing included), with its class id.

    Labels may be class ids or names; names map to ids through data.label_names, or sorted when it is not set.
    The mapping is saved in the cache's rafale.json (and the run folder's labels.json)."""

    name = "classification"
    head = "classification"
    labelled = True
    not_in_cache = IMAGE_FIELDS | {"mlm_probability"}  # neither read here

    def label_names(self, raw: DatasetDict) -> list[str]:
        if self.cfg.label_names is not None:
            return list(self.cfg.label_names)
        labels = set(raw["train"]["label"])
        if all(isinstance(x, str) for x in labels):
            return sorted(labels)
        if all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in labels):
            return [str(i) for i in range(max(labels) + 1)]
        raise DataError(f"data.label_column: labels must be class names or ids >= 0, got {sorted(map(repr, labels))[:5]}")

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        names = self.label_names(raw)
        ids_of = {name: i for i, name in enumerate(names)}
        max_tokens = self.cfg.block_size - 2
        meta["label_names"] = names

        def label_id(label, row: int, split: str) -> int:
            if isinstance(label, str) and label in ids_of:
                return ids_of[label]
            if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
                return label
            raise DataError(
                f"data.label_column: row {row} of the {split} split has label {label!r}, not one of the "
                f"{len(names)} classes {names} (set data.label_names to list them)"
            )

        out = {}
        for split, ds in raw.items():

            def tokenize(batch, indices):
                for text, row in zip(batch["text"], indices):
                    if not isinstance(text, str) or not text.strip():
                        raise DataError(f"data.text_column: row {row} of the {split} split has an empty text")
                encodings = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
                return {
                    "input_ids": self.frame([e.ids[:max_tokens] for e in encodings], meta),
                    "label": [label_id(x, row, split) for x, row in zip(batch["label"], indices)],
                }

            features = Features({"input_ids": Sequence(Value("int32")), "label": Value("int64")})
            with Progress(f"tokenizing {split}", total=len(ds), unit="examples") as progress:
                out[split] = ds.map(
                    counted(tokenize, progress), batched=True, with_indices=True, remove_columns=ds.column_names,
                    features=features, load_from_cache_file=False, keep_in_memory=True,
                )
        return DatasetDict(out)

    def _describe(self, ds: Dataset) -> dict:
        counts = np.bincount(np.asarray(ds.data.column("label")))
        tokens = sum(len(chunk.flatten()) for chunk in ds.data.column("input_ids").chunks)
        return {"examples": len(ds), "examples_per_class": counts.tolist(), "tokens": tokens}

    def collator(self, meta: dict):
        return ClassificationCollator(pad_token_id=meta["pad_token_id"])


@dataclass
class ClassificationCollator:
    """Pad texts with an attention mask; labels (B,) are class ids."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], self.pad_token_id)
        labels = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
