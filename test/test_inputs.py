"""Ordinary input that used to be refused or silently changed (issue 19): optimizer arguments YAML reads as strings,
numbers where strings are expected, a binary file as a .txt source, a vocabulary smaller than possible, a tiny
validation split, one document per line, an output folder that cannot be made, the cache's lock files, and bits
per byte with added whitespace tokens (item 11)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_DATA, run_in_process, write_config
from rafale.run import optim
from rafale.config import ConfigError, config_from_dict

BASE = yaml.safe_load((Path(__file__).parent / "pythia_debug.yaml").read_text())
SHORT = {"max_duration": "2ba", "eval_interval": "2ba", "save_interval": "2ba"}


def with_changes(**sections) -> dict:
    cfg = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def unquoted(path: Path, *values: str) -> Path:
    """The config file with each quoted value ('5e-3') written bare (5e-3), as a user types it; YAML 1.1 still
    reads it as a string, which is the point."""
    text = path.read_text()
    for value in values:
        text = text.replace(f"'{value}'", value)
    path.write_text(text)
    return path


def lock_and_tmp_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.name.endswith(".lock") or ".tmp-" in p.name)


# ----------------------------------------------------------------------------------------------------
# 1. optimizer arguments YAML reads as strings (5e-3, 9e-1) are numbers by the optimizer's signature


def stand_in():
    from torch import nn

    return nn.ModuleDict({"embed": nn.Embedding(4, 4), "layers": nn.ModuleList([nn.Linear(4, 4)]), "head": nn.Linear(4, 4)})


def test_optimizer_arguments_written_like_5e_3_become_numbers():
    assert yaml.safe_load("lr: 5e-3") == {"lr": "5e-3"}  # YAML 1.1: no dot, so a string
    cfg = config_from_dict(with_changes(training={"optimizer": {"name": "muon", "lr": "5e-3", "ns_steps": "5"}}))
    muon = optim.build_optimizer(stand_in(), cfg.training, "cpu")
    hidden = [g for g in muon.param_groups if g["use_muon"]]
    assert hidden and all(g["lr"] == 5e-3 for g in hidden)
    assert all(g["ns_steps"] == 5 and type(g["ns_steps"]) is int for g in hidden)

    sgd = config_from_dict(with_changes(training={"optimizer": {"name": "torch.optim.SGD", "momentum": "9e-1",
                                                                "dampening": "1e-1"}}))
    defaults = optim.build_optimizer(stand_in(), sgd.training, "cpu").defaults
    assert (defaults["momentum"], defaults["dampening"]) == (0.9, 0.1)
    assert type(defaults["momentum"]) is float and type(defaults["dampening"]) is float

    lion = config_from_dict(with_changes(training={"optimizer": {"name": "lion", "betas": ["9e-1", "0.99"]}}))
    assert optim.build_optimizer(stand_in(), lion.training, "cpu").defaults["betas"] == [0.9, 0.99]


@pytest.mark.parametrize("optimizer, key", [
    ({"name": "torch.optim.SGD", "momentum": "fast"}, "training.optimizer.momentum"),
    ({"name": "muon", "lr": "fast"}, "training.optimizer.lr"),
    ({"name": "lion", "betas": ["high", 0.99]}, "training.optimizer.betas"),
])
def test_a_word_for_a_numeric_optimizer_argument_is_an_error_naming_it(optimizer, key):
    with pytest.raises(ConfigError) as info:
        optim.check_optimizer(config_from_dict(with_changes(training={"optimizer": optimizer})).training)
    assert f"config error at '{key}'" in str(info.value) and "expected a number" in str(info.value), str(info.value)


def test_cli_trains_sgd_with_momentum_and_dampening_written_9e_1(tmp_path, cache_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       training={**SHORT, "optimizer": {"name": "torch.optim.SGD", "momentum": "9e-1",
                                                        "dampening": "1e-1"}})
    unquoted(cfg, "9e-1", "1e-1")
    assert yaml.safe_load(cfg.read_text())["training"]["optimizer"]["momentum"] == "9e-1"
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    # the numbers reached the optimizer that trained: its state in the checkpoint
    checkpoint = torch.load(tmp_path / "runs" / "pythia-debug" / "checkpoints" / "ep0-ba2-rank0.pt",
                            map_location="cpu", weights_only=False)
    groups = checkpoint["state"]["optimizers"]["SGD"]["param_groups"]
    assert {(g["momentum"], g["dampening"]) for g in groups} == {(0.9, 0.1)}


# ----------------------------------------------------------------------------------------------------
# 2. a number where a string is expected: run.name: 2024, training.warmup: 0


def test_a_number_where_a_string_is_expected_is_its_text_but_a_boolean_is_not():
    cfg = config_from_dict(with_changes(run={"name": 2024}, training={"warmup": 0}))
    assert cfg.run.name == "2024" and cfg.training.warmup == "0dur"  # no warmup, in a unit any duration takes
    tokens = config_from_dict(with_changes(training={"warmup": 0, "max_duration": "2048tok"}))
    assert tokens.training.warmup == "0dur"  # _check_warmup_unit takes it against a duration in tokens
    for value in (True, False):
        with pytest.raises(ConfigError, match=r"'run.name': expected a string, got"):
            config_from_dict(with_changes(run={"name": value}))
    with pytest.raises(ConfigError, match="'training.warmup': expected a Composer time string"):
        config_from_dict(with_changes(training={"warmup": 100}))  # 100 of what: still an error


def test_schedule_free_takes_warmup_0():
    cfg = config_from_dict(with_changes(training={"warmup": 0, "optimizer": {"name": "schedulefree_adamw"}}))
    assert optim.batches_in(cfg.training.warmup, "40ba", 10, 8, 64) == 0


def test_cli_trains_with_warmup_0_under_a_numeric_run_name(tmp_path, cache_dir, capsys, monkeypatch):
    from rafale.run_folder import read_metrics

    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": 2024},
                       training={**SHORT, "warmup": 0, "schedule": "cosine"})
    assert "warmup: 0\n" in cfg.read_text() and "name: 2024\n" in cfg.read_text()
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "2024"
    lr = next(values for name, values in read_metrics(run).items() if name.startswith("lr-"))
    assert lr[0][1] == pytest.approx(3e-3)  # the first batch at the peak: no warmup


# ----------------------------------------------------------------------------------------------------
# 3. a binary file as a .txt source


def binary_bytes(size: int = 200_000) -> bytes:
    """About `size` bytes of real executables (ls, the Python interpreter, an extension module)."""
    import _ctypes

    candidates = [shutil.which("ls"), os.path.realpath(sys.executable), _ctypes.__file__, torch._C.__file__]
    data = b""
    for path in filter(None, candidates):
        data += Path(path).read_bytes()
        if len(data) >= size:
            break
    return data[:size]


def test_a_binary_file_as_a_txt_source_is_refused(tmp_path, capsys, monkeypatch):
    source = tmp_path / "x.txt"
    source.write_bytes(binary_bytes())
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"source": str(source), "cache_dir": str(cache)})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 2, out[-2000:]
    assert f"data.source: {source} does not look like text" in err and "Traceback" not in err, err
    assert "replaced" not in out
    assert not list(cache.rglob("rafale.json")) and not lock_and_tmp_files(cache)


def test_utf16_text_is_refused_as_not_utf8(tmp_path):
    from rafale.data.sources import iter_text_documents
    from rafale.errors import DataError

    source = tmp_path / "utf16.txt"
    source.write_text("Once upon a time there was a cat.\n" * 200, encoding="utf-16")
    with pytest.raises(DataError, match="does not look like text.*UTF-16"):
        list(iter_text_documents(source, "\n"))


FRENCH = ("Il était une fois une petite fille qui habitait dans un village près de la forêt. Chaque matin, elle "
          "allait chercher de l'eau à la rivière avec sa grand-mère. Un jour, elle découvrit un chat gris caché "
          "derrière un arbre. Le chat avait très faim, alors elle lui donna un morceau de pain. Depuis ce jour-là, "
          "le chat la suivait partout, même à l'école.")


def test_text_with_a_few_bad_bytes_and_latin1_accents_is_still_read(tmp_path, capsys, monkeypatch):
    # French saved as Latin-1 (each accent one invalid byte: 14 of 349 characters, 4%), and a UTF-8 story
    # with a few bad bytes: text, which the default decode_errors: replace reads, saying how many it replaced
    docs = [f"{FRENCH} (histoire {i})".encode("latin-1") for i in range(60)]
    docs.append("Tom had a red ball. ".encode() * 20 + b"\xff\xfe broken \x80 bytes")
    source = tmp_path / "mostly-good.txt"
    source.write_bytes(b"\n<|endoftext|>\n".join(docs))
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"source": str(source), "cache_dir": str(tmp_path / "cache")})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-3000:]
    accents = sum(not c.isascii() for c in FRENCH)
    assert accents == 14
    assert f"replaced {60 * accents + 3:,} invalid UTF-8 sequence(s) in {source}" in out, out


# ----------------------------------------------------------------------------------------------------
# 4. data.vocab_size below the smallest possible vocabulary


def test_a_vocab_size_below_the_byte_alphabet_says_what_it_got(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"vocab_size": 10, "num_train_stories": 100, "num_val_stories": 20,
                             "cache_dir": str(tmp_path / "cache")})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-3000:]
    assert ("rafale: warning: data.vocab_size asks for 10 tokens but the smallest a byte-level BPE can be is its "
            "byte alphabet (256) plus its 2 special tokens: 258; using 258") in out, out
    summary = ("vocabulary: 258 tokens (tokenizer trained here, more than the 10 data.vocab_size asked for: the "
               "smallest a byte-level BPE can be is its byte alphabet (256) plus its 2 special tokens: 258)")
    assert summary in out, out
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0 and "using cached data" in out and summary in out, out  # the cache's summary says it too


def test_a_vocab_size_below_wordpieces_alphabet_says_what_it_got(capsys):
    from datasets import Dataset

    from rafale.data.tokenizers import train_tokenizer, warn_if_smaller

    texts = ["the cat sat on the mat", "a dog ran after it"] * 10
    tokenizer = train_tokenizer(Dataset.from_dict({"text": texts}), 10, "wordpiece")
    size = tokenizer.get_vocab_size()
    letters = set("".join(texts).replace(" ", ""))
    assert size > 10 and size - 5 >= len(letters)
    warn_if_smaller(size, 10, "wordpiece")
    assert (f"data.vocab_size asks for 10 tokens but the smallest a WordPiece tokenizer can be is the characters of "
            f"the corpus, with their ## continuation forms ({size - 5}), plus its 5 special tokens: {size}; using "
            f"{size}") in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# 5. a validation split too small to measure


def test_a_validation_split_of_few_blocks_is_warned_about(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"num_train_stories": 100, "num_val_stories": 1, "cache_dir": str(tmp_path / "cache")})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-3000:]
    meta = json.loads(next((tmp_path / "cache").rglob("rafale.json")).read_text())["splits"]["validation"]
    assert meta["blocks"] < 10
    assert (f"rafale: warning: the validation split holds only {meta['blocks']} blocks ({meta['tokens']:,} tokens), "
            "fewer than 10") in out, out


def test_a_large_enough_validation_split_is_not_warned_about(tmp_path, cache_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-3000:]
    assert "validation: " in out and "validation split holds only" not in out, out


def test_a_classifiers_validation_split_of_few_examples_is_warned_about(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", base="bert_cls_stories.yaml",
                       run={"output_dir": str(tmp_path / "runs")},
                       data={"num_train_stories": 60, "num_val_stories": 4, "vocab_size": 200,
                             "cache_dir": str(tmp_path / "cache")})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-3000:]
    meta = json.loads(next((tmp_path / "cache").rglob("rafale.json")).read_text())["splits"]["validation"]
    assert meta["examples"] < 10
    assert (f"rafale: warning: the validation split holds only {meta['examples']} examples ({meta['tokens']:,} "
            "tokens), fewer than 10") in out, out


# ----------------------------------------------------------------------------------------------------
# 6. a .txt corpus with one document per line


def test_one_document_per_line_names_doc_separator_and_then_works(tmp_path, capsys, monkeypatch):
    from rafale.data.stories import story_splits

    source = tmp_path / "lines.txt"
    source.write_text("\n".join(s.replace("\n", " ") for s in story_splits(60, 6, seed=0)["train"]) + "\n")
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"source": str(source), "cache_dir": str(tmp_path / "cache")})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 2, out[-2000:]
    assert "holds 1 document; need at least 2 to split" in err and "data.doc_separator" in err, err
    assert 'data.doc_separator: "\\n" for one document per line' in err and '"\\n\\n" for documents separated' in err

    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"source": str(source), "doc_separator": "\n", "cache_dir": str(tmp_path / "cache")})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-3000:]
    assert "train: " in out and "validation: " in out


# ----------------------------------------------------------------------------------------------------
# 7. an output folder that cannot be made is a config error, before any work


def test_an_output_dir_under_a_regular_file_is_a_config_error_before_the_data(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "afile" / "runs")},
                       data={"cache_dir": str(cache)})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 2
    assert "config error at 'run.output_dir'" in err and f"{tmp_path / 'afile'} is a file" in err, err
    assert "Traceback" not in err and "preparing data" not in out
    assert not cache.exists()


# ----------------------------------------------------------------------------------------------------
# 8. the cache's lock file, and the temporary folders of live builders


def test_no_lock_file_is_left_after_a_build_a_cache_hit_or_a_failed_build(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"num_train_stories": 60, "num_val_stories": 20, "cache_dir": str(cache)})
    for _ in range(2):  # a build, then a cache hit
        code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
        assert code == 0, err[-3000:]
        assert len(list(cache.rglob("rafale.json"))) == 1 and lock_and_tmp_files(cache) == []

    source = tmp_path / "no-text.jsonl"
    source.write_text("".join(json.dumps({"body": f"story {i}"}) + "\n" for i in range(20)))
    cfg = write_config(tmp_path / "bad.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"source": str(source), "cache_dir": str(cache)})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 2 and "data.text_column: no column 'text'" in err, err
    assert lock_and_tmp_files(cache) == []


def small_pipe(tmp_path):
    from rafale.config import DataConfig
    from rafale.data.causal_lm import CausalLMDataPipe

    return CausalLMDataPipe(DataConfig(source="stories", num_train_stories=40, num_val_stories=10, vocab_size=300,
                                       block_size=32, cache_dir=str(tmp_path / "cache")))


def test_the_stale_cleanup_spares_a_live_builders_temporary_folder(tmp_path):
    pipe = small_pipe(tmp_path)
    folder = pipe.root / pipe.name
    folder.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        building = folder / f"{pipe.cache_name()}.tmp-{live.pid}"
        killed = folder / f"{pipe.cache_name()}.tmp-{dead.pid}"
        for path in (building, killed):
            (path / "train").mkdir(parents=True)
        pipe.load(verbose=False)
        assert building.is_dir() and not killed.exists()
    finally:
        live.kill()
        live.wait()


def test_a_second_builder_of_the_same_cache_keeps_the_first_ones(tmp_path):
    pipe = small_pipe(tmp_path)
    first = pipe.load(verbose=False).path
    again = pipe._build(first.parent, verbose=False)  # as a builder that did not see the first finish would
    assert again == first and (first / "rafale.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]


# ----------------------------------------------------------------------------------------------------
# 9. bits per byte with Pythia's added whitespace tokens (item 11)

CODE = '''def area(width, height):
    """The area of a rectangle."""
    if width < 0 or height < 0:
        raise ValueError("negative side")
    return width * height


class Shape:
    def __init__(self, name):
        self.name = name

    def describe(self):
        for part in self.name.split():
            if part:
                        print(part)  # deeply indented
        return {"name": self.name,          "kind": "shape"}
'''
ACCENTED = "Lily était à l'école; Zoë a mangé une crème brûlée. Ça coûte 5 € — naïve façade."


def pythia_like_tokenizer(texts, vocab_size: int = 400):
    """A small byte-level BPE built as Pythia's GPT-NeoX tokenizer is: NFC normalizer, <|endoftext|> and
    <|padding|> as special tokens 0 and 1, and added plain-text tokens of 24 down to 2 spaces after the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(" " * n, normalized=True) for n in range(24, 1, -1)])
    return tokenizer


