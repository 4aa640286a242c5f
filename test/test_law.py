"""From a sweep to a law (issue 31): compute in the record (N, D, C), the warmup-stable-decay schedule, cooldown
branches, and `rafale law`: the fit on synthetic runs of known parameters, what it refuses, and the holdout.

The fits run in this process on made-up run folders (summary.json, config.yaml, tokenizer.json): no training.
One test trains, through `rafale -c` (in this process): a short WSD run of test/pythia_debug.yaml, then a cooldown
branch of it."""

import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_in_process, write_config
from rafale.config import ConfigError, TrainingConfig, config_from_dict
from rafale.law import LawError, Point, compute_optimal, fit_law, flops_relation, read_points, select
from rafale.optim import DECAY_SHAPES, WarmupStableDecay, wsd_batches
from rafale.record import non_embedding_parameters

TRUE = {"E": 1.8, "A": 40.0, "alpha": 0.34, "B": 60.0, "beta": 0.3}
SIZES = (3e4, 1e5, 3e5, 1e6)
BUDGETS = (2e5, 4e5, 8e5, 1.6e6)


def law_loss(N, D, p=TRUE):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def synthetic_points(sizes=SIZES, budgets=BUDGETS, noise=0.003, seed=1) -> list[Point]:
    """Runs whose final loss is the law's, times a log-normal noise of `noise` (0.3%: a validation set's spread)."""
    rng = np.random.default_rng(seed)
    return [Point(f"n{N:g}-d{D:g}", int(N), int(D), int(6 * N + 2e4), law_loss(N, D) * math.exp(rng.normal(0, noise)))
            for N in sizes for D in budgets]


# ----------------------------------------------------------------------------------------------------
# the fit


def test_the_fit_recovers_known_parameters_within_its_intervals():
    fit = fit_law(synthetic_points(), bootstrap=60)
    for key, value in TRUE.items():
        low, high = fit.intervals[key]
        assert low <= value <= high, (key, value, fit.intervals[key], fit.law.params[key])
        assert low <= fit.law.params[key] <= high
    # the exponents follow from alpha, beta and the runs' FLOPs relation (flops_per_token = 6N + 2e4 here)
    k, gamma = flops_relation(synthetic_points())
    alpha, beta = fit.law.params["alpha"], fit.law.params["beta"]
    assert fit.law.params["a"] == pytest.approx(beta / (alpha + gamma * beta))
    assert fit.law.params["b"] == pytest.approx(alpha / (alpha + gamma * beta))
    assert fit.law.params["a"] * gamma + fit.law.params["b"] == pytest.approx(1)  # N^gamma D grows as C
    assert not fit.not_determined


def test_without_noise_the_fit_is_the_law():
    fit = fit_law(synthetic_points(noise=0.0), bootstrap=0)
    for key, value in TRUE.items():
        assert fit.law.params[key] == pytest.approx(value, rel=0.02), key


def test_the_compute_optimal_split_is_the_minimum_at_fixed_flops():
    points = synthetic_points(noise=0.0)
    fit = fit_law(points, bootstrap=0)
    k, gamma = flops_relation(points)
    flops = 1e13
    n_opt, d_opt, l_opt = compute_optimal(fit.law, points, [flops])
    assert k * n_opt[0] ** gamma * d_opt[0] == pytest.approx(flops)
    n = np.geomspace(n_opt[0] / 30, n_opt[0] * 30, 20001)  # every other split of the same FLOPs is worse
    losses = fit.law.predict(n, flops / (k * n ** gamma))
    assert l_opt[0] <= losses.min() + 1e-12
    assert n[np.argmin(losses)] == pytest.approx(n_opt[0], rel=1e-3)


def test_flops_relation_is_a_power_law_over_the_sizes():
    points = [Point("a", 1000, 1, 7 * 1000 ** 0.9, 1.0), Point("b", 8000, 1, 7 * 8000 ** 0.9, 1.0)]
    k, gamma = flops_relation(points)
    assert (k, gamma) == (pytest.approx(7), pytest.approx(0.9))


