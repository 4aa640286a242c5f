"""Causal language modelling (Pythia): documents joined by the end-of-text token, cut into blocks of block_size;
the collator shifts the labels by one.

The datapipe streams instead of holding a split in memory: a .txt source is copied in pieces to an Arrow file
(rafale/data/sources.py), documents are tokenized a batch at a time, and the blocks are written a shard at a time
straight into the cache folder's layout (`BlockWriter`, then `save_split` moves the file into place). The block
helpers here (`chunk_into_blocks`, `describe_blocks`) serve the MLM datapipe too.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value
from tokenizers import Tokenizer

from rafale.data.cache import IMAGE_FIELDS, LABEL_FIELDS, DataPipe
from rafale.errors import IGNORE_INDEX, DataError
from rafale.progress import Progress

TOKEN_FEATURES = Features({"input_ids": Sequence(Value("int32"))})  # a split of blocks (causal LM, MLM)
INT32_MAX = 2**31 - 1  # an Arrow list's offsets are int32: one list array holds at most this many values


def block_chunks(num_tokens: int, block_size: int, max_chunk_tokens: int = INT32_MAX) -> list[tuple[int, int]]:
    """(start, stop) token ranges that cover [0, num_tokens), each a whole number of blocks (the last may end
    with a short one) and at most max_chunk_tokens long, so that each range's block offsets fit in int32."""
    step = max(1, max_chunk_tokens // block_size) * block_size
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def chunk_into_blocks(token_lists: pa.ChunkedArray, block_size: int, max_chunk_tokens: int = INT32_MAX) -> pa.ChunkedArray:
    """Concatenate token lists into one stream and cut it every block_size tokens (the last block may be short).

    The blocks come as several list arrays when the stream is longer than int32 offsets can address (2^31 tokens);
    the column type stays list<int32>, so the datasets features and the collators are the same."""
    # flatten chunk by chunk: combining the lists first would need offsets past int32 on a large split
    pieces = [chunk.flatten() for chunk in token_lists.chunks]
    stream = pa.concat_arrays(pieces) if pieces else pa.array([], pa.int32())
    lists = []
    for start, stop in block_chunks(len(stream), block_size, max_chunk_tokens):
        offsets = np.append(np.arange(0, stop - start, block_size), stop - start)
        lists.append(pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), stream.slice(start, stop - start)))
    return pa.chunked_array(lists, type=pa.list_(stream.type))


def describe_blocks(ds: Dataset) -> dict:
    """Sizes of a split of token blocks, for rafale.json and DATA=1."""
    tokens = sum(len(chunk.flatten()) for chunk in ds.data.column("input_ids").chunks)
    return {"examples": len(ds), "blocks": len(ds), "tokens": tokens}


SHARD_TOKENS = 2**22  # tokens cut into blocks and written at a time (16 MiB of int32): about what a split holds in memory
ENCODE_BATCH = 1000  # documents per encode_batch call, which tokenizes them in parallel


class BlockWriter:
    """Cut a token stream, given piece by piece, into blocks of block_size and write them to an Arrow file.

    The blocks are those of cutting the whole stream at once (`chunk_into_blocks`, the last block may be short),
    but they are written a shard of `shard_tokens` at a time: the tokens past a shard's last whole block are
    carried into the next, so at most about one shard is held. Each shard is its own record batch, with its own
    int32 offsets, so a split of any length fits (the file's own offsets are 64-bit)."""

    def __init__(self, path: Path, block_size: int, shard_tokens: int = SHARD_TOKENS):
        self.block_size = block_size
        # whole blocks, and a shard's offsets fit in int32
        self.shard_tokens = max(1, min(shard_tokens, INT32_MAX) // block_size) * block_size
        self.pending, self.pending_tokens = [], 0  # token arrays not written yet
        self.tokens = self.blocks = self.shards = self.most_held = 0
        self.schema = TOKEN_FEATURES.arrow_schema
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def add(self, tokens: np.ndarray):
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.most_held = max(self.most_held, self.pending_tokens)
        if self.pending_tokens < self.shard_tokens:
            return
        stream = np.concatenate(self.pending)
        whole = len(stream) // self.shard_tokens * self.shard_tokens
        for start in range(0, whole, self.shard_tokens):
            self._write(stream[start : start + self.shard_tokens])
        self.pending, self.pending_tokens = [stream[whole:]], len(stream) - whole

    def close(self):
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        self.writer.close()
        self.sink.close()

    def _write(self, tokens: np.ndarray):
        offsets = np.append(np.arange(0, len(tokens), self.block_size), len(tokens)).astype(np.int32)
        blocks = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens, pa.int32()))
        self.writer.write_batch(pa.record_batch([blocks], schema=self.schema))
        self.tokens += len(tokens)
        self.blocks += len(offsets) - 1
        self.shards += 1


def token_stream(encodings, end_id: int) -> np.ndarray:
    """The ids of encoded documents, each followed by `end_id`, as one int32 array."""
    return pa.array([e.ids + [end_id] for e in encodings], pa.list_(pa.int32())).flatten().to_numpy()