def tokenizers_with_whitespace_tokens():
    from tokenizers import Tokenizer

    found = {"pythia-like": lambda: pythia_like_tokenizer([CODE, ACCENTED] * 20)}
    if (SHARED_DATA / "pythia-tokenizer" / "tokenizer.json").is_file():
        found["pythia"] = lambda: Tokenizer.from_file(str(SHARED_DATA / "pythia-tokenizer" / "tokenizer.json"))
    return found


@pytest.mark.parametrize("name", sorted(tokenizers_with_whitespace_tokens()))
def test_token_bytes_count_added_whitespace_tokens(name):
    import unicodedata

    from rafale.models.token_bytes import token_bytes

    tokenizer = tokenizers_with_whitespace_tokens()[name]()
    sizes = token_bytes(tokenizer)
    runs = [tokenizer.token_to_id(" " * n) for n in range(2, 25)]
    assert None not in runs and [int(sizes[i]) for i in runs] == list(range(2, 25))
    for text in (CODE, "def f(x):\n        return x", unicodedata.normalize("NFC", ACCENTED)):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert any(i in runs for i in ids) or text == ACCENTED
        assert sum(int(sizes[i]) for i in ids) == len(text.encode("utf-8")), text
    assert sizes[tokenizer.token_to_id("<|endoftext|>")] == 0