def test_one_size_gives_the_law_in_D_alone_and_says_what_it_cannot_tell():
    points = synthetic_points(sizes=(1e5,), budgets=(1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6), noise=0.001)
    fit = fit_law(points, bootstrap=30)
    assert fit.law.sides == ("D",) and fit.law.params["A"] is None and fit.law.params["alpha"] is None
    assert fit.law.params["a"] is None  # no compute-optimal split from one size
    assert any("A and alpha" in sentence and "1 size" in sentence for sentence in fit.not_determined)
    low, high = fit.intervals["E"]  # E there is E + A/N^alpha at the one size
    assert low <= TRUE["E"] + TRUE["A"] / 1e5 ** TRUE["alpha"] <= high
    low, high = fit.intervals["beta"]
    assert low <= TRUE["beta"] <= high


def test_one_budget_gives_the_law_in_N_alone():
    fit = fit_law(synthetic_points(budgets=(4e5,)), bootstrap=0)
    assert fit.law.sides == ("N",) and fit.law.params["B"] is None
    assert any("B and beta" in sentence and "1 token budget" in sentence for sentence in fit.not_determined)


@pytest.mark.parametrize("sizes,budgets,missing", [((1e5, 3e5), (2e5, 4e5, 8e5), "2 sizes"),
                                                    ((1e5, 3e5), (2e5, 4e5), "2 token budgets"),
                                                    ((1e5,), (2e5,), "1 size")])
def test_too_few_sizes_or_budgets_is_refused(sizes, budgets, missing):
    with pytest.raises(LawError, match=f"cannot determine a law: .*{missing}"):
        fit_law(synthetic_points(sizes=sizes, budgets=budgets))


def test_as_many_runs_as_parameters_get_no_intervals():
    fit = fit_law(synthetic_points(sizes=(1e5,), budgets=BUDGETS[:3]), bootstrap=30)
    assert not fit.samples and not fit.intervals
    assert any("fit exactly" in sentence for sentence in fit.not_determined)


def test_the_holdout_predicts_the_largest_size():
    points = synthetic_points()
    fitted, held = select(points, ["n1e+06-*"])
    assert len(held) == 4 and all(p.N == 1e6 for p in held)
    fit = fit_law(fitted, bootstrap=40)
    for p in held:
        assert abs(fit.law.predict(p.N, p.D) - p.target) / p.target < 0.02
        low, high = fit.prediction_interval(p.N, p.D)
        assert low < law_loss(p.N, p.D) < high
    with pytest.raises(LawError, match="--holdout nope: no complete run"):
        select(points, ["nope"])


# ----------------------------------------------------------------------------------------------------
# reading run folders: what is left out, what is refused


def fake_run(folder: Path, name: str, N: int, D: int, loss: float, status="complete", tokenizer="bpe-a",
             data=None, task="causal_lm", bits=None, **summary) -> Path:
    run = folder / name
    run.mkdir(parents=True)
    data = {"source": "stories", "tokenizer": "train", "vocab_size": 500, "block_size": 64, "num_proc": 1} | (data or {})
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"type": "pythia", "task": task}, "data": data}))
    (run / "tokenizer.json").write_text(json.dumps({"model": tokenizer}))
    validation = {"LanguageCrossEntropy": loss, "BitsPerByte": bits if bits is not None else loss / 2}
    (run / "summary.json").write_text(json.dumps({
        "name": name, "task": task, "status": status, "batches": 10, "tokens": D, "non_embedding_parameters": N,
        "flops_per_token": 6 * N, "training_flops": 6 * N * D, "validation": validation} | summary))
    (run / "metrics.jsonl").write_text("")
    return run


def grid_of_runs(folder: Path, **kwargs) -> list[Path]:
    return [fake_run(folder, f"r-{int(N)}-{int(D)}", int(N), int(D), law_loss(N, D), **kwargs)
            for N in SIZES[:3] for D in BUDGETS[:3]]


def test_runs_in_progress_or_stopped_are_left_out_and_listed(tmp_path):
    grid_of_runs(tmp_path)
    fake_run(tmp_path, "running", 10**6, 10**6, 2.0, status="in progress")
    fake_run(tmp_path, "stopped", 10**6, 10**6, 2.0, status="stopped", stopped_by="SIGTERM")
    points, left_out = read_points([tmp_path])
    assert len(points) == 9 and {p.name for p in points}.isdisjoint({"running", "stopped"})
    assert left_out == ["running (in progress at batch 10)", "stopped (stopped by SIGTERM at batch 10)"]


