"""A trained tokenizer may get fewer tokens than data.vocab_size asks for: rafale names and reports the size it got."""

import json
from pathlib import Path

from rafale.config import DataConfig
from rafale.data.causal_lm import CausalLMDataPipe
from conftest import run_in_process, write_config

ASKED = 5000  # far more than a BPE can learn from 100 stories


def cfg_asking_too_much(tmp_path) -> DataConfig:
    return DataConfig(source="stories", vocab_size=ASKED, block_size=32, num_train_stories=100, num_val_stories=10,
                      cache_dir=str(tmp_path / "cache"), num_proc=1)


def test_cache_is_named_after_the_trained_size_and_found_again(tmp_path, capsys, monkeypatch):
    cfg = cfg_asking_too_much(tmp_path)
    data = CausalLMDataPipe(cfg).load()
    got = data.tokenizer.get_vocab_size()
    assert got < ASKED
    assert data.vocab_size == got and data.meta["vocab_size_asked"] == ASKED
    assert json.loads((data.path / "rafale.json").read_text())["vocab_size"] == got
    assert data.path.name.startswith(f"stories_bpe{got}_bs32_") and f"bpe{ASKED}" not in data.path.name
    out = capsys.readouterr().out
    assert out.count("warning: data.vocab_size asks for 5,000") == 1 and f"has {got:,}" in out

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been found by its fingerprint")

    monkeypatch.setattr(CausalLMDataPipe, "_build", no_rebuild)
    again = CausalLMDataPipe(cfg).load()
    assert again.path == data.path == CausalLMDataPipe(cfg).cache_path
    assert "warning" not in capsys.readouterr().out  # said once, when the tokenizer was trained


def test_data_summary_says_the_trained_size(tmp_path, cache_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"vocab_size": ASKED, "num_train_stories": 100, "num_val_stories": 10})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-2000:]
    path = out.split("rafale: data cached at ")[1].split("\n")[0]
    data = json.loads((Path(path) / "rafale.json").read_text())
    got = data["vocab_size"]
    said = f"vocabulary: {got:,} tokens (tokenizer trained here, fewer than the 5,000 data.vocab_size asked for)"
    assert said in out
    # the run summary prints the same line (test_run_folder.py), and the run folder's data.json is this meta