def write_blocks(texts: Dataset, tokenizer: Tokenizer, end_id: int, block_size: int, path: Path, desc: str,
                 shard_tokens: int = SHARD_TOKENS) -> BlockWriter:
    """Tokenize `texts` batch by batch, each document followed by `end_id`, and write the stream's blocks to `path`."""
    writer = BlockWriter(path, block_size, shard_tokens)
    progress = Progress(desc, total=len(texts), unit="documents")
    try:
        for batch in texts.iter(batch_size=ENCODE_BATCH):
            tokens = token_stream(tokenizer.encode_batch(batch["text"], add_special_tokens=False), end_id)
            writer.add(tokens)
            progress.update(len(batch["text"]))
        writer.close()
    except OSError as err:  # a full disk: the build's cleanup removes what was written
        raise DataError(f"data.cache_dir: could not write the data cache ({path}): {err.strerror or err} "
                        "(free space there, or point data.cache_dir / $RAFALE_CACHE elsewhere)") from None
    finally:
        progress.close()
    return writer


class CausalLMDataPipe(DataPipe):
    """Causal language modelling: documents joined by the end-of-text token, cut into blocks.

    Each split streams: tokenized a batch of documents at a time and written to disk a shard at a time, so
    memory does not grow with the corpus."""

    name = "causal_lm"
    head = "causal_lm"
    not_in_cache = IMAGE_FIELDS | LABEL_FIELDS | {"mlm_probability"}  # none of them read here
    shard_tokens = SHARD_TOKENS

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        scratch = self.scratch or Path(tempfile.mkdtemp(prefix="rafale-blocks-"))
        scratch.mkdir(parents=True, exist_ok=True)
        out = {}
        for split, ds in raw.items():
            path = scratch / f"{split}-blocks.arrow"
            write_blocks(ds, tokenizer, meta["eos_token_id"], self.cfg.block_size, path, f"tokenizing {split}",
                         self.shard_tokens)
            out[split] = Dataset.from_file(str(path))
            if len(out[split]) == 0:
                raise DataError(f"data.source: the {split} split has no tokens after tokenization")
        return DatasetDict(out)

    def _describe(self, ds: Dataset) -> dict:
        return describe_blocks(ds)

    def collator(self, meta: dict):
        if self.cfg.document_mask:
            return DocumentMaskCollator(pad_token_id=meta["pad_token_id"], document_end_id=meta["eos_token_id"])
        return CausalLMCollator(pad_token_id=meta["pad_token_id"])


@dataclass
class CausalLMCollator:
    """Stack blocks into input_ids (B, T) and labels shifted by one, IGNORE_INDEX past each block's end."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        blocks = [e["input_ids"] for e in examples]
        T = max(len(b) for b in blocks)
        input_ids = torch.full((len(blocks), T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(blocks), T), IGNORE_INDEX, dtype=torch.long)
        for i, block in enumerate(blocks):
            input_ids[i, : len(block)] = block
            labels[i, : len(block) - 1] = block[1:]
        return {"input_ids": input_ids, "labels": labels}


def document_ids_of(input_ids: torch.Tensor, document_end_id: int) -> torch.Tensor:
    """(B, T) -> (B, T): each token's document within its block, 0, 1, 2, ... A document starts after each
    end-of-text token, which belongs to the document it ends; the block's first token is document 0 even when the
    block cut the stream in the middle of a document."""
    ends = (input_ids == document_end_id).long()  # (B, T)
    return ends.cumsum(-1) - ends  # the end-of-text tokens before each token, not counting itself


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): each token's position within its document, restarting at 0 where a document starts."""
    T = document_ids.shape[-1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)  # (B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values  # (B, T): its document's start
    return index - start_index


@dataclass
class DocumentMaskCollator(CausalLMCollator):
    """data.document_mask: CausalLMCollator's batch, and for each token its document (`document_ids`, (B, T)) and
    its position within it (`position_ids`, (B, T), from 0 at each document's start); the label that would predict
    a document's first token from the previous document's end-of-text is IGNORE_INDEX (the end-of-text itself is
    still predicted, from its own document).

    Why positions restart: a document run alone sees positions 0..n-1, and with rotary embeddings only then is a
    packed document's output the same as its output alone (what test/test_document_mask.py checks), which is also
    what a model exported to transformers computes on one document a row. A relative scheme such as rotary only sees
    differences of positions within a document anyway, so the restart changes nothing but rounding there (the
    cos/sin tables at other rows); it matters for a scheme of absolute positions."""

    document_end_id: int

    def __call__(self, examples: list[dict]) -> dict:
        batch = super().__call__(examples)
        input_ids, labels = batch["input_ids"], batch["labels"]
        document_ids = document_ids_of(input_ids, self.document_end_id)  # (B, T)
        # the label at t predicts token t+1: across a boundary when token t ends its document (but is not the last)
        crosses = torch.zeros_like(labels, dtype=torch.bool)
        crosses[:, :-1] = document_ids[:, 1:] != document_ids[:, :-1]
        batch["labels"] = labels.masked_fill(crosses, IGNORE_INDEX)
        batch["document_ids"] = document_ids
        batch["position_ids"] = positions_in_documents(document_ids)
        return batch
