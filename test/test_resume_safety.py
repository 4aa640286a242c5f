"""Results a researcher can trust: a run folder resumes only what it trained, loads no code from a checkpoint,
and holds everything needed to rebuild its model."""

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_in_process, write_config
from rafale.config import load_config
from rafale.data.cache import PreparedData
from rafale.run_folder import latest_checkpoint, load_run_model
from rafale.run.resilience import prune_checkpoints, read_checkpoint
from rafale.run_folder import data_conflicts

# two checkpoints (batches 2 and 4), the last one at the end of training, so the export equals it
SHORT = {"max_duration": "4ba", "save_interval": "2ba", "eval_interval": "4ba", "eval_batches": 1,
         "checkpoints_to_keep": -1}


def config(tmp_path: Path, name="cfg.yaml", run=None, training=None, **sections) -> Path:
    return write_config(tmp_path / name, run={"output_dir": str(tmp_path / "runs"), **(run or {})},
                        training={**SHORT, **(training or {})}, **sections)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A finished short pythia-debug run: (its config file, its run folder). Tests copy the folder to change it."""
    from rafale.main import main

    tmp = tmp_path_factory.mktemp("trained")
    cfg = config(tmp)
    with pytest.raises(SystemExit) as exit:
        main(["-c", str(cfg)])
    assert exit.value.code == 0
    return cfg, tmp / "runs" / "pythia-debug"


def copy_run(trained, tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "pythia-debug"
    shutil.copytree(trained[1], run_dir, symlinks=True)
    return run_dir


def folder_files(run_dir: Path) -> dict:
    return {name: (run_dir / name).read_bytes() for name in ("config.yaml", "tokenizer.json", "data.json", "model.json")}


class Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint could do with any other function."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def write_payload(path: Path, marker: Path):
    torch.save({"state": {"model": {}}, "rng": [], "payload": Payload(marker)}, path)


# ----------------------------------------------------------------------------------------------------
# 1. resuming a run whose inputs changed


@pytest.mark.parametrize("change, expected", [
    ({"model": {"hidden_size": 32, "intermediate_size": 128}}, "the model's hidden_size was 64, now 32"),
    ({"data": {"block_size": 32}}, "data.block_size was 64, now 32"),
    ({"data": {"vocab_size": 400}}, "the tokenizer differs from the run's tokenizer.json"),
])
def test_resuming_with_other_data_or_model_is_an_error_that_changes_nothing(trained, tmp_path, capsys, monkeypatch,
                                                                           change, expected):
    run_dir = copy_run(trained, tmp_path)
    before = folder_files(run_dir)
    code, out, err = run_in_process(["-c", str(config(tmp_path, training={"max_duration": "6ba"}, **change))],
                                    capsys, monkeypatch)
    assert code == 2, err[-3000:]
    assert f"cannot resume {run_dir}" in err and expected in err, err
    assert "new run.name" in err and "--restart" in err and "Traceback" not in err
    assert folder_files(run_dir) == before  # nothing overwritten
    assert not (run_dir / "checkpoints" / "ep0-ba6-rank0.pt").exists()


def test_a_moved_data_file_still_resumes_but_other_contents_do_not(tmp_path):
    """A local file's cache fingerprint holds its path and modification time: moving or copying it must not block
    a resume; other contents must, even of the same size (each split's sha256 digest). Run folders written before
    the digests compare what the splits yield instead (tokens, blocks)."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_dir.mkdir(), cache.mkdir()
    (cache / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    shutil.copy(cache / "tokenizer.json", run_dir / "tokenizer.json")

    def meta(path, mtime, train_blocks, sha=None):
        split = {"tokens": 640, "blocks": train_blocks} | ({"sha256": sha} if sha else {})
        return {"config": {"source": path}, "splits": {"train": split},
                "fingerprint_inputs": {"pipeline": ["causal_lm", 1], "source": [[[path, 100, mtime]], "text"],
                                       "tokenizer": ["bpe", 500], "block_size": 64}}

    for sha_old, sha_edited in ((None, None), ("aaaa", "bbbb")):
        (run_dir / "data.json").write_text(json.dumps(meta("/old/stories.txt", 1, 10, sha_old)))
        moved = PreparedData(None, None, cache, meta("/new/stories.txt", 2, 10, sha_old))
        assert data_conflicts(run_dir, moved, {}) == []
        edited = PreparedData(None, None, cache, meta("/old/stories.txt", 3, 10 if sha_old else 9, sha_edited))
        expected = ("the data's train split has other content (sha256 aaaa, now bbbb)" if sha_old else
                    "data split train was {'tokens': 640, 'blocks': 10}, now {'tokens': 640, 'blocks': 9}")
        assert data_conflicts(run_dir, edited, {}) == [expected]
    # the same with a file per split (data.source: {train: ..., validation: ...}), before the digests
    (run_dir / "data.json").write_text(json.dumps(meta({"train": "/old/t.txt", "validation": "/old/v.txt"}, 1, 10)))
    moved = PreparedData(None, None, cache, meta({"train": "/new/t.txt", "validation": "/new/v.txt"}, 2, 10))
    assert data_conflicts(run_dir, moved, {}) == []
    edited = PreparedData(None, None, cache, meta({"train": "/old/t.txt", "validation": "/old/v.txt"}, 3, 9))
    assert len(data_conflicts(run_dir, edited, {})) == 1


def test_changing_only_durations_intervals_and_loggers_resumes(trained, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(trained, tmp_path)
    cfg = config(tmp_path, training={"max_duration": "6ba", "save_interval": "3ba", "eval_interval": "3ba",
                                     "log_interval": "1ba", "eval_batches": 2})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert f"resumed {run_dir} at batch 4" in out
    assert (run_dir / "checkpoints" / "ep0-ba6-rank0.pt").is_file()


def test_restart_sets_the_old_folder_aside_and_starts_over(trained, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(trained, tmp_path)
    before = folder_files(run_dir)
    cfg = config(tmp_path, model={"hidden_size": 32, "intermediate_size": 128})
    code, out, err = run_in_process(["-c", str(cfg), "--restart"], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "resumed" not in out and "validation loss at start" in out  # a fresh run
    (aside,) = run_dir.parent.glob("pythia-debug.old-*")
    assert folder_files(aside) == before and (aside / "checkpoints" / "ep0-ba4-rank0.pt").is_file()
    assert load_config(run_dir / "config.yaml").run.restart is False  # rerunning the saved config resumes
    assert load_config(run_dir / "config.yaml").model.overrides["hidden_size"] == 32


# ----------------------------------------------------------------------------------------------------
# 2. checkpoints are never unpickled


def test_real_checkpoints_hold_only_allowed_types(trained):
    for path in (trained[1] / "checkpoints").glob("*.pt"):
        state = read_checkpoint(path)  # weights_only=True with the allow-list: raises on anything else
        assert {"model", "optimizers", "schedulers", "timestamp"} <= state["state"].keys()


def test_crafted_load_path_is_refused_without_running_it(trained, tmp_path, capsys, monkeypatch):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    write_payload(evil, marker)
    code, out, err = run_in_process(["-c", str(config(tmp_path, training={"load_path": str(evil)}))], capsys, monkeypatch)
    assert code == 2 and not marker.exists()
    assert f"training.load_path: {evil} is not a Composer checkpoint" in err and "io.open" in err, err
    assert "training.trust_checkpoint: true" in err and "Traceback" not in err

    evil.write_bytes(os.urandom(1000))  # a wrong file: the same message, no traceback
    code, out, err = run_in_process(["-c", str(config(tmp_path, training={"load_path": str(evil)}))], capsys, monkeypatch)
    assert code == 2 and f"training.load_path: {evil} is not a Composer checkpoint" in err and "Traceback" not in err


def test_crafted_latest_checkpoint_is_refused_by_autoresume_without_running_it(trained, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(trained, tmp_path)
    marker, evil = tmp_path / "pwned", run_dir / "checkpoints" / "ep0-ba6-rank0.pt"
    write_payload(evil, marker)
    (run_dir / "checkpoints" / "latest-rank0.pt").unlink()
    os.symlink(evil.name, run_dir / "checkpoints" / "latest-rank0.pt")
    code, out, err = run_in_process(["-c", str(config(tmp_path, training={"max_duration": "8ba"}))], capsys, monkeypatch)
    assert code == 2 and not marker.exists()
    assert f"autoresume: {evil} is not a Composer checkpoint" in err and "training.trust_checkpoint" in err, err


# ----------------------------------------------------------------------------------------------------
# 3. the latest checkpoint is Composer's link, else the highest batch


def test_latest_checkpoint_follows_the_link_then_the_batch_number(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for batch, mtime in ((4, 300), (10, 100), (20, 200)):  # modification times in another order
        (folder / f"ep0-ba{batch}-rank0.pt").touch()
        os.utime(folder / f"ep0-ba{batch}-rank0.pt", (mtime, mtime))
    os.symlink("ep0-ba10-rank0.pt", folder / "latest-rank0.pt")
    assert latest_checkpoint(tmp_path) == folder / "ep0-ba10-rank0.pt"
    (folder / "latest-rank0.pt").unlink()
    assert latest_checkpoint(tmp_path) == folder / "ep0-ba20-rank0.pt"  # 20 > 10 > 4, whatever the times


# ----------------------------------------------------------------------------------------------------
# 4. a run folder is self-contained


@pytest.mark.parametrize("case", ["data moved", "relative paths, other directory", "offline hub model"])
def test_generate_and_export_need_only_the_run_folder(trained, tmp_path, capsys, monkeypatch, case):
    run_dir = copy_run(trained, tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    if case == "data moved":
        saved["data"]["source"] = str(tmp_path / "moved-away.jsonl")
    elif case == "relative paths, other directory":
        (tmp_path / "here").mkdir()
        shutil.copy(run_dir / "tokenizer.json", tmp_path / "here" / "tok.json")
        saved["data"].update(source="stories.jsonl", tokenizer="tok.json")
        (tmp_path / "here" / "stories.jsonl").write_text('{"text": "a story"}\n')
        saved["training"]["load_path"] = "checkpoints/start.pt"
        monkeypatch.chdir(tmp_path)  # not the directory the paths are relative to
    else:
        saved["model"]["pretrained"] = "hf:EleutherAI/pythia-14m"
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))

    code, out, err = run_in_process(["generate", str(run_dir), "--prompt", "Once upon", "--max-new-tokens", "3"],
                                    capsys, monkeypatch)
    assert code == 0, err[-3000:]
    code, out, err = run_in_process(["export", str(run_dir), "--out", str(tmp_path / "exported")], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert (tmp_path / "exported" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------
# 5. the run folder, audited


def test_run_folder_is_complete_and_consistent(trained):
    transformers = pytest.importorskip("transformers")
    from rafale.run.train import prepare_data

    cfg_path, run_dir = trained
    for name in ("config.yaml", "tokenizer.json", "data.json", "model.json", "metrics.jsonl", "metrics.png",
                 "checkpoints/latest-rank0.pt", "export/config.json", "export/model.safetensors", "export/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    # config.yaml reproduces the run
    from rafale.resolve import resolve_model_config

    saved, original = load_config(run_dir / "config.yaml"), load_config(cfg_path)
    resolve_model_config(original)  # the saved config was resolved when the run started (model.task filled in)
    assert saved == original
    # tokenizer.json is the one the data (and so the checkpoint) was made with
    data = prepare_data(load_config(cfg_path))
    assert (run_dir / "tokenizer.json").read_bytes() == (data.path / "tokenizer.json").read_bytes()
    # the export is the last checkpoint, as transformers reads it
    assert latest_checkpoint(run_dir).name == "ep0-ba4-rank0.pt"
    _, _, ours = load_run_model(run_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    ids = torch.randint(0, data.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(ids), theirs(ids).logits
    assert got.shape == (2, 16, data.vocab_size)
    torch.testing.assert_close(got, expected[..., : data.vocab_size], atol=1e-5, rtol=1e-4)


def test_pruning_keeps_the_newest_checkpoints_and_the_one_a_resume_needs(tmp_path):
    """training.checkpoints_to_keep over every process's checkpoints (Composer prunes only its own process's): the
    newest ones, every rank's file of a batch, and the one the latest symlink points to (after run.resume_fallback,
    an older one) are kept; a checkpoint set aside (.corrupt) is left for the user."""
    for batch in (4, 8, 12, 16):
        for rank in (0, 1):
            (tmp_path / f"ep0-ba{batch}-rank{rank}.pt").write_bytes(b"x")
    (tmp_path / "ep0-ba20-rank0.pt.corrupt").write_bytes(b"x")
    os.symlink("ep0-ba8-rank0.pt", tmp_path / "latest-rank0.pt")
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["ep0-ba4-rank0.pt", "ep0-ba4-rank1.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ep0-ba12-rank0.pt", "ep0-ba12-rank1.pt", "ep0-ba16-rank0.pt", "ep0-ba16-rank1.pt", "ep0-ba20-rank0.pt.corrupt",
        "ep0-ba8-rank0.pt", "ep0-ba8-rank1.pt", "latest-rank0.pt"]
    assert prune_checkpoints(tmp_path, -1) == []  # -1: every checkpoint is kept
