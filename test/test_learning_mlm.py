"""rafale's masked-LM training matches Hugging Face's BertForMaskedLM trained in a plain PyTorch loop with the same
data, masks, optimizer, schedule, clipping and steps (bench/learning_mlm.py does it on a real config).

To stay fast and still sharp, both sides start from the same weights (rafale loads the reference's initial model
through model.pretrained), train without dropout and draw each batch's masks from a seed taken from the batch's
token ids (rafale's collator draws from the global RNG, whose state differs between the two programs): the two runs
then follow the same training losses up to float rounding until their updates drift apart, so a small difference in the recipe
(per-sample instead of per-token loss averaging, another mlm_probability, another batch order) shows at once. The
schedule is checked against the one the reference computes, and the final validation losses against each other."""

import json
import sys

import pytest
import torch

from conftest import ROOT, run_in_process, write_config

pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "bench"))
import learning_mlm  # noqa: E402
from composer.utils import reproducibility  # noqa: E402

STEPS, WARMUP = 30, 5


def masks_seeded_by_content(monkeypatch):
    """MLMCollator with the global RNG seeded from the batch's ids for each call: the same masks in both programs."""
    draw = learning_mlm.MLMCollator.__call__

    def seeded(self, examples):
        ids = torch.cat([torch.as_tensor(e["input_ids"]) for e in examples])
        with torch.random.fork_rng():
            torch.manual_seed(int((ids * torch.arange(1, len(ids) + 1)).sum()) % 2**31)
            return draw(self, examples)

    monkeypatch.setattr(learning_mlm.MLMCollator, "__call__", seeded)




def test_mlm_learns_as_the_hf_reference_does_in_a_plain_loop(tmp_path, cache_dir, capsys, monkeypatch, one_thread):
    masks_seeded_by_content(monkeypatch)
    sections = dict(
        run={"output_dir": str(tmp_path / "runs"), "name": "mlm"},
        data={"num_train_stories": 200, "num_val_stories": 40, "block_size": 32, "vocab_size": 256},
        model={"hidden_dropout": 0.0, "attention_dropout": 0.0},
        training={"batch_size": 16, "lr": 3.0e-3, "warmup": f"{WARMUP}ba", "schedule": "cosine",
                  "max_duration": f"{STEPS}ba", "eval_interval": f"{STEPS}ba", "save_interval": f"{STEPS}ba",
                  "precision": "fp32"},
    )
    cfg = learning_mlm.load_config(write_config(tmp_path / "reference.yaml", base="bert_mlm_stories.yaml", **sections))
    data = learning_mlm.prepare_data(cfg)
    # the reference's initial weights, as train_reference draws them, handed to rafale
    reproducibility.seed_all(cfg.run.seed)
    initial = learning_mlm.hf_masked_lm(cfg, data)
    initial.save_pretrained(tmp_path / "init")
    sections["model"]["pretrained"] = str(tmp_path / "init")
    cfg_path = write_config(tmp_path / "mlm.yaml", base="bert_mlm_stories.yaml", **sections)
    code, out, err = run_in_process(["-c", str(cfg_path)], capsys, monkeypatch)
    assert code == 0, err[-3000:]

    # rafale ran the reference's schedule: metrics.jsonl's row `step` holds the lr of batch step - 1
    rows = [json.loads(line) for line in (tmp_path / "runs" / "mlm" / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"] - 1: row["lr-base"] for row in rows if "lr-base" in row}  # training.lr as scheduled
    assert len(logged) == STEPS
    for step, lr in logged.items():
        assert lr == pytest.approx(cfg.training.lr * learning_mlm.lr_factor(step, WARMUP, STEPS, "cosine", 0.1),
                                   abs=1e-9)

    batches = learning_mlm.masked_validation(data, learning_mlm.mlm_collator(data, 0.15), batch_size=16)
    rafale_loss, _ = learning_mlm.score(learning_mlm.load_export(tmp_path / "runs" / "mlm" / "export"), batches,
                                        data.vocab_size)
    reference_steps = []
    reference = learning_mlm.train_reference(cfg, data, losses=reference_steps)
    reference_loss, _ = learning_mlm.score(reference, batches, data.vocab_size)
    initial_loss, _ = learning_mlm.score(initial, batches, data.vocab_size)
    print(f"masked-LM validation loss: rafale {rafale_loss:.5f}, reference {reference_loss:.5f}, "
          f"untrained {initial_loss:.5f}")
    # the comparison means something only if training moved the loss well below the untrained one (about ln V)
    assert reference_loss < initial_loss - 0.3
    assert rafale_loss <= reference_loss * learning_mlm.TOLERANCE

    # the sharp part: the same weights, batches, masks, schedule and updates give the same training losses, step by
    # step, until float rounding makes the two runs drift apart. The first update is at lr 0, so step 3 is the
    # first to see an update: a schedule one batch late (Composer's own stepping: lr 0 twice) moves it by ~5e-2,
    # per-sample averaging by ~1e-2, another mlm_probability or another batch order by more.
    rafale_steps = [row["loss/train/total"] for row in rows if "loss/train/total" in row]
    print("training loss, rafale:", [round(x, 5) for x in rafale_steps[:6]], "reference:",
          [round(x, 5) for x in reference_steps[:6]])
    assert rafale_steps[:6] == pytest.approx(reference_steps[:6], rel=1e-4)
