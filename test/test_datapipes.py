import dataclasses
import json
from dataclasses import replace

import pytest
import torch
from datasets import Dataset, DatasetDict

from rafale.config import DataConfig
from rafale.data.causal_lm import CausalLMCollator, CausalLMDataPipe, chunk_into_blocks
from rafale.data.sources import load_source
from rafale.errors import IGNORE_INDEX, DataError
from conftest import SHARED_DATA

DOCS = [f"Story number {i}. Tom had a red ball and {'a big dog' if i % 2 else 'a small cat'}." for i in range(300)]


def small_cfg(tmp_path, **kw) -> DataConfig:
    defaults = dict(source="stories", vocab_size=300, block_size=32, num_train_stories=120, num_val_stories=20,
                    cache_dir=str(tmp_path / "cache"), num_proc=1)
    return DataConfig(**(defaults | kw))


def write_txt(path, docs=DOCS, sep="<|endoftext|>"):
    path.write_text(f"\n{sep}\n".join(docs))
    return path


def test_blocks_are_the_token_stream_cut_at_block_size(tmp_path):
    cfg = small_cfg(tmp_path, source=str(write_txt(tmp_path / "docs.txt")), val_fraction=0.1)
    data = CausalLMDataPipe(cfg).load(verbose=False)
    tok = data.tokenizer
    raw = load_source(cfg, tmp_path)  # the same split, recomputed
    for split in ("train", "validation"):
        blocks = [b.tolist() for b in data.splits[split]["input_ids"]]
        assert all(len(b) == cfg.block_size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= cfg.block_size
        stream = [t for doc in raw[split]["text"] for t in tok.encode(doc, add_special_tokens=False).ids + [data.eos_token_id]]
        assert [t for b in blocks for t in b] == stream
        # decoding the blocks gives back the documents, joined by the end-of-text token
        text = tok.decode([t for b in blocks for t in b], skip_special_tokens=False)
        assert text == "<|endoftext|>".join(raw[split]["text"]) + "<|endoftext|>"
    assert data.meta["splits"]["train"]["tokens"] == sum(len(b) for b in data.splits["train"]["input_ids"])


def test_second_run_hits_the_cache_and_changed_inputs_miss_it(tmp_path, capsys, monkeypatch):
    cfg = small_cfg(tmp_path)
    first = CausalLMDataPipe(cfg).load()
    assert "preparing data" in capsys.readouterr().out

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(CausalLMDataPipe, "_build", no_rebuild)
    second = CausalLMDataPipe(cfg).load()
    assert "using cached data" in capsys.readouterr().out
    assert second.path == first.path
    assert torch.equal(second.splits["train"][0]["input_ids"], first.splits["train"][0]["input_ids"])
    monkeypatch.undo()

    paths = {first.path}
    for change in ({"block_size": 16}, {"vocab_size": 280}, {"num_train_stories": 100}):
        other = CausalLMDataPipe(small_cfg(tmp_path, **change))
        assert other.cache_path not in paths, change
        paths.add(other.cache_path)
    # {source}_{tokenizer}_bs{block_size}_len{training blocks}_{fingerprint}
    blocks = len(first.splits["train"])
    assert first.path.name == f"stories_bpe300_bs32_len{blocks}_{CausalLMDataPipe(small_cfg(tmp_path)).fingerprint}"


def test_changed_source_file_misses_the_cache(tmp_path):
    path = write_txt(tmp_path / "docs.txt")
    before = CausalLMDataPipe(small_cfg(tmp_path, source=str(path))).cache_path
    write_txt(path, DOCS[:200])
    assert CausalLMDataPipe(small_cfg(tmp_path, source=str(path))).cache_path != before


@dataclasses.dataclass
class DataConfigWithResponses(DataConfig):
    """The data section as a new task would grow it: a field no datapipe here knows of."""

    response_column: str = "response"


class PromptResponseDataPipe(CausalLMDataPipe):
    """A new task's datapipe, written the short way: it reads data.response_column (here: appends its name to
    every text) and never adds it to its fingerprint."""

    name = "prompt_response"

    def _prepare(self, raw, tokenizer, meta):
        raw = DatasetDict({split: ds.map(lambda row: {"text": row["text"] + " " + self.cfg.response_column})
                           for split, ds in raw.items()})
        return super()._prepare(raw, tokenizer, meta)


def test_a_field_a_datapipe_reads_but_never_declared_misses_the_cache(tmp_path, capsys):
    """Safe by default: every data field is a fingerprint input unless the datapipe says it cannot change its cache,
    so a new task's field builds a new cache instead of reusing a stale one."""
    cfg = lambda **kw: DataConfigWithResponses(**(dict(vars(small_cfg(tmp_path, num_train_stories=40))) | kw))
    first = PromptResponseDataPipe(cfg(response_column="answer")).load(verbose=False)
    second = PromptResponseDataPipe(cfg(response_column="reply")).load(verbose=False)
    assert second.path != first.path
    decode = lambda data: data.tokenizer.decode([t for b in data.splits["validation"]["input_ids"] for t in b.tolist()])
    assert decode(first).count("answer") == decode(second).count("reply") == 20  # the stale cache would say "answer"


def test_fields_a_datapipe_says_cannot_change_its_cache_reuse_it(tmp_path):
    """Where it is built and how many processes build or load it (every datapipe), what only the collator reads
    (MLM's mlm_probability), what a source of this kind never reads (the story counts for a file source, a
    tokenizer file's unused data.vocab_size) and the other tasks' fields (labels, images) keep the same cache."""
    from rafale.data.cache import NEVER_IN_CACHE
    from rafale.data.mlm import MLMDataPipe

    base = small_cfg(tmp_path)
    for field, value in {"num_workers": 4, "num_proc": 2, "decode_errors": "error", "cache_dir": str(tmp_path / "b"),
                         "label_column": "sentiment", "image_size": 64, "mlm_probability": 0.3}.items():
        assert field in NEVER_IN_CACHE | CausalLMDataPipe.not_in_cache, field
        assert CausalLMDataPipe(replace(base, **{field: value})).fingerprint == CausalLMDataPipe(base).fingerprint
    assert MLMDataPipe(replace(base, mlm_probability=0.3)).fingerprint == MLMDataPipe(base).fingerprint
    path = write_txt(tmp_path / "docs.txt")
    tokenizer_file = tmp_path / "tokenizer.json"
    CausalLMDataPipe(base).load(verbose=False).tokenizer.save(str(tokenizer_file))
    on_file = small_cfg(tmp_path, source=str(path), tokenizer=str(tokenizer_file))
    for change in ({"num_train_stories": 7}, {"vocab_size": 999}):
        assert CausalLMDataPipe(replace(on_file, **change)).fingerprint == CausalLMDataPipe(on_file).fingerprint
    # and the fields it reads do change it, for a file source as for the stories
    for change in ({"doc_separator": "\n"}, {"split_seed": 1}, {"val_fraction": 0.2}, {"block_size": 16}):
        assert CausalLMDataPipe(replace(on_file, **change)).fingerprint != CausalLMDataPipe(on_file).fingerprint


def test_trained_tokenizer_round_trips_text(tmp_path):
    data = CausalLMDataPipe(small_cfg(tmp_path)).load(verbose=False)
    text = 'Once upon a time, Lily said "Hello!" to the big, friendly dog.'
    ids = data.tokenizer.encode(text).ids
    assert data.tokenizer.decode(ids) == text
    assert data.tokenizer.get_vocab_size() == 300
    assert (data.eos_token_id, data.pad_token_id) == (0, 1)
    assert (data.path / "tokenizer.json").is_file()


@pytest.mark.skipif(not (SHARED_DATA / "pythia-tokenizer" / "tokenizer.json").is_file(), reason="../shared/data is absent")
def test_real_pythia_tokenizer_loads_and_tokenizes(tmp_path):
    path = SHARED_DATA / "pythia-tokenizer" / "tokenizer.json"
    data = CausalLMDataPipe(small_cfg(tmp_path, tokenizer=str(path))).load(verbose=False)
    assert data.tokenizer.encode("Hello world").ids == [12092, 1533]
    assert (data.eos_token_id, data.pad_token_id, data.vocab_size) == (0, 1, 50277)
    assert data.path.name.startswith("stories_pythia-tokenizer_bs32_")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", "saved"])
def test_local_sources_with_a_named_text_column(tmp_path, suffix):
    ds = Dataset.from_dict({"id": list(range(len(DOCS))), "story": DOCS})
    path = tmp_path / f"docs{suffix}"
    {".jsonl": ds.to_json, ".json": ds.to_json, ".parquet": ds.to_parquet, ".csv": ds.to_csv,
     "saved": ds.save_to_disk}[suffix](str(path))
    raw = load_source(small_cfg(tmp_path, source=str(path), text_column="story", val_fraction=0.2), tmp_path)
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(DOCS)
    assert len(raw["validation"]) == 60
    with pytest.raises(DataError, match="data.text_column: no column 'text'.*'story'"):
        load_source(small_cfg(tmp_path, source=str(path)), tmp_path)


def test_source_splits_are_kept_and_carved_splits_are_reproducible(tmp_path):
    path = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict({"text": DOCS[:250]}),
                 "validation": Dataset.from_dict({"text": DOCS[250:]})}).save_to_disk(str(path))
    raw = load_source(small_cfg(tmp_path, source=str(path)), tmp_path)
    assert list(raw["validation"]["text"]) == DOCS[250:]
    txt = write_txt(tmp_path / "docs.txt")
    a = load_source(small_cfg(tmp_path, source=str(txt), split_seed=3), tmp_path)
    b = load_source(small_cfg(tmp_path, source=str(txt), split_seed=3), tmp_path)
    c = load_source(small_cfg(tmp_path, source=str(txt), split_seed=4), tmp_path)
    assert list(a["validation"]["text"]) == list(b["validation"]["text"]) != list(c["validation"]["text"])


