"""training.ema (rafale/run/ema.py) and `rafale average` (rafale/commands/average.py): the weight averages.

One short pythia-debug run with training.ema (30 batches, a checkpoint and an evaluation every 10, all checkpoints
kept) is trained once for the module, recording its raw weights after every optimizer step; its EMA is checked
against an EMA computed here from that trajectory, its resume against itself, its export in transformers, and its
checkpoints' average against their mean computed here.
"""

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_in_process, write_config
from rafale.config import ConfigError, config_from_dict
from rafale.run_folder import read_checkpoint_weights
from rafale.run_folder.checkpoints import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

DECAY = 0.8  # after 30 steps the initial weights still weigh 0.8^30 = 1e-3: every step shows in the average
TRAINING = {"max_duration": "30ba", "save_interval": "10ba", "eval_interval": "10ba", "eval_batches": 2,
            "checkpoints_to_keep": -1, "keep_best": "LanguageCrossEntropy", "ema": {"decay": DECAY, "export": True}}


def config(tmp_path: Path, **training) -> Path:
    return write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")}, training={**TRAINING, **training})


def checkpoint(run_dir: Path, batch: int) -> Path:
    return run_dir / "checkpoints" / f"ep0-ba{batch}-rank0.pt"


def ema_of(path: Path) -> dict:
    """The EMA a checkpoint holds (the WeightAverage callback's state), read weights_only."""
    return read_checkpoint(path)["state"]["callbacks"]["WeightAverage"]["average"]


def metrics_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def evaluations(run_dir: Path, label: str) -> dict[int, dict]:
    return {step: {k: v for k, v in row.items() if k.startswith(f"metrics/{label}/")}
            for step, row in metrics_rows(run_dir).items() if any(k.startswith(f"metrics/{label}/") for k in row)}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, cache_dir):
    """The run (through `rafale -c`, in this process) and its raw weights: at the start and after every step."""
    from composer.core import Callback

    import rafale.run.train as train_module
    from rafale.main import main

    class Trajectory(Callback):
        def __init__(self):
            self.weights = []

        def fit_start(self, state, logger):
            self.weights.append({k: v.detach().clone() for k, v in state.model.model.named_parameters()})

        def batch_end(self, state, logger):  # after the step, as WeightAverage's own update
            self.weights.append({k: v.detach().clone() for k, v in state.model.model.named_parameters()})

    trajectory = Trajectory()
    tmp = tmp_path_factory.mktemp("ema")
    with pytest.MonkeyPatch.context() as monkeypatch:
        callbacks = train_module.make_callbacks
        monkeypatch.setattr(train_module, "make_callbacks", lambda *args: callbacks(*args) + [trajectory])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit:
            main(["-c", str(config(tmp))])
    assert exit.value.code == 0, out.getvalue()[-3000:]
    return tmp / "runs" / "pythia-debug", trajectory.weights, out.getvalue()


def test_the_ema_follows_the_formula_over_the_raw_weights_trajectory(ema_run):
    run_dir, trajectory, _ = ema_run
    assert len(trajectory) == 31  # the start, then one per step
    expected = {name: t.double() for name, t in trajectory[0].items()}  # it starts at the weights it first sees
    for step, weights in enumerate(trajectory[1:], start=1):
        for name, t in weights.items():
            expected[name] = DECAY * expected[name] + (1 - DECAY) * t.double()
        if step % 10 == 0:  # each checkpoint holds the EMA as of its batch, in fp32
            saved = ema_of(checkpoint(run_dir, step))
            assert saved.keys() == expected.keys()
            for name in expected:
                assert saved[name].dtype == torch.float32
                torch.testing.assert_close(saved[name].double(), expected[name], atol=1e-6, rtol=1e-5)
    # and the checkpoint's model is the raw weights, not the EMA's (they differ after a few steps)
    raw = read_checkpoint_weights(checkpoint(run_dir, 30))
    assert all(torch.equal(raw[name], trajectory[-1][name]) for name in raw)
    assert any(not torch.allclose(ema_of(checkpoint(run_dir, 30))[n], raw[n]) for n in raw)


