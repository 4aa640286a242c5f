"""The console lines a person reads during a run (rafale.run.loggers), from the metrics Composer logs."""

import datetime
import io
import os
import types

import pytest

from rafale.run import loggers
from rafale.run.loggers import ConsoleLog, format_eval_line, format_train_line


def test_train_line_has_loss_speed_mfu_lr_and_time_in_minutes():
    logged = {"loss/train/total": 2.34567, "throughput/tokens_per_sec": 10030.4, "throughput/device/mfu": 0.371,
              "lr-AdamW/group0": 9.1e-4, "time/token": 4096}
    line = format_train_line(logged, elapsed_s=72, left_s=180, load=(1.5, 2))
    assert line == "loss 2.3457 | 10,030 tok/s | MFU 37.1% | lr 9.1e-04 | 1.2 min elapsed, 3.0 min left"
    # a machine loaded above its cores: said after the figures it lowers
    line = format_train_line(logged, elapsed_s=72, left_s=180, load=(5.25, 2))
    assert line == ("loss 2.3457 | 10,030 tok/s | MFU 37.1% (load 5.2 on 2 cores) | lr 9.1e-04 | 1.2 min elapsed, "
                    "3.0 min left")
    assert format_train_line({"loss/train/total": 1.0}, 6, load=(3.0, 2)) == (
        "loss 1.0000 | load 3.0 on 2 cores | 0.1 min elapsed")


def test_time_left_is_from_the_recent_batches():
    """A resumed run at batch 900 of 1000, its batches taking 2 s now: 200 s left, whatever the first ones took."""
    from rafale.run.loggers import RecentPace

    pace = RecentPace(window=50)
    assert pace.seconds_left(1000) is None
    pace.add(900, now=0.0)
    assert pace.seconds_left(1000) is None  # one batch: no pace yet
    now = 0.0
    for batch in range(901, 960):  # a slow start (compiling, a first evaluation) falls out of the window
        now += 30.0 if batch < 905 else 2.0
        pace.add(batch, now=now)
    assert pace.seconds_left(1000) == 2.0 * 41
    assert pace.seconds_left(None) is None


def test_the_end_of_run_lines_compare_batch_times_only_when_compiling_and_say_a_busy_machine():
    from pathlib import Path

    from rafale.run.record import describe

    summary = {"parameters": 1000, "tokens": 10_000, "wall_time_s": 20.0, "train_time_s": 10.0, "eval_time_s": 1.0,
               "checkpoint_time_s": 1.0, "startup_time_s": 5.0, "tokens_per_s": 1000.0, "mfu": 0.001,
               "first_batch_s": 1.35, "batch_s_median": 5.207, "compile": False,
               "machine_load": {"mean": 6.3, "max": 8.0, "cores": 2}, "segments": [], "validation": {}}
    text = describe(summary, Path("runs/x"))
    assert "torch.compile" not in text and "first batch" not in text
    assert ("1,000 tokens/s while training, MFU 0.1%; the machine's load averaged 6.3 on its 2 cores while it "
            "trained: other processes shared them") in text
    text = describe({**summary, "compile": True, "first_batch_s": 31.2, "batch_s_median": 0.2,
                     "machine_load": {"mean": 1.2, "max": 1.9, "cores": 2}}, Path("runs/x"))
    assert "torch.compile: on; first batch 31.20 s, the next ones 0.200 s (median): about 31.0 s of compiling" in text
    assert "load" not in text


LOGGED = {"loss/train/total": 2.34567, "throughput/tokens_per_sec": 10030.4, "throughput/device/mfu": 0.371,
          "lr-base": 9.1e-4}