def test_runs_of_other_data_or_task_are_refused_naming_the_difference(tmp_path):
    grid_of_runs(tmp_path / "a")
    fake_run(tmp_path / "a", "z-longer-blocks", 10**5, 10**6, 2.0, data={"block_size": 128})
    with pytest.raises(LawError, match="data.block_size: 64 in r-.*, 128 in z-longer-blocks"):
        read_points([tmp_path / "a"])
    grid_of_runs(tmp_path / "b")
    fake_run(tmp_path / "b", "z-mlm", 10**5, 10**6, 2.0, task="masked_lm")
    with pytest.raises(LawError, match="task: 'causal_lm' in .*'masked_lm' in z-mlm"):
        read_points([tmp_path / "b"])


def test_another_tokenizer_is_refused_unless_the_law_is_of_bits_per_byte(tmp_path, capsys, monkeypatch):
    grid_of_runs(tmp_path)
    fake_run(tmp_path, "z-other-tokenizer", 10**5, 10**6, 2.0, tokenizer="bpe-b", data={"vocab_size": 4096},
             bits=law_loss(1e5, 1e6) / 2)
    with pytest.raises(LawError, match=r"data.vocab_size: 500 in .*4096 in z-other-tokenizer; tokenizer: .*--bits-per-byte"):
        read_points([tmp_path])
    points, _ = read_points([tmp_path], bits_per_byte=True)
    assert len(points) == 10 and all(p.target == pytest.approx(law_loss(p.N, p.D) / 2) for p in points)
    code, out, err = run_in_process(["law", str(tmp_path), "--bits-per-byte", "--bootstrap", "20"], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("bits per byte = E + A/N^alpha + B/D^beta, fitted to 10 runs")
    assert "| bits per byte |" in out
    code, out, err = run_in_process(["law", str(tmp_path)], capsys, monkeypatch)
    assert code == 2 and "cannot share a law" in err


def test_law_command_writes_the_table_and_the_plot_and_reports_the_holdout(tmp_path, capsys, monkeypatch):
    for N in SIZES:
        for D in BUDGETS[:3]:
            fake_run(tmp_path, f"w{int(N)}-d{int(D)}", int(N), int(D), law_loss(N, D))
    code, out, err = run_in_process(["law", str(tmp_path), "--holdout", "w1000000-*", "--bootstrap", "30"],
                                    capsys, monkeypatch)
    assert code == 0, err
    assert "held out 3 runs: the law predicts their validation loss within" in out
    within = float(re.search(r"within ([\d.]+)%", out).group(1))
    assert within < 1.0  # exact synthetic losses: the law found from 3 sizes carries to the 4th
    assert re.search(r"\| w1000000-d200000 \(held out\) \| 1,000,000 \| 200,000 \| .* \[[\d.]+, [\d.]+\] \|", out)
    assert (tmp_path / "law.md").read_text().startswith("validation loss = E")
    assert (tmp_path / "law.png").stat().st_size > 10_000
    code, out, err = run_in_process(["law", str(tmp_path / "w30000-d200000"), str(tmp_path / "w30000-d400000")],
                                    capsys, monkeypatch)
    assert code == 2 and "cannot determine a law" in err and "1 size" in err


# ----------------------------------------------------------------------------------------------------
# the runs table: N, D and C columns, sorted and filtered by them


def test_runs_table_shows_and_filters_by_N_D_and_C(tmp_path, capsys, monkeypatch):
    from rafale.plots import table_rows
    from rafale.runs import run_folders

    grid_of_runs(tmp_path)
    headers, rows = table_rows(run_folders([tmp_path]), sort="C", where=["N>5e4", "D<=4e5"])
    assert {"N", "tokens", "C"} <= set(headers)
    assert [row["run"] for row in rows] == ["r-100000-200000", "r-100000-400000", "r-300000-200000",
                                            "r-300000-400000"]  # by C = 6 N D
    assert rows[0]["N"] == "1.00e5" and rows[0]["C"] == "1.20e11"
    code, out, err = run_in_process(["runs", str(tmp_path), "--where", "N>1e9"], capsys, monkeypatch)
    assert code == 2 and "no run meets --where N>1e9" in err
    code, out, err = run_in_process(["runs", str(tmp_path), "--where", "N~3"], capsys, monkeypatch)
    assert code == 2 and "expected COLUMN OP VALUE" in err


# ----------------------------------------------------------------------------------------------------
# compute in the record: N by hand, C = flops_per_token x tokens


def neox_by_hand(C, I, L):
    """GPT-NeoX's layers and final norm, by hand: LayerNorms (weight and bias), biased Linears."""
    per_layer = (2 * C          # input layer norm
                 + 3 * C * C + 3 * C  # query_key_value
                 + C * C + C    # attention output
                 + 2 * C        # post-attention layer norm
                 + C * I + I + I * C + C)  # MLP
    return L * per_layer + 2 * C  # + the final layer norm


def llama_by_hand(C, I, L, heads, kv_heads):
    """Llama's layers and final norm, by hand: RMSNorms (weight only), Linears without bias, SwiGLU's three."""
    hs = C // heads
    per_layer = (C                          # input RMSNorm
                 + C * (heads + 2 * kv_heads) * hs  # q, k and v (grouped-query: kv_heads of k and v)
                 + C * C                    # attention output
                 + C                        # post-attention RMSNorm
                 + 3 * C * I)               # gate, up, down
    return L * per_layer + C


def bert_mlm_by_hand(C, I, L):
    """BERT's embedding LayerNorm, layers and MLM transform, by hand; the decoder (tied weight, bias) is the head."""
    per_layer = (3 * (C * C + C)        # query, key, value
                 + C * C + C + 2 * C    # attention output dense and LayerNorm
                 + C * I + I            # intermediate
                 + I * C + C + 2 * C)   # output dense and LayerNorm
    return 2 * C + L * per_layer + C * C + C + 2 * C  # + the transform's dense and LayerNorm


# issue 34, 1.3: a vocabulary padded to a layer's width (intermediate_size, or llama-tiny's 384) left that layer out
NON_EMBEDDING_CASES = [
    ("pythia", "pythia-tiny", 512, "causal_lm", 793_344),  # a 500-token BPE padded to 512 = intermediate_size
    ("llama", "llama-tiny", 384, "causal_lm", 787_584),
    ("pythia", "pythia-debug", 256, "causal_lm", None),
    ("pythia", "pythia-debug", 512, "causal_lm", None),  # no layer that wide: unchanged
    ("bert", "bert-tiny", 512, "mlm", None),
    ("roberta", "roberta-tiny", 512, "mlm", None),
]


@pytest.mark.parametrize("family,preset,vocab,head,issue_figure", NON_EMBEDDING_CASES)
def test_non_embedding_parameters_by_hand(family, preset, vocab, head, issue_figure):
    import dataclasses

    from rafale.models.decoder import Decoder
    from rafale.models.encoder import build_encoder
    from rafale.models.families import FAMILIES

    cfg = dataclasses.replace(FAMILIES[family].presets[preset], vocab_size=vocab)
    C, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    if head == "mlm":
        model, by_hand = build_encoder(cfg, head), bert_mlm_by_hand(C, I, L)
    elif family == "llama":
        model, by_hand = Decoder(cfg), llama_by_hand(C, I, L, cfg.num_heads, cfg.kv_heads)
    else:
        model, by_hand = Decoder(cfg), neox_by_hand(C, I, L)
    assert non_embedding_parameters(model) == by_hand
    if issue_figure is not None:
        assert by_hand == issue_figure
    # equally: every parameter but the embedding tables and the head, each counted once
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    head_params = {id(p): p for p in model.output_head().parameters()}
    untied_head = sum(p.numel() for p in head_params.values()
                      if all(p is not m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)))
    assert non_embedding_parameters(model) == sum(p.numel() for p in model.parameters()) - embeddings - untied_head