def test_txt_documents_are_split_on_the_separator(tmp_path):
    path = write_txt(tmp_path / "docs.txt", ["first doc", "second\ndoc", "", "third"], sep="===")
    raw = load_source(small_cfg(tmp_path, source=str(path), doc_separator="==="), tmp_path)
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == ["first doc", "second\ndoc", "third"]


def test_a_failed_build_leaves_no_cache_behind(tmp_path, monkeypatch):
    pipe = CausalLMDataPipe(small_cfg(tmp_path))

    def broken(self, raw, tokenizer, meta):
        raise RuntimeError("disk full")

    monkeypatch.setattr(CausalLMDataPipe, "_prepare", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pipe.load(verbose=False)
    leftovers = [p.name for p in pipe.cache_path.parent.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_chunk_into_blocks_keeps_every_token():
    import pyarrow as pa

    lists = pa.chunked_array([pa.array([[1, 2, 3], [4]]), pa.array([[5, 6, 7, 8, 9]])])
    assert chunk_into_blocks(lists, 4).to_pylist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_collator_shifts_labels_and_ignores_padding():
    collate = CausalLMCollator(pad_token_id=1)
    batch = collate([{"input_ids": torch.tensor([5, 6, 7, 8])}, {"input_ids": torch.tensor([9, 10])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 1, 1]]
    assert batch["labels"].tolist() == [[6, 7, 8, IGNORE_INDEX], [10, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_meta_records_the_split_sizes(tmp_path):
    data = CausalLMDataPipe(small_cfg(tmp_path)).load(verbose=False)
    meta = json.loads((data.path / "rafale.json").read_text())
    assert meta["splits"]["validation"]["blocks"] == len(data.splits["validation"]) > 0
    assert meta["vocab_size"] == 300