def test_bits_per_byte_of_a_run_on_indented_code(tmp_path, capsys, monkeypatch):
    """The run's validation BitsPerByte against its definition, counted without rafale's byte table: summed nats
    over the scored tokens / (ln 2 x the UTF-8 bytes of the text those tokens decode to)."""
    from rafale.config import load_config
    from rafale.run.train import datapipe_for
    from rafale.run_folder import read_metrics

    functions = [CODE.replace("area", f"area_{i}").replace("Shape", f"Shape{i}") for i in range(40)]
    source = tmp_path / "code.txt"
    source.write_text("\n<|endoftext|>\n".join(functions))
    tokenizer_file = tmp_path / "tokenizer.json"
    pythia_like_tokenizer(functions).save(str(tokenizer_file))
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"source": str(source), "tokenizer": str(tokenizer_file), "val_fraction": 0.25,
                             "cache_dir": str(tmp_path / "cache")},
                       training={**SHORT, "eval_interval": "1ba"})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    series = read_metrics(tmp_path / "runs" / "pythia-debug")
    ce, bpb = series["metrics/eval/LanguageCrossEntropy"][-1][1], series["metrics/eval/BitsPerByte"][-1][1]

    data = datapipe_for(load_config(cfg)).load(verbose=False)
    blocks = [block.tolist() for block in data.splits["validation"]["input_ids"]]
    scored = sum(len(b) - 1 for b in blocks)  # every token but the first of each block is a label
    covered = sum(len(data.tokenizer.decode(b[1:]).encode("utf-8")) for b in blocks)
    runs = {data.tokenizer.token_to_id(" " * n) for n in range(2, 25)}
    assert sum(t in runs for b in blocks for t in b) > 50  # the runs of spaces are there, many of them
    assert bpb == pytest.approx(ce * scored / (math.log(2) * covered), rel=1e-4)