# ----------------------------------------------------------------------------------------------------
# warmup-stable-decay


@pytest.mark.parametrize("shape,formula", [("linear", lambda p: 1 - p), ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2),
                                           ("1-sqrt", lambda p: 1 - math.sqrt(p))])
def test_wsd_factor_is_the_formula(shape, formula):
    schedule = WarmupStableDecay(warmup=10, decay_start=70, end=100, shape=shape)
    for batch in range(100):
        expected = batch / 10 if batch < 10 else 1.0 if batch < 70 else formula((batch - 70) / 30)
        assert schedule.factor(batch) == pytest.approx(expected, abs=1e-12), batch
    assert schedule.factor(100) == pytest.approx(0.0, abs=1e-12)
    assert set(DECAY_SHAPES) == {"linear", "cosine", "1-sqrt"}


def test_wsd_phases_in_batches():
    t = TrainingConfig(schedule="wsd", warmup="20ba", max_duration="400ba", decay_fraction=0.2)
    assert wsd_batches(t, 1000, 128) == (20, 320, 400)
    t = TrainingConfig(schedule="wsd", warmup="0.05dur", max_duration="100ba", branch_from={"run": "x", "at": "60ba"})
    assert wsd_batches(t, 1000, 128) == (5, 60, 100)
    t = TrainingConfig(schedule="wsd", warmup="2048tok", max_duration="20480tok", batch_size=2)
    assert wsd_batches(t, 1000, 128) == (8, 64, 80)  # 256 tokens a batch


