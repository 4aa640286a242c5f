"""Splits larger than int32 Arrow offsets can address (2^31 tokens), tested without allocating them."""

import pyarrow as pa
import torch
from datasets import Dataset, load_from_disk
from datasets.table import InMemoryTable

from rafale.data.causal_lm import INT32_MAX, CausalLMCollator, block_chunks, chunk_into_blocks


def test_block_chunks_of_a_split_past_int32_offsets():
    num_tokens, block_size = 2**31 + 5, 2048  # one list array could not hold this many values
    ranges = block_chunks(num_tokens, block_size)
    assert len(ranges) == 2
    assert ranges[0][0] == 0 and ranges[-1][1] == num_tokens
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert stop == start  # contiguous: no token lost or repeated
    for start, stop in ranges:
        assert stop - start <= INT32_MAX  # the chunk's last offset fits in int32
        assert start % block_size == 0  # no block straddles two chunks
    assert block_chunks(10, 4) == [(0, 10)]  # a small split stays one chunk


def test_chunked_blocks_equal_unchunked_and_load_back(tmp_path):
    token_lists = pa.chunked_array([pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.int32())),
                                    pa.array([[6, 7, 8, 9, 10, 11, 12, 13, 14]], pa.list_(pa.int32())).slice(0, 1)])
    whole = chunk_into_blocks(token_lists, 4)
    chunked = chunk_into_blocks(token_lists, 4, max_chunk_tokens=9)  # two blocks per chunk
    assert whole.num_chunks == 1 and chunked.num_chunks == 2
    assert chunked.to_pylist() == whole.to_pylist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14]]
    assert chunked.type == pa.list_(pa.int32())

    ds = Dataset(InMemoryTable(pa.table({"input_ids": chunked})))
    ds.save_to_disk(str(tmp_path / "split"))
    back = load_from_disk(str(tmp_path / "split")).with_format("torch")
    batch = CausalLMCollator(pad_token_id=0)([back[i] for i in range(len(back))])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 0, 0]]
    assert batch["labels"][0].tolist() == [2, 3, 4, -100]
    assert batch["input_ids"].dtype == torch.long
