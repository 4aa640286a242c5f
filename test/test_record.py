"""The run's record is the run: after a resume, a re-run, an eval-only or a sweep re-run, config.yaml, summary.json
and metrics.jsonl say exactly what happened (rafale/run/record.py). Every test goes through `rafale -c` (or `rafale
sweep`) on short runs of test/pythia_debug.yaml."""

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import RAFALE, run_cli, run_in_process, write_config
from rafale.run_folder import read_checkpoint_weights
from rafale.run_folder import read_metrics

# 12 batches, a checkpoint and an evaluation every 4, every checkpoint kept
RECORDED = {"max_duration": "12ba", "save_interval": "4ba", "eval_interval": "4ba", "eval_batches": 2,
            "checkpoints_to_keep": -1, "log_interval": "1ba"}


def config(tmp_path: Path, name="cfg.yaml", run=None, training=None, **sections) -> Path:
    return write_config(tmp_path / name, run={"output_dir": str(tmp_path / "runs"), **(run or {})},
                        training={**RECORDED, **(training or {})}, **sections)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def record_files(run_dir: Path) -> dict:
    return {name: (run_dir / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.jsonl")}


def test_a_segment_cut_at_a_batch_keeps_its_start_up_and_scales_the_rest_of_its_times():
    """cut's formula by hand: a segment of batches 0-40 (wall 100 s, 10 s of it start-up) cut at batch 16 keeps
    16/40 of its training, evaluation and checkpoint time and of its wall time after the start-up: 10 + 90 x 0.4."""
    from rafale.run.record import cut

    segment = {"batches": [0, 40], "tokens": 40 * 512, "wall_time_s": 100.0, "startup_time_s": 10.0,
               "train_time_s": 70.0, "eval_time_s": 15.0, "checkpoint_time_s": 5.0, "ended": "complete"}
    shorter = cut(segment, 16)
    assert shorter["batches"] == [0, 16] and shorter["tokens"] == 16 * 512
    assert (shorter["train_time_s"], shorter["eval_time_s"], shorter["checkpoint_time_s"]) == (28.0, 6.0, 2.0)
    assert shorter["startup_time_s"] == 10.0 and shorter["wall_time_s"] == 10.0 + 90.0 * 16 / 40 == 46.0
    assert cut(segment, 40) is segment  # ends there already
    unknown = dict(segment, wall_time_s=None, startup_time_s=None, train_time_s=None, eval_time_s=None,
                   checkpoint_time_s=None)  # a segment killed before its record was saved
    assert all(cut(unknown, 16)[key] is None for key in ("wall_time_s", "train_time_s", "startup_time_s"))


def train(cfg: Path, capsys, monkeypatch, *overrides, expect=0) -> str:
    code, out, err = run_in_process(["-c", str(cfg), *overrides], capsys, monkeypatch)
    assert code == expect, (out + err)[-3000:]
    return out + err


def test_a_resume_refuses_a_changed_optimizer_and_records_the_changes_it_applies(tmp_path, cache_dir, capsys,
                                                                                monkeypatch):
    cfg = config(tmp_path, training={"max_duration": "4ba"})
    train(cfg, capsys, monkeypatch)
    run_dir = tmp_path / "runs" / "pythia-debug"
    before = record_files(run_dir)
    # the optimizer's state comes back from the checkpoint: a new lr or weight decay would be recorded but not run
    out = train(cfg, capsys, monkeypatch, "training.lr=3e-2", "training.weight_decay=0.5", "training.max_duration=8ba",
                expect=2)
    assert "training.lr was 0.003, now 0.03" in out and "training.weight_decay was 0.1, now 0.5" in out, out
    assert "cannot resume" in out and record_files(run_dir) == before
    # a longer run is applied from the batch it resumes at, and the record says so
    out = train(cfg, capsys, monkeypatch, "training.max_duration=8ba", "training.eval_interval=2ba")
    assert "training.max_duration: 4ba -> 8ba, from batch 4" in out, out
    summary = summary_of(run_dir)
    assert [s["batches"] for s in summary["segments"]] == [[0, 4], [4, 8]]
    assert summary["segments"][1]["config_changes"] == {"training.eval_interval": ["4ba", "2ba"],
                                                        "training.max_duration": ["4ba", "8ba"]}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["training"]
    assert saved["max_duration"] == "8ba" and saved["lr"] == 0.003  # what the last segment ran with


def swapped(text: str, a: str, b: str) -> str:
    assert len(a) == len(b)
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


def test_a_corpus_edited_without_changing_its_size_is_not_resumed_but_a_moved_one_is(tmp_path, cache_dir, capsys,
                                                                                    monkeypatch):
    from datasets import Dataset

    from rafale.data.tokenizers import train_tokenizer
    from rafale.data.stories import story_splits

    stories = story_splits(120, 0, seed=0)["train"]
    text = "\n<|endoftext|>\n".join(stories)
    assert text.count(" she ") > 10 and text.count(" the ") > 10
    train_tokenizer(Dataset.from_dict({"text": stories}), 500).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stories.txt").write_text(text)
    cfg = config(tmp_path, training={"max_duration": "4ba", "batch_size": 4},
                 data={"source": str(tmp_path / "a" / "stories.txt"), "val_fraction": 0.1,
                       "tokenizer": str(tmp_path / "tokenizer.json")})
    train(cfg, capsys, monkeypatch)
    run_dir = tmp_path / "runs" / "pythia-debug"
    before = record_files(run_dir)
    # two words swapped throughout: the same documents, tokens and blocks per split, other text
    (tmp_path / "a" / "stories.txt").write_text(swapped(text, " she ", " the "))
    out = train(cfg, capsys, monkeypatch, "training.max_duration=6ba", expect=2)
    assert "the data's train split has other content" in out and "resumed" not in out, out
    assert record_files(run_dir) == before
    sizes = lambda meta: {name: (split["tokens"], split["blocks"]) for name, split in meta["splits"].items()}
    old = json.loads((run_dir / "data.json").read_text())  # the cache the run trained on
    new = json.loads(max((cache_dir / "causal_lm").glob("*/rafale.json"), key=lambda f: f.stat().st_mtime).read_text())
    assert sizes(old) == sizes(new) and old["splits"] != new["splits"]  # what the guard used to compare
    # the very same text, moved to another folder, resumes
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stories.txt").write_text(text)
    out = train(cfg, capsys, monkeypatch, "training.max_duration=6ba", f"data.source={tmp_path / 'b' / 'stories.txt'}")
    assert f"resumed {run_dir} at batch 4" in out, out


def test_a_resume_under_another_model_type_is_refused(tmp_path, cache_dir, capsys, monkeypatch):
    """A decoder variant registered as its own model.type, re-run as plain pythia: the same sizes, another model."""
    import dataclasses

    from rafale.models import pythia
    from rafale.models.decoder import GPTNeoX
    from rafale.models.families import FAMILIES

    class Variant(GPTNeoX):
        pass

    def build_variant(model_cfg, head, meta, tokenizer):
        lm = pythia.PYTHIA.build(model_cfg, head, meta, tokenizer)
        lm.model.__class__ = Variant
        return lm

    variant = dataclasses.replace(pythia.PYTHIA, name="pythia-variant", build=build_variant)
    monkeypatch.setitem(FAMILIES, "pythia-variant", variant)
    cfg = config(tmp_path, training={"max_duration": "4ba"}, model={"type": "pythia-variant"})
    train(cfg, capsys, monkeypatch)
    out = train(config(tmp_path, training={"max_duration": "6ba"}), capsys, monkeypatch, expect=2)
    assert "model.type was 'pythia-variant', now 'pythia'" in out and "resumed" not in out, out


def test_eval_only_writes_its_own_record_and_a_rerun_of_a_finished_run_changes_nothing(tmp_path, cache_dir, capsys,
                                                                                     monkeypatch):
    cfg = config(tmp_path, training={"max_duration": "8ba"})
    train(cfg, capsys, monkeypatch)
    run_dir = tmp_path / "runs" / "pythia-debug"
    before = record_files(run_dir)
    steps = [row["step"] for row in metric_rows(run_dir)]
    # a re-run of the finished run: nothing to do, nothing rewritten (not the summary, not config.yaml)
    out = train(cfg, capsys, monkeypatch, "training.eval_interval=2ba")
    assert "at batch 8: already complete" in out and "not applied" in out and "training.eval_interval" in out, out
    assert record_files(run_dir) == before
    assert summary_of(run_dir)["tokens"] == 8 * 8 * 64 and summary_of(run_dir)["tokens_per_s"] > 0
    code, table, _ = run_in_process(["runs", str(tmp_path / "runs"), "--all"], capsys, monkeypatch)  # no note below
    assert code == 0 and "4,096" in table and "(" not in table.splitlines()[-1], table  # not shown as empty
    # an evaluation of its batch-4 checkpoint: a record of its own under evals/, the run's files untouched
    checkpoint = run_dir / "checkpoints" / "ep0-ba4-rank0.pt"
    out = train(cfg, capsys, monkeypatch, "training.eval_only=true", f"training.load_path={checkpoint}")
    assert record_files(run_dir) == before and [row["step"] for row in metric_rows(run_dir)] == steps
    (evaluation,) = (run_dir / "evals").iterdir()
    summary = summary_of(evaluation)
    assert summary["eval_only"] is True and summary["batches"] == 4 and summary["checkpoint"] == str(checkpoint)
    at_4 = next(row for row in metric_rows(run_dir) if row["step"] == 4)
    assert summary["validation"]["LanguageCrossEntropy"] == pytest.approx(at_4["metrics/eval/LanguageCrossEntropy"])
    assert [row["step"] for row in metric_rows(evaluation)] == [4]
    assert yaml.safe_load((evaluation / "config.yaml").read_text())["training"]["eval_only"] is True
    assert f"its record: {evaluation}" in out
    # scored with another tokenizer (trained on other stories), the checkpoint would read 5.33 where it is 4.61:
    # refused, naming the difference and its likely cause; its own tokenizer.json is accepted
    out = train(cfg, capsys, monkeypatch, "training.eval_only=true", f"training.load_path={checkpoint}",
                "data.num_train_stories=300", expect=2)
    assert "the tokenizer differs from the run's" in out and "vocabulary entries differ" in out, out
    assert "data.num_train_stories was 400, now 300" in out and f"data.tokenizer={run_dir / 'tokenizer.json'}" in out
    assert len(list((run_dir / "evals").iterdir())) == 1
    train(cfg, capsys, monkeypatch, "training.eval_only=true", f"training.load_path={checkpoint}",
          f"data.tokenizer={run_dir / 'tokenizer.json'}")
    (own,) = set((run_dir / "evals").iterdir()) - {evaluation}
    assert summary_of(own)["validation"] == summary["validation"]


def test_tokens_per_second_counts_the_time_inside_training_batches(tmp_path, cache_dir, capsys, monkeypatch):
    """Slow checkpoint saves (a busy disk) must not lower tokens/s, and the summary says what they took."""
    from composer.callbacks import CheckpointSaver

    save = CheckpointSaver._save_checkpoint

    def slow_save(self, state, logger):
        time.sleep(2.5)
        return save(self, state, logger)

    monkeypatch.setattr(CheckpointSaver, "_save_checkpoint", slow_save)
    cfg = config(tmp_path, training={"max_duration": "4ba", "save_interval": "2ba"})
    train(cfg, capsys, monkeypatch)
    summary = summary_of(tmp_path / "runs" / "pythia-debug")
    assert summary["checkpoint_time_s"] >= 5.0  # two saves of 2.5 s each
    assert summary["tokens_per_s"] == pytest.approx(4 * 8 * 64 / summary["train_time_s"], rel=1e-3)
    parts = sum(summary[k] for k in ("train_time_s", "eval_time_s", "checkpoint_time_s", "startup_time_s"))
    assert parts <= summary["wall_time_s"]
    # Composer's own clock of the training batches (time/train, in hours) holds the saves; rafale's does not
    composer_s = metric_rows(tmp_path / "runs" / "pythia-debug")[-1]["time/train"] * 3600
    assert summary["train_time_s"] < composer_s - 2.0  # the save at batch 2 (the one at 4 comes after its last row)


# ----------------------------------------------------------------------------------------------------
# the whole story on one config: uninterrupted A; B stopped by SIGTERM, then killed, then finished; a re-run of
# B; an eval-only of B's middle checkpoint


class SignalAt:
    """A callback that sends this process SIGTERM at the end of one batch, as a scheduler or Ctrl-C would."""

    def __new__(cls, batch: int):
        import os

        from composer.core import Callback

        class Send(Callback):
            def batch_end(self, state, logger):
                if int(state.timestamp.batch) == batch:
                    os.kill(os.getpid(), signal.SIGTERM)

        return Send()


def test_an_interrupted_and_resumed_run_records_what_an_uninterrupted_one_does(tmp_path, cache_dir, capsys,
                                                                               monkeypatch):
    import os
    import subprocess

    import rafale.run.train as train_module
    from conftest import ROOT

    a_cfg = config(tmp_path, "a.yaml", run={"name": "a"})
    b_cfg = config(tmp_path, "b.yaml", run={"name": "b"})
    train(a_cfg, capsys, monkeypatch)
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"

    with monkeypatch.context() as m:  # B is stopped by SIGTERM after batch 5: it saves a checkpoint there and stops
        callbacks = train_module.make_callbacks
        m.setattr(train_module, "make_callbacks", lambda *args: callbacks(*args) + [SignalAt(5)])
        out = train(b_cfg, capsys, monkeypatch, expect=143)
    assert "stopped by SIGTERM at batch 5" in out and summary_of(b)["status"] == "stopped"
    assert summary_of(b)["batches"] == 5 and summary_of(b)["stopped_by"] == "SIGTERM"
    # resumed in another process, killed outright once its batch-8 checkpoint (and the record with it) is saved
    process = subprocess.Popen([*RAFALE, "-c", str(b_cfg)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 300
    while summary_of(b)["batches"] < 8:
        assert process.poll() is None, f"it ended (code {process.returncode}) first: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    process.kill()
    process.wait()
    assert summary_of(b)["status"] == "in progress"
    out = train(b_cfg, capsys, monkeypatch)  # resumed again, to the end
    assert "resumed" in out and "at batch 8" in out, out

    # the same weights, bit for bit, and the same record where a record can be the same
    final = "checkpoints/ep0-ba12-rank0.pt"
    wa, wb = read_checkpoint_weights(a / final), read_checkpoint_weights(b / final)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = summary_of(a), summary_of(b)
    for key in ("status", "batches", "tokens", "parameters", "validation", "validation_step", "validation_loss_start"):
        assert sa[key] == sb[key], key
    assert [s["batches"] for s in sb["segments"]] == [[0, 5], [5, 8], [8, 12]]
    assert [s["ended"] for s in sb["segments"]] == ["stopped", "killed after its checkpoint at batch 8", "complete"]
    assert sum(s["tokens"] for s in sb["segments"]) == sb["tokens"] == 12 * 8 * 64
    assert sb["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in sb["segments"]), abs=0.01)
    assert sb["tokens_per_s"] == pytest.approx(sb["tokens"] / sb["train_time_s"], rel=1e-3)
    # metrics.jsonl: one row per step, in order, the same steps and training losses as A's
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == list(range(13))
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss/train/total", "metrics/eval/LanguageCrossEntropy", "time/token"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    ca, cb = (yaml.safe_load((d / "config.yaml").read_text()) for d in (a, b))
    ca["run"]["name"] = cb["run"]["name"]
    assert ca == cb

    # a re-run of the finished B rewrites nothing; an eval-only of its middle checkpoint has its own record
    before = record_files(b)
    assert "already complete" in train(b_cfg, capsys, monkeypatch)
    train(b_cfg, capsys, monkeypatch, "training.eval_only=true", f"training.load_path={b / 'checkpoints/ep0-ba8-rank0.pt'}")
    assert record_files(b) == before
    (evaluation,) = (b / "evals").iterdir()
    at_8 = next(r for r in rows_a if r["step"] == 8)
    assert summary_of(evaluation)["validation"]["LanguageCrossEntropy"] == pytest.approx(
        at_8["metrics/eval/LanguageCrossEntropy"], abs=1e-6)


def test_a_sweep_rerun_with_a_changed_base_value_is_refused_or_restarted_never_reported_stale(tmp_path, cache_dir,
                                                                                              capsys, monkeypatch):
    cfg = config(tmp_path, run={"name": "sw"}, training={"max_duration": "2ba", "eval_interval": "2ba",
                                                         "save_interval": "2ba"})
    axes = ["training.lr=1e-3,3e-3"]
    code, out, err = run_in_process(["sweep", "-c", str(cfg), *axes, "model.num_layers=1"], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    runs = tmp_path / "runs"
    one_layer = {name: record_files(runs / name) for name in ("sw-lr-1e-3", "sw-lr-3e-3")}
    # the same sweep on a changed base: refused before anything runs, naming the runs and what differs
    code, out, err = run_in_process(["sweep", "-c", str(cfg), *axes, "model.num_layers=2"], capsys, monkeypatch)
    assert code == 2 and "skipped" not in out, out + err
    assert "sw-lr-1e-3 (model.num_layers was 1, now 2)" in err and "--restart" in err, err
    assert {name: record_files(runs / name) for name in one_layer} == one_layer
    # with --restart the runs are trained again, and the table describes the runs it lists
    code, out, err = run_in_process(["sweep", "-c", str(cfg), *axes, "model.num_layers=2", "--restart"], capsys,
                                    monkeypatch)
    assert code == 0, err[-3000:]
    for name in one_layer:
        assert yaml.safe_load((runs / name / "config.yaml").read_text())["model"]["num_layers"] == 2
        (aside,) = runs.glob(f"{name}.old-*")
        assert record_files(aside) == one_layer[name]
    table = (runs / "sweep-sw.md").read_text()
    assert table.startswith("Every run: model.num_layers=2\n")
    two_layer_params = summary_of(runs / "sw-lr-1e-3")["parameters"]
    assert two_layer_params > json.loads(one_layer["sw-lr-1e-3"]["summary.json"])["parameters"]
    # and a rerun of that sweep skips both: they completed with this very config
    code, out, err = run_in_process(["sweep", "-c", str(cfg), *axes, "model.num_layers=2"], capsys, monkeypatch)
    assert code == 0 and out.count("completed before with this config; skipped") == 2, out + err
