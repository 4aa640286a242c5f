"""The causal-LM data preparation streams: text read in pieces, blocks written a shard at a time, the same blocks
as the whole split cut at once, and memory that does not grow with the corpus."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, load_from_disk

from rafale.config import DataConfig
from rafale.data.causal_lm import INT32_MAX, BlockWriter, CausalLMDataPipe, chunk_into_blocks
from rafale.data.sources import iter_text_documents, load_source
from rafale.data.tokenizers import train_tokenizer
from rafale.errors import DataError

DOCS = [f"Story {i}: Tom {'ran to the park' * (i % 4)} and smiled. Café " for i in range(200)]


def reference_blocks(token_lists: list[list[int]], block_size: int) -> list[list[int]]:
    """The former in-memory path: every token list of the split at once, cut by chunk_into_blocks."""
    return chunk_into_blocks(pa.chunked_array([pa.array(token_lists, pa.list_(pa.int32()))]), block_size).to_pylist()


@pytest.mark.parametrize("block_size,shard_tokens", [(4, 4), (4, 10), (5, 3), (7, 1000)])
def test_block_writer_cuts_like_the_whole_stream_and_holds_about_one_shard(tmp_path, block_size, shard_tokens):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 50_000, rng.integers(0, 30), dtype=np.int32) for _ in range(60)]
    writer = BlockWriter(tmp_path / "blocks.arrow", block_size, shard_tokens)
    for piece in pieces:
        writer.add(piece)
    writer.close()
    blocks = Dataset.from_file(str(tmp_path / "blocks.arrow")).data.column("input_ids")
    assert blocks.to_pylist() == reference_blocks([p.tolist() for p in pieces], block_size)
    shard = writer.shard_tokens
    assert shard % block_size == 0 and blocks.num_chunks == writer.shards == -(-writer.tokens // shard)
    assert writer.most_held < shard + max(len(p) for p in pieces)  # never more than a shard and the piece on top


def test_a_shard_never_needs_offsets_past_int32(tmp_path):
    writer = BlockWriter(tmp_path / "blocks.arrow", 2048, shard_tokens=2**40)
    writer.close()
    assert writer.shard_tokens <= INT32_MAX and writer.shard_tokens % 2048 == 0


def test_streamed_blocks_equal_the_in_memory_blocks_across_many_shards(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n<|endoftext|>\n".join(DOCS))
    cfg = DataConfig(source=str(path), vocab_size=300, block_size=32, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    pipe = CausalLMDataPipe(cfg)
    pipe.shard_tokens = 3 * cfg.block_size + 5  # many shards, each three blocks; documents straddle them
    data = pipe.load(verbose=False)
    raw = load_source(cfg, tmp_path / "scratch")  # the same documents and split, read again
    for split in ("train", "validation"):
        encodings = data.tokenizer.encode_batch(list(raw[split]["text"]), add_special_tokens=False)
        expected = reference_blocks([e.ids + [data.eos_token_id] for e in encodings], cfg.block_size)
        on_disk = load_from_disk(str(data.path / split))
        assert on_disk.data.column("input_ids").to_pylist() == expected
        assert on_disk.data.column("input_ids").num_chunks == -(-sum(map(len, expected)) // (3 * cfg.block_size))
    assert data.splits["train"].data.column("input_ids").num_chunks > 10
    # the streamed file was moved into the cache, not copied; no scratch files stay behind
    assert sorted(p.name for p in data.path.iterdir()) == ["rafale.json", "tokenizer.json", "train", "validation"]
    assert len(list((data.path / "train").glob("*.arrow"))) == 1


def test_txt_read_in_small_pieces_gives_the_documents_of_the_whole_file(tmp_path):
    sep = "<|endoftext|>"
    body = f"\n{sep}\n".join(DOCS).encode() + b" bad \xff byte " + f"{sep}{sep} last \u00e9".encode()
    path = tmp_path / "docs.txt"
    path.write_bytes(body)
    whole = [d.strip() for d in body.decode("utf-8", errors="replace").split(sep) if d.strip()]
    for piece_bytes in (1, 5, 13, 4096, 10**7):  # separators and multi-byte characters cut across pieces
        assert list(iter_text_documents(path, sep, "replace", piece_bytes)) == whole
    bad_offset = body.index(b"\xff")
    with pytest.raises(DataError, match=f"byte offset {bad_offset} "):
        list(iter_text_documents(path, sep, "error", piece_bytes=7))


def test_progress_in_a_log_is_a_line_every_few_seconds(tmp_path, capsys, monkeypatch):
    import rafale.data.causal_lm as causal_lm
    import rafale.progress
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    monkeypatch.setattr(rafale.progress, "EVERY_S", 0.0)  # a line at every update
    monkeypatch.setattr(causal_lm, "ENCODE_BATCH", 10)
    texts = Dataset.from_dict({"text": ["a b a b"] * 30})  # 5 tokens each with the end id: 150 tokens
    writer = causal_lm.write_blocks(texts, tokenizer, 2, 8, tmp_path / "blocks.arrow", "tokenizing train")
    assert writer.tokens == 150
    lines = [line for line in capsys.readouterr().err.splitlines() if "tokenizing train" in line]
    counts = [line.split(": ")[2].rsplit(", ", 1)[0] for line in lines]
    # (a line from the thread that looks every second may repeat one, on a slow machine)
    assert list(dict.fromkeys(counts)) == ["10 of 30 documents (33%)", "20 of 30 documents (67%)",
                                           "30 of 30 documents (100%)"], lines
    assert lines[-1].endswith(" s (done)")
    # the default: nothing for a stage shorter than EVERY_S
    monkeypatch.setattr(rafale.progress, "EVERY_S", 3600.0)
    causal_lm.write_blocks(texts, tokenizer, 2, 8, tmp_path / "again.arrow", "tokenizing train")
    assert "tokenizing" not in capsys.readouterr().err


MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import rafale.data.causal_lm as causal_lm
    import rafale.data.sources as sources
    from rafale.config import DataConfig

    def anon_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    peak = [0]
    def sample():  # the kernel keeps no peak of anonymous memory: sample it
        while True:
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.002)

    tokenizer, *corpora = sys.argv[1:]
    sources.READ_PIECE_BYTES = sources.TEXT_BATCH_BYTES = 2**16
    causal_lm.ENCODE_BATCH = 50
    start = anon_kb()
    threading.Thread(target=sample, daemon=True).start()
    for corpus in corpora:  # one after the other, each from the same start
        cfg = DataConfig(source=corpus, tokenizer=tokenizer, cache_dir=corpus + ".cache", block_size=64)
        pipe = causal_lm.CausalLMDataPipe(cfg)
        pipe.shard_tokens = 2**14
        data = pipe.load(verbose=False)
        print(json.dumps({"peak_grown_kb": peak[0] - start, "tokens": data.meta["splits"]["train"]["tokens"]}))
""")


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak anonymous memory (memory-mapped file pages are the page cache's, not the process's) while preparing a
    corpus, then one eight times larger in the same process: the larger one needs no more. With small pieces and
    shards, so that small corpora show it. The former in-memory path grew by ~100 bytes per token."""
    from rafale.data.stories import generate_stories

    stories = generate_stories(400)
    train_tokenizer(Dataset.from_dict({"text": stories}), 300).save(str(tmp_path / "tokenizer.json"))
    text = "\n<|endoftext|>\n".join(stories)  # ~300 kB
    corpora = []
    for copies in (3, 24):
        corpora.append(tmp_path / f"corpus{copies}.txt")
        corpora[-1].write_text("\n<|endoftext|>\n".join([text] * copies))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "tokenizer.json"), *map(str, corpora)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    small, large = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    assert large["tokens"] - small["tokens"] > 3_500_000  # 14 MB more as int32
    # measured: +4 MB for 8x the corpus (allocator and Arrow pools); unbounded shards grew +35 MB, and the former
    # in-memory path ~100 bytes per token (~400 MB here)
    assert large["peak_grown_kb"] - small["peak_grown_kb"] < 16 * 1024, (small, large)
