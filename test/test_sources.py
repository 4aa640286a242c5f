"""Data as it comes: separate train and validation files (globs for shards), and bad rows in table files named
by file and row."""

import json
import re
from pathlib import Path

import pytest

from rafale.config import ConfigError, config_from_dict
from rafale.data.causal_lm import CausalLMDataPipe
from rafale.data.sources import load_source
from rafale.errors import DataError
from test_datapipes import DOCS, small_cfg, write_txt


def test_separate_train_and_validation_files_keep_their_split(tmp_path):
    train = write_txt(tmp_path / "train.txt", DOCS[:200])
    valid = write_txt(tmp_path / "valid.txt", DOCS[200:230])
    cfg = small_cfg(tmp_path, source={"train": str(train), "validation": str(valid)})
    raw = load_source(cfg, tmp_path)
    assert list(raw["train"]["text"]) == DOCS[:200] and list(raw["validation"]["text"]) == DOCS[200:230]  # nothing carved off
    data = CausalLMDataPipe(cfg).load(verbose=False)
    tokens = sum(len(data.tokenizer.encode(d).ids) + 1 for d in DOCS[200:230])
    assert data.meta["splits"]["validation"]["tokens"] == tokens
    assert data.path.name.startswith(tmp_path.name[:20].replace("_", "-"))  # train.txt: named after its folder
    # the same files hit the cache; a changed validation file misses it
    assert CausalLMDataPipe(cfg).cache_path == data.path
    write_txt(valid, DOCS[200:231])
    assert CausalLMDataPipe(cfg).cache_path != data.path


def one_document_warnings(out: str) -> dict[str, str]:
    return {m[1]: m[0] for m in re.finditer(r"rafale: warning: data.source: (\S+) \([\d,]+ bytes\) holds 1 document[^\n]*",
                                            out)}


def test_every_txt_file_left_whole_by_the_separator_is_named_train_and_validation_alike(tmp_path, capsys):
    """Files of blank-line-separated documents read with the default <|endoftext|> are one document each: each one,
    a validation file or a train shard (where the carved-off split still finds 2 documents), gets the warning with
    its size and the key to set; a file the separator does cut says nothing."""
    train = write_txt(tmp_path / "train.txt", DOCS[:200], sep="")  # "\n\n" between documents
    valid = write_txt(tmp_path / "valid.txt", DOCS[200:230], sep="")
    raw = load_source(small_cfg(tmp_path, source={"train": str(train), "validation": str(valid)}), tmp_path)
    assert (len(raw["train"]), len(raw["validation"])) == (1, 1)
    warned = one_document_warnings(capsys.readouterr().err)
    assert set(warned) == {str(train), str(valid)}, warned
    for path, line in warned.items():
        assert f"({Path(path).stat().st_size:,} bytes)" in line and "data.doc_separator '<|endoftext|>'" in line
        assert 'it has blank lines: set data.doc_separator: "\\n\\n"' in line, line

    (tmp_path / "shards").mkdir()  # train alone, in 2 shards, one document a line: 2 documents, carved silently
    for i in range(2):
        (tmp_path / "shards" / f"part-{i}.txt").write_text("\n".join(DOCS[i * 100:(i + 1) * 100]) + "\n")
    raw = load_source(small_cfg(tmp_path, source={"train": str(tmp_path / "shards" / "part-*.txt")}, val_fraction=0.5),
                      tmp_path)
    assert len(raw["train"]) + len(raw["validation"]) == 2
    warned = one_document_warnings(capsys.readouterr().err)
    assert set(warned) == {str(tmp_path / "shards" / f"part-{i}.txt") for i in range(2)}, warned
    assert all('set data.doc_separator: "\\n" if it holds one document a line' in line for line in warned.values())

    load_source(small_cfg(tmp_path, source={"train": str(write_txt(tmp_path / "cut.txt"))}, val_fraction=0.1), tmp_path)
    assert "holds 1 document" not in capsys.readouterr().err


def test_globs_gather_shards_in_name_order_and_train_alone_is_carved(tmp_path):
    (tmp_path / "shards").mkdir()
    for i in range(3):
        (tmp_path / "shards" / f"part-{i}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in DOCS[i * 100:(i + 1) * 100]))
    cfg = small_cfg(tmp_path, source={"train": str(tmp_path / "shards" / "part-*.jsonl")}, val_fraction=0.1)
    raw = load_source(cfg, tmp_path)
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(DOCS)
    assert len(raw["validation"]) == 30
    both = small_cfg(tmp_path, source={"train": [str(tmp_path / "shards" / "part-0.jsonl"), str(tmp_path / "shards" / "part-1.jsonl")],
                                       "validation": str(tmp_path / "shards" / "part-2.jsonl")})
    raw = load_source(both, tmp_path)
    assert list(raw["train"]["text"]) == DOCS[:200] and list(raw["validation"]["text"]) == DOCS[200:300]


@pytest.mark.parametrize("source, key, message", [
    ({"train": "missing/*.txt"}, "data.source.train", "no file matches missing/*.txt"),
    ({"validation": "x.txt"}, "data.source.train", "required key is missing"),
    ({"train": "x.txt", "test": "y.txt"}, "data.source.test", "unknown key"),
    ({"train": 3}, "data.source.train", "expected a path, a glob or a list"),
])
def test_a_bad_split_source_names_its_key(tmp_path, monkeypatch, source, key, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("a\n<|endoftext|>\nb")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"type": "pythia"}, "data": {"source": source}})
    assert err.value.key == key and message in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_bad_bytes_in_a_table_file_name_the_file_and_line_or_are_replaced(tmp_path, capsys, suffix):
    rows = [b'{"text": "a good row"}', b'{"text": "caf\xe9 bad byte"}', b'{"text": "another good row"}']
    if suffix == ".csv":
        rows = [b"text", b"a good row", b"caf\xe9 bad byte", b"another good row"]
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(b"\n".join(rows) + b"\n")
    line = 2 if suffix == ".jsonl" else 3
    with pytest.raises(DataError, match=rf"{path} is not UTF-8 at line {line} \(byte offset \d+"):
        load_source(small_cfg(tmp_path, source=str(path), decode_errors="error"), tmp_path)
    raw = load_source(small_cfg(tmp_path, source=str(path), val_fraction=0.34), tmp_path)
    texts = list(raw["train"]["text"]) + list(raw["validation"]["text"])
    assert "caf\ufffd bad byte" in texts and len(texts) == 3
    assert f"replaced invalid UTF-8 on 1 line(s) of {path} (first: line {line})" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_missing_text_column_names_the_file_and_the_columns(tmp_path, suffix):
    from datasets import Dataset

    path = tmp_path / f"docs{suffix}"
    ds = Dataset.from_dict({"body": ["one", "two", "three"]})
    {".jsonl": ds.to_json, ".csv": ds.to_csv, ".parquet": ds.to_parquet}[suffix](str(path))
    with pytest.raises(DataError, match=rf"data.text_column: no column 'text' in {path}; columns: \['body'\]"):
        load_source(small_cfg(tmp_path, source=str(path)), tmp_path)


def test_a_null_text_names_the_row(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": null}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=rf"data.text_column: row 1 of {path} has no text"):
        load_source(small_cfg(tmp_path, source=str(path)), tmp_path)


def test_a_malformed_table_file_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=rf"data.source: {path} could not be read as jsonl"):
        load_source(small_cfg(tmp_path, source=str(path)), tmp_path)