def test_the_ema_of_a_constant_model_is_that_model():
    from rafale.run.ema import WeightAverage

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    ema = WeightAverage(module, 0.9)
    for _ in range(50):
        ema.update()
    for name, t in before.items():
        torch.testing.assert_close(ema.average[name], t, atol=1e-7, rtol=1e-6)
    with ema.swapped_in():  # lent for an export and given back, bit for bit
        torch.testing.assert_close(module[0].weight.detach(), before["0.weight"], atol=1e-7, rtol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_both_evaluations_are_in_metrics_jsonl_and_the_summary(ema_run):
    run_dir, _, out = ema_run
    raw, ema = evaluations(run_dir, "eval"), evaluations(run_dir, "eval_ema")
    assert sorted(raw) == sorted(ema) == [0, 10, 20, 30]
    assert "metrics/eval_ema/LanguageCrossEntropy" in ema[30]
    # at batch 0 the EMA is the initial weights; later it lags behind the raw ones
    assert ema[0]["metrics/eval_ema/LanguageCrossEntropy"] == raw[0]["metrics/eval/LanguageCrossEntropy"]
    assert ema[30]["metrics/eval_ema/LanguageCrossEntropy"] != raw[30]["metrics/eval/LanguageCrossEntropy"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["validation_ema"] == {k.split("/")[-1]: v for k, v in ema[30].items()}
    assert summary["validation"] == {k.split("/")[-1]: v for k, v in raw[30].items()}
    assert summary["validation_ema_step"] == 30 and summary["ema_decay"] == DECAY
    # keep_best chose on the EMA's evaluation (training.ema.export)
    best_step = min(ema, key=lambda s: ema[s]["metrics/eval_ema/LanguageCrossEntropy"])
    assert summary["best"]["step"] == best_step and summary["best"]["weights"] == "ema"
    assert summary["best"]["value"] == ema[best_step]["metrics/eval_ema/LanguageCrossEntropy"]
    assert "validation (EMA): loss" in out and "validation loss of the EMA weights" in out


def test_the_ema_export_loads_in_transformers_with_the_ema_weights(ema_run):
    transformers = pytest.importorskip("transformers")
    from rafale.run_folder import load_run_model

    run_dir, _, _ = ema_run
    _, data, ours = load_run_model(run_dir, checkpoint(run_dir, 30))
    ours.load_state_dict(ema_of(checkpoint(run_dir, 30)), strict=False)  # (buffers stay as built)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    ids = torch.randint(0, data.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(ids), theirs(ids).logits
    torch.testing.assert_close(got, expected[..., : data.vocab_size], atol=1e-5, rtol=1e-4)
    # not the raw weights' logits
    _, _, raw = load_run_model(run_dir, checkpoint(run_dir, 30))
    with torch.no_grad():
        assert not torch.allclose(got, raw(ids)[..., : data.vocab_size], atol=1e-3)


def copy_until(run_dir: Path, tmp_path: Path, batch: int) -> Path:
    """A copy of the run as a run killed after its checkpoint at `batch` leaves it (as test_robustness does)."""
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy, symlinks=True)
    for later in (copy / "checkpoints").glob("ep*-ba*-rank0.pt"):
        if int(later.name.split("-ba")[1].split("-")[0]) > batch:
            later.unlink()
    (copy / "checkpoints" / "latest-rank0.pt").unlink()
    os.symlink(f"ep0-ba{batch}-rank0.pt", copy / "checkpoints" / "latest-rank0.pt")
    shutil.rmtree(copy / "export")
    return copy


def test_a_resumed_run_ends_with_the_same_ema_weights_and_metrics(ema_run, tmp_path, capsys, monkeypatch):
    run_dir, _, _ = ema_run
    resumed = copy_until(run_dir, tmp_path, 10)
    code, out, err = run_in_process(["-c", str(config(tmp_path))], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "resumed" in out and "at batch 10" in out
    for batch in (20, 30):  # bit for bit: CPU fp32 is deterministic, and the EMA was saved in fp32
        ours, theirs = ema_of(checkpoint(resumed, batch)), ema_of(checkpoint(run_dir, batch))
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
        ours, theirs = read_checkpoint_weights(checkpoint(resumed, batch)), read_checkpoint_weights(checkpoint(run_dir, batch))
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    for label in ("eval", "eval_ema"):
        assert evaluations(resumed, label) == evaluations(run_dir, label)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (resumed, run_dir))
    assert a["validation_ema"] == b["validation_ema"] and a["validation"] == b["validation"]


def test_average_of_the_last_checkpoints_is_their_mean_and_a_proven_export(ema_run, tmp_path, capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")
    run_dir, _, _ = ema_run
    out_dir = tmp_path / "avg"
    code, out, err = run_in_process(["average", str(run_dir), "--last", "2", "--out", str(out_dir)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "averaged the weights of 2 checkpoints (batches 20, 30)" in out and "export checked" in out
    from rafale.models.hf import from_pretrained

    averaged = from_pretrained(out_dir, dtype=torch.float32).state_dict()
    a, b = read_checkpoint_weights(checkpoint(run_dir, 20)), read_checkpoint_weights(checkpoint(run_dir, 30))
    for name in a:
        mean = (a[name] + b[name]) / 2
        # the export keeps the vocabulary's rows only (the checkpoint's matrices are padded to a multiple of 64)
        mean = mean[tuple(slice(0, size) for size in averaged[name].shape)]
        torch.testing.assert_close(averaged[name], mean, atol=1e-7, rtol=1e-6)
    assert transformers.AutoModelForCausalLM.from_pretrained(out_dir) is not None
    capsys.readouterr()  # (transformers' loading bar)
    # more checkpoints than the run has: one line naming how many, and the key that keeps them
    code, out, err = run_in_process(["average", str(run_dir), "--last", "5"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    assert "has 3 checkpoints, fewer than --last 5" in err and "training.checkpoints_to_keep: -1" in err
    assert not (run_dir / "export-average-last5").exists()


@pytest.mark.parametrize("ema, key", [
    ({"decay": 1.0}, "training.ema.decay"),
    ({"decay": 0}, "training.ema.decay"),
    ({"decay": "0.9"}, "training.ema.decay"),
    ({}, "training.ema.decay"),
    ({"decay": 0.9, "expor": True}, "training.ema.expor"),
    ({"decay": 0.9, "export": "yes"}, "training.ema.export"),
])
def test_bad_ema_settings_name_the_key(ema, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"type": "pythia"}, "training": {"ema": ema}})
    assert err.value.key == key


def test_ema_with_fsdp_is_refused_before_any_data_is_prepared(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "fresh-cache"
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "device": "gpu"},
                       training={"ema": {"decay": 0.99}, "fsdp": {"sharding_strategy": "FULL_SHARD"}})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"RAFALE_CACHE": str(cache)})
    assert code == 2 and err.count("\n") == 1, err
    assert "training.ema" in err and "training.fsdp" in err
    assert not cache.exists() and not (tmp_path / "runs").exists()


def test_a_fallback_resume_takes_the_emas_best_from_the_emas_evaluations(tmp_path, capsys):
    """Resumed (run.resume_fallback) before keep_best's best on the EMA: the best up to the resume batch is the best
    of the EMA's evaluations in metrics.jsonl, not of the raw weights' (whose best is at another step)."""
    from rafale.run.outcomes import lost_bests_forgotten
    from rafale.run_folder import evaluations as kept_evaluations

    rows = [{"step": 10, "metrics/eval/LanguageCrossEntropy": 5.0, "metrics/eval_ema/LanguageCrossEntropy": 4.0},
            {"step": 20, "metrics/eval/LanguageCrossEntropy": 3.0, "metrics/eval_ema/LanguageCrossEntropy": 4.5},
            {"step": 30, "metrics/eval/LanguageCrossEntropy": 2.0, "metrics/eval_ema/LanguageCrossEntropy": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert kept_evaluations(tmp_path, 20, "eval_ema") == [(10, {"LanguageCrossEntropy": 4.0}),
                                                          (20, {"LanguageCrossEntropy": 4.5})]
    found = lost_bests_forgotten(tmp_path, 20, {"training.keep_best": ("LanguageCrossEntropy", False, 30, "eval_ema"),
                                                "training.early_stopping": ("LanguageCrossEntropy", False, 30, "eval")})
    assert found == {"training.keep_best": (4.0, 10), "training.early_stopping": (3.0, 20)}
    assert "(4.0000 at step 10)" in capsys.readouterr().out