def test_a_train_line_given_a_width_leaves_out_the_least_telling_parts_first():
    full = format_train_line(LOGGED, elapsed_s=72, left_s=180, load=(5.25, 2))
    assert format_train_line(LOGGED, 72, 180, (5.25, 2), width=len(full)) == full
    assert format_train_line(LOGGED, 72, 180, (5.25, 2), width=len(full) - 1) == (
        "loss 2.3457 | 10,030 tok/s | MFU 37.1% | lr 9.1e-04 | 1.2 min elapsed, 3.0 min left")  # the load first
    assert format_train_line(LOGGED, 72, 180, (5.25, 2), width=60) == "loss 2.3457 | 10,030 tok/s | MFU 37.1% | 3.0 min left"
    assert format_train_line(LOGGED, 72, 180, (5.25, 2), width=41) == "loss 2.3457 | 10,030 tok/s | 3.0 min left"
    assert format_train_line(LOGGED, 72, 180, width=26) == "loss 2.3457 | 3.0 min left"
    assert format_train_line(LOGGED, 72, None, width=30) == "loss 2.3457 | 1.2 min elapsed"  # the only time kept


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_state(batch: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(timestamp=types.SimpleNamespace(batch=batch, total_wct=datetime.timedelta(seconds=72)))


def drive(log: ConsoleLog, batches: range, logged: dict = LOGGED) -> None:
    """ConsoleLog as a run drives it, every batch due for a line (training.log_interval 1ba)."""
    log.total, log.due = 400, lambda state, event: True
    log.fit_start(fake_state(batches[0] - 1), None)
    for batch in batches:
        log.log_metrics(dict(logged))
        log.batch_end(fake_state(batch), None)


@pytest.mark.parametrize("columns", [80, 100])
def test_a_narrow_terminal_s_bar_keeps_the_loss_speed_and_time_left(columns, monkeypatch):
    """The bar tqdm draws fits the terminal with the figures in it: what does not fit is the lr, the MFU, the time
    elapsed, never the end of the line (which tqdm cut at the width: '... | MFU 37.1')."""
    monkeypatch.setattr(loggers, "machine_load", lambda: (5.25, 2))  # the longest line: a busy machine
    stream = Terminal()
    log = ConsoleLog("1ba", stream=stream, columns=lambda: columns)
    drive(log, range(1, 121))
    drawn = stream.getvalue().split("\r")[-1]
    log.close(None, None)
    assert len(drawn) <= columns and drawn.startswith(" 30%|") and "120/400" in drawn, drawn
    assert drawn.rstrip().endswith("loss 2.3457 | 10,030 tok/s | MFU 37.1% | 0.0 min left" if columns == 80 else
                                   "loss 2.3457 | 10,030 tok/s | MFU 37.1% | lr 9.1e-04 | 0.0 min left"), drawn


def read_all(master: int) -> str:
    """What was written so far to a pseudo-terminal, from its master end."""
    import select

    out = b""
    while select.select([master], [], [], 1.0)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # Linux: EIO once the other end is closed and all is read
            break
        if not chunk:
            break
        out += chunk
    return out.decode()


def test_a_terminal_of_unknown_size_gets_the_plain_lines_of_a_log():
    """A pseudo-terminal whose size is 0 x 0 (stty size: 0 0), where tqdm drew nothing at all: the training lines
    are printed, as in a log. One of 80 x 24 gets the bar."""
    import fcntl
    import struct
    import termios

    for rows, columns in ((0, 0), (24, 80)):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        with os.fdopen(slave, "w") as stream:
            log = ConsoleLog("1ba", stream=stream)
            drive(log, range(1, 4))
            log.close(None, None)
            out = read_all(master)
            if columns == 0:
                assert [line.split("]")[0] for line in out.splitlines()] == ["[  1/400   0%", "[  2/400   0%",
                                                                             "[  3/400   1%"], out
                assert out.count("loss 2.3457 | 10,030 tok/s") == 3, out
            else:
                assert "1%|" in out and "3/400 loss 2.3457" in out, out
            assert loggers.terminal_width(stream) == (columns or None) and log.bar_wanted == (columns > 0)
        os.close(master)


def test_train_line_leaves_out_what_was_not_logged():
    assert format_train_line({"loss/train/total": 1.0}, elapsed_s=6) == "loss 1.0000 | 0.1 min elapsed"


def test_eval_line_names_each_validation_metric():
    logged = {"metrics/eval/LanguageCrossEntropy": 1.01, "metrics/eval/LanguagePerplexity": 2.7456,
              "metrics/eval/BitsPerByte": 0.4123, "loss/train/total": 3.0}
    assert format_eval_line(logged) == "validation: loss 1.0100 | perplexity 2.75 | bits/byte 0.4123"
    assert format_eval_line({"metrics/eval/CrossEntropy": 0.3, "metrics/eval/Accuracy": 0.98}) == (
        "validation: loss 0.3000 | accuracy 0.9800")


def test_every_command_has_its_own_help_with_an_example(capsys):
    import pytest

    from rafale.main import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit.value.code == 0 and f"rafale {name}" in out and ("example: rafale" in out or "examples:\n  rafale" in out), name
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"rafale {name} " in out for name in COMMANDS)  # the top-level help lists every command


def test_a_cache_build_draws_no_save_to_disk_bar(tmp_path):
    """`datasets.save_to_disk` draws "Saving the dataset (0/1 shards)" for every split; rafale says it cached."""
    from conftest import RAFALE, run_cli, write_config

    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")}, data={"num_train_stories": 200})
    result = run_cli([*RAFALE, "-c", str(cfg)], env={"DATA": "1", "RAFALE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data cached at" in result.stdout  # built here, not found in a cache
    assert "Saving the dataset" not in result.stdout + result.stderr, result.stderr[-2000:]


def test_saving_a_split_leaves_the_datasets_progress_bars_as_they_were(tmp_path):
    """The `map` that tokenizes a split keeps its bar (rafale shows none of its own for it)."""
    import datasets

    from rafale.data.cache import save_split

    split = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4]]})
    assert not datasets.are_progress_bars_disabled()
    save_split(split, tmp_path / "train", scratch=None)
    assert not datasets.are_progress_bars_disabled()
    assert datasets.load_from_disk(str(tmp_path / "train"))["input_ids"] == [[1, 2], [3, 4]]


def test_eval_batches_are_clamped_to_the_validation_batches(capsys):
    from rafale.run.loggers import eval_subset_batches

    assert eval_subset_batches(None, 12) == -1 and eval_subset_batches(5, 12) == 5 and eval_subset_batches(12, 12) == 12
    assert capsys.readouterr().out == ""
    assert eval_subset_batches(50, 12) == 12
    assert capsys.readouterr().out == (
        "rafale: training.eval_batches is 50 but the validation split has 12 batches: evaluating on 12\n")


