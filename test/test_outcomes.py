"""Keeping the best evaluation (training.keep_best) and early stopping (training.early_stopping), on a run whose
validation loss turns up: a tiny model at a high constant learning rate on 12 stories overfits them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_in_process, write_config
from signalled_run import SignalAt
from rafale.run_folder import read_checkpoint_weights

OVERFIT = {"max_duration": "64ba", "eval_interval": "8ba", "save_interval": "8ba", "checkpoints_to_keep": -1,
           "lr": 1e-2, "schedule": "constant", "warmup": 0, "eval_batches": 4}


def config(tmp_path, name: str, **training):
    return write_config(tmp_path / f"{name}.yaml", run={"output_dir": str(tmp_path / "runs"), "name": name},
                        data={"num_train_stories": 12}, training={**OVERFIT, **training})


def validation(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics/eval/LanguageCrossEntropy"] for r in rows if "metrics/eval/LanguageCrossEntropy" in r}


def test_keep_best_exports_the_weights_of_the_best_evaluation(tmp_path, cache_dir, capsys, monkeypatch):
    code, out, err = run_in_process(["-c", str(config(tmp_path, "best", keep_best="LanguageCrossEntropy"))],
                                    capsys, monkeypatch)
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "runs" / "best"
    losses = validation(run_dir)
    best_step = min(losses, key=losses.get)
    assert 0 < best_step < 64 and losses[64] > losses[best_step]  # it did turn up: the case keep_best is for
    best = json.loads((run_dir / "summary.json").read_text())["best"]
    assert best["step"] == best_step and best["value"] == pytest.approx(losses[best_step], abs=1e-6)
    assert f"best LanguageCrossEntropy: {losses[best_step]:.4f} at step {best_step}" in out
    # each "best ... so far" line comes right after the validation line it refers to
    lines = out.splitlines()
    news = [i for i, line in enumerate(lines) if " so far (" in line]
    assert news and all("validation: loss" in lines[i - 1] for i in news), out[-3000:]
    assert all(f"{lines[i - 1].split('validation: loss ')[1][:6]} at step" in lines[i] for i in news)
    # export-best holds that evaluation's weights (the checkpoint saved at that step), export/ the last ones
    exported = load_file(run_dir / "export-best" / "model.safetensors")
    (checkpoint,) = (run_dir / "checkpoints").glob(f"ep*-ba{best_step}-rank0.pt")  # (12 stories: 8 batches an epoch)
    saved = read_checkpoint_weights(checkpoint)
    vocab = exported["embed_out.weight"].shape[0]
    assert torch.equal(exported["embed_out.weight"], saved["head.weight"][:vocab])
    assert torch.equal(exported["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], saved["layers.0.mlp.up.weight"])
    last = load_file(run_dir / "export" / "model.safetensors")
    assert not torch.equal(last["embed_out.weight"], exported["embed_out.weight"])


def test_early_stopping_stops_after_patience_without_improvement(tmp_path, cache_dir, capsys, monkeypatch):
    from rafale.run.record import RunRecord

    saved = []  # every record written: the ones at checkpoints before the stop say nothing of an early stop
    save = RunRecord.save
    monkeypatch.setattr(RunRecord, "save", lambda self, state, status, **extra: saved.append(
        save(self, state, status, **extra)) or saved[-1])
    cfg = config(tmp_path, "early", early_stopping={"metric": "LanguageCrossEntropy", "patience": "16ba"})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "runs" / "early"
    losses = validation(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    stop = summary["early_stopped"]
    best_step = min(losses, key=losses.get)
    # it stopped at the first evaluation more than 16 batches past the best one (Composer's EarlyStopper counts
    # strictly more than the patience), before max_duration
    assert stop["best_step"] == best_step and stop["at_batch"] == best_step + 24 < 64, (losses, stop)
    assert summary["batches"] == stop["at_batch"] and max(losses) == stop["at_batch"]
    assert summary["status"] == "complete" and "stopped early at batch" in out
    before_the_stop = [record for record in saved if record["batches"] < stop["at_batch"]]
    assert len(before_the_stop) >= 2 and not any("early_stopped" in record for record in before_the_stop)
    # a re-run is complete: it does not train on past the stop
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0 and "already complete" in out, out


def test_a_metric_the_model_does_not_have_is_refused_before_training(tmp_path, cache_dir, capsys, monkeypatch):
    code, out, err = run_in_process(["-c", str(config(tmp_path, "typo", keep_best="Accuracy"))], capsys, monkeypatch)
    assert code == 2 and "training.keep_best" in err and "LanguageCrossEntropy" in err, err
    assert not (tmp_path / "runs" / "typo" / "checkpoints").exists()


# keep_best and early stopping on a run that stops early: best 4.2575 at batch 30, stopped at 34 (patience 3 batches)
STOPS_EARLY = {**OVERFIT, "max_duration": "40ba", "eval_interval": "2ba", "save_interval": "4ba",
               "keep_best": "LanguageCrossEntropy", "early_stopping": {"metric": "LanguageCrossEntropy", "patience": "3ba"}}


def test_a_fallback_resume_starts_from_the_best_up_to_its_checkpoint_and_ends_as_the_uninterrupted_run(
        tmp_path, cache_dir, capsys, monkeypatch):
    """A run whose newest checkpoint (32) is unreadable resumes from the one before (28) with run.resume_fallback
    (stopped by SIGTERM at 29, before it evaluates: its summary's latest validation is 28's, then resumed again).
    Its record, saved at 32, holds a best evaluation from the lost batches 29-32 that their retraining does not give
    again (made so here by lowering that record's evaluation at 32, as a GPU's sums, not bit for bit the same, would
    move it). keep_best and early stopping start from the best in metrics.jsonl up to batch 28, exactly where the
    uninterrupted run stood there, and the run ends as that one did: the same best, the same early stop, the same
    export-best weights; the export of the lost step is set aside."""
    import shutil

    import rafale.run.train as train_module
    from rafale.run_folder.checkpoints import batch_number
    from rafale.run.outcomes import outcome
    from rafale.run.record import RunRecord

    saved = []  # every record the uninterrupted run writes, one at each checkpoint
    save = RunRecord.save
    with monkeypatch.context() as m:
        m.setattr(RunRecord, "save", lambda self, state, status, **extra: saved.append(
            save(self, state, status, **extra)) or saved[-1])
        code, out, err = run_in_process(["-c", str(config(tmp_path, "reference", **STOPS_EARLY))], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    reference = tmp_path / "runs" / "reference"
    final = json.loads((reference / "summary.json").read_text())
    stop = final["early_stopped"]
    at = {record["batches"]: record for record in saved if record["status"] == "in progress"}
    newest = max(batch for batch in at if batch < stop["at_batch"])  # killed after this checkpoint...
    resume = max(batch for batch in at if batch < newest)  # ... which is unreadable: the run resumes here

    # the run folder as that run left it at `newest`, its evaluation there better than anything retraining gives
    run_dir = tmp_path / "runs" / "damaged"
    shutil.copytree(reference, run_dir, symlinks=True)
    shutil.rmtree(run_dir / "export")
    checkpoints = run_dir / "checkpoints"
    for checkpoint in checkpoints.glob("ep*-ba*-rank0.pt"):
        if batch_number(checkpoint) > newest:
            checkpoint.unlink()
    (newest_checkpoint,) = checkpoints.glob(f"ep*-ba{newest}-rank0.pt")
    (checkpoints / "latest-rank0.pt").unlink()
    (checkpoints / "latest-rank0.pt").symlink_to(newest_checkpoint.name)
    lowered = min(validation(reference).values()) - 0.01
    record = dict(at[newest], best={**at[newest]["best"], "value": lowered, "step": newest},
                  early_stopping={**at[newest]["early_stopping"], "best": lowered, "best_step": newest})
    (run_dir / "summary.json").write_text(json.dumps(record))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{**row, "metrics/eval/LanguageCrossEntropy": lowered} if row["step"] == newest else row
            for row in rows if row["step"] <= newest]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    newest_checkpoint.write_bytes(newest_checkpoint.read_bytes()[: newest_checkpoint.stat().st_size // 2])

    resumed = []  # keep_best's and early stopping's state once the resume has set it
    resume_outcome = train_module.resume_outcome
    monkeypatch.setattr(train_module, "resume_outcome", lambda trainer, *args: (
        resume_outcome(trainer, *args), resumed.append(outcome(trainer, None))))
    cfg = write_config(tmp_path / "damaged.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "damaged",
                                                       "resume_fallback": True},
                       data={"num_train_stories": 12}, training=STOPS_EARLY)
    with monkeypatch.context() as m:  # stopped by SIGTERM one batch after the resume, before it evaluates again
        callbacks = train_module.make_callbacks
        m.setattr(train_module, "make_callbacks", lambda *args: callbacks(*args) + [SignalAt(resume + 1)])
        code, first, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 143 and f"resumed {run_dir} at batch {resume}" in first, err[-3000:]
    stopped = json.loads((run_dir / "summary.json").read_text())  # its latest validation: not the lost one at 32
    assert (stopped["validation_step"], stopped["validation"]) == (at[resume]["validation_step"], at[resume]["validation"])
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)  # then resumed to its end
    assert code == 0, err[-3000:]
    assert f"resumed {run_dir} at batch {resume + 1}" in out, out[-3000:]
    out = first + out
    without_export = lambda best: {k: v for k, v in best.items() if k != "export"}
    assert without_export(resumed[0]["best"]) == without_export(at[resume]["best"])
    assert resumed[0]["early_stopping"] == at[resume]["early_stopping"]  # with the epoch Composer's clock gave it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert without_export(summary["best"]) == without_export(final["best"])
    assert summary["early_stopping"] == final["early_stopping"] and summary["early_stopped"] == stop
    assert (f"resuming at batch {resume}, before the record's best evaluation" in out
            and f"not the one at step {newest}; export-best/ held that step's weights and is set aside as "
                f"export-best.lost-{newest}" in out), out[-3000:]
    assert summary["best"]["export"] == str(run_dir / "export-best")
    assert (run_dir / f"export-best.lost-{newest}" / "model.safetensors").is_file()
    best, kept = (load_file(d / "export-best" / "model.safetensors") for d in (run_dir, reference))
    assert best.keys() == kept.keys() and all(torch.equal(best[k], kept[k]) for k in best)
