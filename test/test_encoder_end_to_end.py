"""BERT and RoBERTa through the CLI: overfitting one batch, and a short classification run that learns."""

import json
import re

import pytest

from conftest import run_in_process, write_config


def encoder_config(tmp_path, family, task, **training):
    return write_config(
        tmp_path / f"{family}-{task}.yaml",
        run={"output_dir": str(tmp_path / "runs"), "name": f"{family}-{task}"},
        model={"type": family, "task": task, "preset": f"{family}-tiny"},
        training=training,
    )


@pytest.mark.parametrize("task", ["mlm", "classification"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_debug_overfits_one_batch(tmp_path, cache_dir, capsys, monkeypatch, family, task):
    cfg = encoder_config(tmp_path, family, task)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DEBUG": "1"})
    assert code == 0, err[-3000:]
    start, end = (float(x) for x in re.search(r"went from ([\d.]+) to ([\d.]+)", out).groups())
    assert end < 0.2 * start, out[-2000:]


def test_short_classification_run_beats_chance(tmp_path, cache_dir, capsys, monkeypatch):
    cfg = write_config(
        tmp_path / "cls.yaml",
        run={"output_dir": str(tmp_path / "runs"), "name": "cls"},
        data={"num_train_stories": 1200, "num_val_stories": 150, "block_size": 192, "vocab_size": 1024},
        model={"type": "bert", "task": "classification", "preset": "bert-tiny"},
        # the recipe of test/bert_cls_stories.yaml (lr 5e-4, weight decay 0.01, linear decay) on less data, for 2
        # epochs: the loss sits at chance for the first ~50 steps before it falls
        training={"batch_size": 16, "lr": 5.0e-4, "weight_decay": 0.01, "schedule": "linear", "max_duration": "2ep",
                  "eval_interval": "2ep", "save_interval": "2ep", "warmup": "0.06dur"},
    )
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    accuracy = float(re.search(r"validation .*Accuracy: ([\d.]+)", out).group(1))
    assert accuracy > 0.6, out[-2000:]  # three balanced classes: chance is 1/3
    labels = json.loads((tmp_path / "runs" / "cls" / "labels.json").read_text())
    assert labels == ["happy", "sad", "surprised"]