@pytest.mark.parametrize("training,key,message", [
    ({"decay_fraction": 0}, "training.decay_fraction", "must be in"),
    ({"schedule": "cosine", "branch_from": {"run": "x"}}, "training.branch_from", "needs training.schedule: wsd"),
    ({"branch_from": {"run": "x", "when": "3ba"}}, "training.branch_from", "expected {run"),
    ({"branch_from": {"run": "x", "at": "40ba"}}, "training.branch_from.at", "before the end"),
    ({"cooldowns": ["20ba"]}, "training.checkpoints_to_keep", "keep them all"),
    ({"cooldowns": ["1000tok"], "checkpoints_to_keep": -1}, "training.cooldowns", "not in the unit"),
])
def test_wsd_keys_are_checked(training, key, message):
    with pytest.raises(ConfigError, match=re.escape(key) + ".*" + re.escape(message)):
        config_from_dict({"model": {"type": "pythia", "preset": "pythia-debug"},
                          "training": {"schedule": "wsd", "max_duration": "40ba"} | training})


# ----------------------------------------------------------------------------------------------------
# a cooldown branch, end to end


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metric_rows(run: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_a_cooldown_branch_continues_its_parent_and_decays_to_zero(tmp_path, cache_dir, capsys, monkeypatch):
    """A WSD parent (40 batches, checkpoints every 8), then a branch decaying from batch 16 to 0 at 20 (its default
    branch point: 20% of 20 batches): the branch's record is the parent's up to 16, its first own batch sees the
    parent's weights and data (the same loss), its rates follow the formula, and the parent is not touched."""
    config = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                          training={"schedule": "wsd", "decay_fraction": 0.2, "decay_shape": "linear",
                                    "save_interval": "8ba", "checkpoints_to_keep": -1, "eval_interval": "8ba",
                                    "keep_best": "LanguageCrossEntropy"})
    code, out, err = run_in_process(["-c", str(config)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    parent = tmp_path / "runs" / "pythia-debug"
    before = folder_digest(parent)
    code, out, err = run_in_process(["-c", str(config), "run.name=branch", "training.max_duration=20ba",
                                     f"training.branch_from.run={parent}"], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert re.search(r"compute: N = [\d,]+ non-embedding parameters, D = 10,240 tokens, C = ", out)
    assert folder_digest(parent) == before  # byte for byte
    branch = tmp_path / "runs" / "branch"
    summary = json.loads((branch / "summary.json").read_text())
    assert summary["branched_from"] == {"run": str(parent), "at_batch": 16, "at_tokens": 16 * 8 * 64}
    assert summary["status"] == "complete" and summary["batches"] == 20 and summary["tokens"] == 20 * 8 * 64
    assert [s.get("run") for s in summary["segments"]] == ["pythia-debug", None]
    assert summary["segments"][0]["batches"] == [0, 16]
    # C = flops_per_token x tokens, flops_per_token the model's own (3x the forward's matmul FLOPs), its head over
    # the tokenizer's rows (the embedding is padded to a multiple of 64; the loss multiplies the tokenizer's rows)
    from tokenizers import Tokenizer

    from rafale.models.decoder import DecoderConfig, GPTNeoX

    model = GPTNeoX(DecoderConfig(**json.loads((branch / "model.json").read_text())))
    tokenizer_vocab = Tokenizer.from_file(str(branch / "tokenizer.json")).get_vocab_size()
    assert summary["flops_per_token"] == model.flops_per_token(64, vocab_size=tokenizer_vocab)
    assert summary["training_flops"] == summary["flops_per_token"] * summary["tokens"]
    assert summary["non_embedding_parameters"] == json.loads((parent / "summary.json").read_text())["non_embedding_parameters"]

    parent_rows, branch_rows = metric_rows(parent), metric_rows(branch)
    for step in range(17):  # the parent's record up to the branch point, the same
        assert branch_rows[step] == parent_rows[step], step
    # the branch's first own batch (batch 16, logged at step 17) starts from the parent's weights on the parent's
    # batch: the same loss (the rate only changes the update after it)
    assert branch_rows[17]["loss/train/total"] == pytest.approx(parent_rows[17]["loss/train/total"], rel=1e-6)
    lr = 3e-3
    for batch in range(16, 20):  # logged at step batch + 1: linear from lr at 16 to 0 at 20
        assert branch_rows[batch + 1]["lr-AdamW/group0-decay"] == pytest.approx(lr * (1 - (batch - 16) / 4)), batch
    assert parent_rows[20]["lr-AdamW/group0-decay"] == pytest.approx(lr)  # the parent was still stable there
    assert branch_rows[20]["metrics/eval/LanguageCrossEntropy"] == pytest.approx(
        summary["validation"]["LanguageCrossEntropy"])
    # keep_best's best is the branch's own (its evaluations, the parent's up to 16), not the parent's past 16
    losses = {step: row["metrics/eval/LanguageCrossEntropy"] for step, row in branch_rows.items()
              if "metrics/eval/LanguageCrossEntropy" in row}
    assert json.loads((parent / "summary.json").read_text())["best"]["step"] > 16
    assert summary["best"]["step"] == min(losses, key=losses.get) and summary["best"]["value"] == min(losses.values())
    # a branch from where the parent kept no checkpoint is refused, naming the ones it has
    code, out, err = run_in_process(["-c", str(config), "run.name=branch2", "training.max_duration=35ba",
                                     f"training.branch_from.run={parent}"], capsys, monkeypatch)
    assert code == 2 and "has no checkpoint at batch 28 (it has 8, 16, 24, 32, 40)" in err
    assert not (tmp_path / "runs" / "branch2" / "checkpoints").exists()


def test_the_law_predicts_a_finite_loss_where_a_bootstrap_fit_s_power_alone_would_overflow():
    """A bootstrap fit reached A = 4e290, alpha = 55 on the README's sweep: N^alpha overflows a float (and numpy
    warned on the console), the term A / N^alpha does not. Checked against exact decimal arithmetic."""
    from decimal import Decimal

    from rafale.law import Law

    law = Law(("N", "D"), {"E": 0.7, "A": 4e290, "alpha": 55.0, "B": 2.8e9, "beta": 1.8}, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predicted = float(law.predict(447_552, 307_200))
    exact = Decimal(0.7) + Decimal(4e290) / Decimal(447_552) ** 55 + Decimal(2.8e9) / Decimal(307_200) ** Decimal(1.8)
    assert predicted == pytest.approx(float(exact), rel=1e-12)


def test_the_law_plot_s_loss_axis_reads_as_plain_numbers():
    """The README's law plot spans less than a decade of loss: its labels read 1, 2, not 2x10^0 and 10^0."""
    from rafale.law import Law, Point, law_figure

    law = Law(("N", "D"), {"E": 0.7, "A": 400.0, "alpha": 0.5, "B": 4000.0, "beta": 0.6}, {})
    points = [Point(f"n{N}-d{D}", N, D, 6 * N, float(law.predict(N, D))) for N in (1e5, 2e5) for D in (3e5, 8e5)]
    fig = law_figure(points, law, [], "validation loss")
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
    assert labels and all(float(label.replace("\u2212", "-")) > 0 for label in labels), labels
