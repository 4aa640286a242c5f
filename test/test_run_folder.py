"""What a run leaves behind: metrics, plots, summary, optional loggers, and `rafale plot`."""

import json
import re

import pytest

from rafale.run_folder import read_metrics
from conftest import run_in_process, write_config


def test_run_folder_has_metrics_plots_and_a_summary(tmp_path, cache_dir, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "loggers": ["tensorboard", "wandb"]},
                       training={"max_duration": "20ba", "eval_interval": "10ba", "save_interval": "20ba"})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch,
                                    env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "pythia-debug"
    series = read_metrics(run)
    assert [step for step, _ in series["metrics/eval/LanguageCrossEntropy"]] == [0, 10, 20]
    assert len(series["loss/train/total"]) == 20 and series["time/token"][-1] == (20, 20 * 8 * 64)
    assert series["throughput/tokens_per_sec"] and series["lr-base"] and series["lr-AdamW/group0-decay"]
    png = (run / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # the summary: parameters, tokens, speed and MFU, best validation loss, where things are
    speed = re.search(r"tokens trained: 10,240 in ([\d.]+) s, ([\d.]+) s of it training \(([\d,]+) tokens/s while "
                      r"training, MFU [\d.]+%(; the machine's load averaged [\d.]+ on its \d+ cores[^)]*)?\)", out)
    total_s, train_s, per_s = float(speed[1]), float(speed[2]), int(speed[3].replace(",", ""))
    assert train_s < total_s and abs(per_s - 10_240 / train_s) < abs(per_s - 10_240 / total_s)  # evaluation left out
    best = min(v for _, v in series["metrics/eval/LanguageCrossEntropy"])
    assert f"best validation LanguageCrossEntropy: {best:.4f}" in out
    assert "Hugging Face export:" in out
    # bits per byte, against the validation documents' own UTF-8 size (not rafale's byte table): every token of
    # the stream is scored except the first of each block, about 1 in 64 here
    import json, math
    from rafale.config import load_config
    from rafale.data.sources import load_source

    meta = json.loads((run / "data.json").read_text())["splits"]["validation"]
    text_bytes = sum(len(t.encode("utf-8")) for t in load_source(load_config(cfg).data, tmp_path)["validation"]["text"])
    ce, bpb = series["metrics/eval/LanguageCrossEntropy"][-1][1], series["metrics/eval/BitsPerByte"][-1][1]
    assert bpb == pytest.approx(ce * (meta["tokens"] - meta["blocks"]) / (math.log(2) * text_bytes), rel=0.03)
    assert re.search(r"validation: loss [\d.]+ \| perplexity [\d.]+ \| bits/byte [\d.]+", out)
    assert f"BitsPerByte: {bpb:.4f}" in out
    # the console: one line per log interval (10ba) and one per evaluation, not Composer's raw metric dump
    # (a machine loaded above its cores says so after the MFU)
    assert re.search(r"^\[20/20 100%\] loss [\d.]+ \| [\d,]+ tok/s \| MFU [\d.]+%( \(load [\d.]+ on \d+ cores\))? \| "
                     r"lr [\d.e+-]+ \| [\d.]+ min elapsed", out, re.M), out
    assert len(re.findall(r"^\[\s*\d+/20\s+\d+%\] validation: loss [\d.]+ \| perplexity [\d.]+", out, re.M)) == 3, out
    assert "time/sample_in_epoch" not in out + err
    vocabulary = (run / "data.json").read_text()
    assert '"vocab_size_asked": 500' in vocabulary and "rafale: vocabulary: " in out[out.index("rafale: run folder:"):]
    # the opt-in loggers wrote their files
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert list(run.rglob("offline-run-*"))

    code, out, _ = run_in_process(["plot", str(run), str(run), "--out", str(tmp_path / "both.png")], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"

    # `rafale runs`: one line per run, from the summary.json the run wrote
    (tmp_path / "runs" / "killed").mkdir()  # a run that never finished: its last logged values
    (tmp_path / "runs" / "killed" / "metrics.jsonl").write_text(
        '{"step": 5, "time/token": 2560, "metrics/eval/LanguageCrossEntropy": 4.5}\n')
    code, out, _ = run_in_process(["runs", str(tmp_path / "runs"), "--all"], capsys, monkeypatch)
    assert code == 0
    header, _, killed, finished = out.strip().splitlines()
    assert header.split() == ["run", "model", "params", "N", "tokens", "C", "wall", "tok/s", "val", "loss", "ppl",
                              "bits/byte"]
    final = series["metrics/eval/LanguageCrossEntropy"][-1][1]
    assert finished.split()[:4] == ["pythia-debug", "pythia", "pythia-debug", "0.17M"]
    assert "10,240" in finished and f"{final:.4f}" in finished
    assert killed.split()[:3] == ["killed", "(unfinished)", "2,560"] and "4.5000" in killed


def test_plot_of_a_folder_without_metrics_is_an_error(tmp_path, capsys, monkeypatch):
    code, _, err = run_in_process(["plot", str(tmp_path)], capsys, monkeypatch)
    assert code == 2 and "no metrics.jsonl" in err


def test_compile_option_trains_the_same_model(tmp_path, cache_dir, capsys, monkeypatch):
    # torch.compile on a CPU builds C++ kernels: about a minute, once
    losses = {}
    for compile_ in (False, True):
        cfg = write_config(tmp_path / f"c{compile_}.yaml",
                           run={"output_dir": str(tmp_path / "runs"), "name": f"compile-{compile_}"},
                           training={"max_duration": "5ba", "eval_interval": "5ba", "save_interval": "5ba",
                                     "compile": compile_})
        code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
        assert code == 0, err[-3000:]
        losses[compile_] = float(re.search(r"validation loss at end: ([\d.]+)", out).group(1))
        # the summary says whether it was on and, when it was, what compiling cost (the first batch's excess)
        summary = json.loads((tmp_path / "runs" / f"compile-{compile_}" / "summary.json").read_text())
        assert summary["compile"] is compile_ and summary["batch_s_median"] > 0 and summary["first_batch_s"] > 0
        line = re.search(r"torch.compile: on; first batch ([\d.]+) s, the next ones ([\d.]+) s \(median\): about "
                         r"[\d.]+ s of compiling", out)
        assert bool(line) is compile_ and ("torch.compile" in out) is compile_, out  # a comparison only when compiling
    assert abs(losses[True] - losses[False]) < 1e-3, losses
    assert summary["first_batch_s"] > 10 * summary["batch_s_median"]  # compiling takes seconds, a batch milliseconds


def test_on_a_terminal_a_progress_bar_carries_the_same_fields(tmp_path, cache_dir, capsys, monkeypatch):
    import sys

    from rafale.run import loggers

    # a terminal 120 columns wide (pytest's captured stdout has no size)
    monkeypatch.setattr(type(sys.stdout), "isatty", lambda self: True, raising=False)
    monkeypatch.setattr(loggers, "terminal_width", lambda stream: 120)
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       training={"max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba",
                                 "log_interval": "2ba"})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert re.search(r"\|█+\| 4/4 loss [\d.]+ .*min elapsed", out), out  # tqdm's bar, the fields after it
    assert re.search(r"\[4/4 100%\] validation: loss [\d.]+", out), out  # evaluations print above the bar
