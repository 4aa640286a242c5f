"""rafale's masked-LM training learns as well as Hugging Face's BertForMaskedLM trained in a plain PyTorch loop
with the same data, masks, optimizer, schedule, clipping and steps (bench/learning_mlm.py does it on a real config)."""

import json
import math
import sys

import pytest

from conftest import ROOT, run_in_process, write_config

sys.path.insert(0, str(ROOT / "bench"))
import learning_mlm  # noqa: E402


def test_mlm_learns_as_well_as_hf_in_a_plain_loop(tmp_path, cache_dir, capsys, monkeypatch):
    cfg_path = write_config(
        tmp_path / "mlm.yaml", base="bert_mlm_stories.yaml",
        run={"output_dir": str(tmp_path / "runs"), "name": "mlm"},
        data={"num_train_stories": 400, "num_val_stories": 60, "block_size": 64, "vocab_size": 512},
        training={"batch_size": 16, "lr": 3.0e-3, "warmup": "10ba", "schedule": "cosine", "max_duration": "150ba",
                  "eval_interval": "150ba", "save_interval": "150ba", "precision": "fp32"},
    )
    code, out, err = run_in_process(["-c", str(cfg_path)], capsys, monkeypatch)
    assert code == 0, err[-3000:]

    cfg = learning_mlm.load_config(cfg_path)
    # the reference's schedule is the one rafale ran: metrics.jsonl's row `step` holds the lr of batch step - 1
    rows = [json.loads(line) for line in (tmp_path / "runs" / "mlm" / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"] - 1: row["lr-AdamW/group0"] for row in rows if "lr-AdamW/group0" in row}
    assert len(logged) > 100
    for step, lr in logged.items():
        assert lr == pytest.approx(cfg.training.lr * learning_mlm.lr_factor(step, 10, 150, "cosine", 0.1), abs=1e-9)

    data = learning_mlm.prepare_data(cfg)
    batches = learning_mlm.masked_validation(data, learning_mlm.mlm_collator(data, 0.15), batch_size=16)
    rafale_loss, _ = learning_mlm.score(learning_mlm.load_export(tmp_path / "runs" / "mlm" / "export"), batches,
                                        data.vocab_size)
    reference_loss, _ = learning_mlm.score(learning_mlm.train_reference(cfg, data), batches, data.vocab_size)
    print(f"masked-LM validation loss: rafale {rafale_loss:.4f}, reference {reference_loss:.4f}")
    # the comparison means something only if the reference learned: below the untrained loss, ln(V)
    # (150 steps at this size reach the unigram plateau: 5.50 for the reference, 5.52 for rafale, ln(512) = 6.24)
    assert reference_loss < 0.9 * math.log(data.vocab_size)
    assert rafale_loss <= reference_loss * learning_mlm.TOLERANCE