def test_more_eval_batches_than_validation_gives_one_rafale_line_and_no_composer_warning(tmp_path, cache_dir):
    from conftest import RAFALE, run_cli, write_config

    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       training={"max_duration": "1ba", "eval_batches": 50})
    result = run_cli([*RAFALE, "-c", str(cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    # pythia_debug's validation split: 206 blocks in batches of 8
    line = "rafale: training.eval_batches is 50 but the validation split has 26 batches: evaluating on 26"
    assert result.stdout.count(line) == 1, result.stdout[-2000:]
    assert "DataloaderNumBatchesWarning" not in result.stdout + result.stderr, result.stderr[-2000:]


def test_data_preparation_says_each_stage_and_no_library_draws_a_bar(tmp_path, capsys, monkeypatch):
    """DATA=1 on a .txt is never silent for long (reading, tokenizer training, tokenizing, writing each speak in a
    log), and a classifier's .csv shows none of datasets' bars ("Generating train split", map's "tokenizing")."""
    import csv

    import rafale.progress
    from conftest import run_in_process, write_config
    from rafale.data.stories import labelled_story_splits

    monkeypatch.setenv("RAFALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(rafale.progress, "EVERY_S", 0.0)  # a line at every update: each stage says it runs
    pairs = labelled_story_splits(200, 40, seed=0)
    for split, rows in pairs.items():
        (tmp_path / f"{split}.txt").write_text("\n".join(text.replace("\n", " ") for text, _ in rows))
        with (tmp_path / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    lm = write_config(tmp_path / "lm.yaml", run={"output_dir": str(tmp_path / "runs")},
                      data={"source": {"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "validation.txt")},
                            "doc_separator": "\n"})
    code, out, err = run_in_process(["-c", str(lm)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-2000:]
    for stage in ("reading train.txt", "reading validation.txt", "training the tokenizer", "tokenizing train",
                  "tokenizing validation", "writing the cache"):  # on stderr: a status, stdout is for results
        assert f"rafale: {stage}: " in err and any(line.startswith(f"rafale: {stage}: ") and line.endswith("(done)")
                                                  for line in err.splitlines()), (stage, err)
    assert "of 200 documents (100%)" in err  # the tokenizer read every training document
    cls = write_config(tmp_path / "cls.yaml", base="bert_cls_stories.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"source": {"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "validation.csv")},
                             "vocab_size": 500, "block_size": 64})
    code, out, err = run_in_process(["-c", str(cls)], capsys, monkeypatch, env={"DATA": "1"})
    assert code == 0, err[-2000:]
    assert "rafale: tokenizing train: 200 of 200 examples (100%)" in err
    for library in ("Generating train split", "%|", "\r", "Saving the dataset", "Map"):
        assert library not in out + err, (library, out + err)


def test_score_and_generate_help_name_every_family_they_take(capsys):
    """`rafale score --help` once said "a causal LM (pythia)" and generate's README line "any GPT-NeoX folder",
    though both run Llama, Qwen2 and Qwen3 (test_llama's run through the command line)."""
    import pytest

    from rafale.main import main
    from rafale.models.families import FAMILIES

    def help_of(command):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width

    score = help_of("score")
    assert all(name in score for name, family in FAMILIES.items() if {"causal_lm", "mlm"} & set(family.heads))
    assert "pythia, llama, qwen2, qwen3" in score and "bert, roberta" in score
    generate = help_of("generate")
    decoders = [family for family in FAMILIES.values() if family.can_generate]
    assert [f.name for f in decoders] == ["pythia", "llama", "qwen2", "qwen3"]
    assert all(f.name in generate and all(a in generate for a in f.hf.architectures) for f in decoders)


def test_metrics_png_is_redrawn_at_the_end_and_at_most_once_a_minute_between(tmp_path, monkeypatch):
    """A drawing costs a second or two of CPU: drawn at every evaluation it was a fifth of a short run. The end
    always draws; an evaluation draws when the last drawing is `redraw_s` old; closing after an evaluation that
    was not drawn (an interrupted run) draws it."""
    drawn = []
    monkeypatch.setattr(loggers, "plot_run", lambda run_dir: drawn.append(run_dir))
    clock = [1000.0]
    monkeypatch.setattr(loggers.time, "monotonic", lambda: clock[0])
    metrics = loggers.MetricsFile(tmp_path, redraw_s=60)
    metrics.eval_end(None, None)
    clock[0] += 59
    metrics.eval_end(None, None)
    assert drawn == []
    clock[0] += 1
    metrics.eval_end(None, None)
    assert drawn == [tmp_path]
    metrics.fit_end(None, None)
    assert len(drawn) == 2
    metrics.close(None, None)  # nothing evaluated since the end's drawing
    assert len(drawn) == 2
    interrupted = loggers.MetricsFile(tmp_path, redraw_s=60)
    interrupted.eval_end(None, None)
    interrupted.close(None, None)
    assert len(drawn) == 3
