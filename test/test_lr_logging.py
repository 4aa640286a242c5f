"""The learning rate a run logs is the one its optimizer applied: schedule-free's own warmup included, and on the
console training.lr as scheduled, whatever rate the first param group has (layer decay, Muon)."""

import json
import math
import re

import pytest

from conftest import run_in_process, write_config

LR, STEPS, WARMUP = 3.0e-3, 6, 2  # test/pythia_debug.yaml's lr


def cosine(i: int, warmup: int = WARMUP, total: int = STEPS, final: float = 0.1) -> float:
    """training.schedule cosine's factor for batch i (0-based): linear from 0 over the warmup, then half a cosine
    down to lr_final_ratio at the end."""
    if i < warmup:
        return i / warmup
    return final + (1 - final) * (1 + math.cos(math.pi * (i - warmup) / (total - warmup))) / 2


def run(tmp_path, capsys, monkeypatch, name, **training):
    cfg = write_config(tmp_path / f"{name}.yaml", run={"output_dir": str(tmp_path / "runs"), "name": name},
                       training={"max_duration": f"{STEPS}ba", "warmup": f"{WARMUP}ba", "eval_interval": f"{STEPS}ba",
                                 "save_interval": f"{STEPS}ba", "log_interval": "1ba", **training})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    # a row's `step` counts the batches done: it holds the rates batch step - 1 was trained at
    logged = {row["step"] - 1: row for row in rows if "lr-base" in row}
    assert sorted(logged) == list(range(STEPS)), rows
    console = {int(m[1]) - 1: float(m[2]) for m in re.finditer(r"^\[\s*(\d+)/\d+ .*\| lr ([\d.e+-]+) \|", out, re.M)}
    assert sorted(console) == list(range(STEPS)), out
    return logged, console


def groups(row: dict, prefix: str) -> dict:
    return {name: value for name, value in row.items() if name.startswith(prefix)}


def close_on_the_console(printed: float, expected: float) -> bool:
    """The console prints two significant digits (`lr 2.9e-03`)."""
    return abs(printed - expected) <= 0.051 * 10 ** math.floor(math.log10(expected)) if expected else printed == 0


def test_schedule_free_logs_its_warming_up_rate(tmp_path, cache_dir, capsys, monkeypatch):
    warmup = 4  # batches: schedule-free warms up itself (rafale's schedule stays constant for it)
    logged, console = run(tmp_path, capsys, monkeypatch, "sf", warmup=f"{warmup}ba",
                          optimizer={"name": "schedulefree_adamw"})
    for i, row in logged.items():
        # AdamWScheduleFree.step: lr * (k + 1) / warmup_steps while k < warmup_steps, then lr (k: steps done before)
        expected = LR * min(1.0, (i + 1) / warmup)
        rates = groups(row, "lr-AdamWScheduleFree/group")
        assert len(rates) == 2 and set(rates) == {"lr-AdamWScheduleFree/group0-decay",
                                                   "lr-AdamWScheduleFree/group1-no_decay"}, row
        assert all(rate == pytest.approx(expected, rel=1e-12) for rate in rates.values()), (i, row)
        assert row["lr-base"] == pytest.approx(expected, rel=1e-12)
        assert close_on_the_console(console[i], expected), (i, console)
    rising = [logged[i]["lr-base"] for i in range(warmup)]
    assert all(a < b for a, b in zip(rising, rising[1:])) and rising[-1] == pytest.approx(LR), rising


def test_muon_run_shows_training_lr_on_the_console(tmp_path, cache_dir, capsys, monkeypatch):
    logged, console = run(tmp_path, capsys, monkeypatch, "muon", optimizer={"name": "muon"})
    for i, row in logged.items():
        factor = cosine(i)
        assert close_on_the_console(console[i], LR * factor), (i, console)
        assert row["lr-base"] == pytest.approx(LR * factor, rel=1e-12, abs=1e-15)
        muon, adamw = groups(row, "lr-Muon/group0-muon"), groups(row, "lr-Muon/group")
        assert len(muon) == 1 and all(v == pytest.approx(0.02 * factor, abs=1e-15) for v in muon.values()), row
        adamw = {k: v for k, v in adamw.items() if "-adamw-" in k}
        assert len(adamw) == 2 and all(v == pytest.approx(LR * factor, abs=1e-15) for v in adamw.values()), row
    assert console[3] != pytest.approx(0.02 * cosine(3), rel=0.1)  # not Muon's rate


def test_layer_decay_run_shows_training_lr_on_the_console(tmp_path, cache_dir, capsys, monkeypatch):
    decay = 0.5
    logged, console = run(tmp_path, capsys, monkeypatch, "ld", layer_decay=decay)
    L = 2  # pythia-debug's blocks: the embeddings learn at lr * decay^(L + 1), block i at lr * decay^(L - i)
    for i, row in logged.items():
        factor = cosine(i)
        assert close_on_the_console(console[i], LR * factor), (i, console)
        assert row["lr-base"] == pytest.approx(LR * factor, rel=1e-12, abs=1e-15)
        expected = {"embeddings-decay": decay ** (L + 1), "block0-decay": decay ** L, "block0-no_decay": decay ** L,
                    "block1-decay": decay ** (L - 1), "block1-no_decay": decay ** (L - 1), "head-decay": 1.0,
                    "head-no_decay": 1.0}
        rates = {name.split("-", 2)[-1]: value for name, value in groups(row, "lr-AdamW/group").items()}
        assert set(rates) == set(expected), row
        for label, scale in expected.items():
            assert rates[label] == pytest.approx(LR * scale * factor, rel=1e-12, abs=1e-15), (label, row)
