"""`rafale compare A B`: each side's mean with its interval, A - B paired by seed or by Welch's test, checked against
scipy's own tests; what is refused (other data or tokenizer, a side that mixes arms).

The run folders are made by hand, as rafale writes them: config.yaml by rafale.config.save_config, summary.json's
final validation as rafale.run.record.RunRecord writes it, tokenizer.json (its digest tells tokenizers apart). No
training."""

import json
import re
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from rafale.commands.compare import CompareError, compare_main
from rafale.config import Config, save_config
from rafale.stats import difference


def fake_run(root: Path, name: str, loss: float, seed: int, lr: float = 1e-3, tokenizer: str = "bpe-a",
             status: str = "complete", bits: float | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = Config()
    cfg.run.name, cfg.run.output_dir, cfg.run.seed, cfg.training.lr = name, str(root), seed, lr
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {tokenizer: 0}}}))
    validation = {"LanguageCrossEntropy": loss} | ({"BitsPerByte": bits} if bits is not None else {})
    (run_dir / "summary.json").write_text(json.dumps({"name": name, "task": "causal_lm", "status": status,
                                                      "batches": 40, "tokens": 20480, "validation": validation}))
    return run_dir


def arm(root: Path, prefix: str, losses: dict[int, float], **kwargs) -> dict[int, float]:
    for seed, loss in losses.items():
        fake_run(root, f"{prefix}-seed-{seed}", loss, seed, **kwargs)
    return losses


def compare(capsys, *argv) -> dict[str, str]:
    """`rafale compare` in this process: its lines by their label (metric, A, B, A - B, verdict, ...)."""
    assert compare_main([str(arg) for arg in argv]) == 0
    out = capsys.readouterr().out
    return {line.split(":")[0].split(" = ")[0]: line for line in out.splitlines()}


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?", line)]


def test_same_seeds_are_paired_and_give_scipys_paired_test(tmp_path, capsys):
    a = arm(tmp_path, "x-lr-1e-3", {1: 2.50, 2: 2.61, 3: 2.55}, lr=1e-3)
    b = arm(tmp_path, "x-lr-3e-3", {1: 2.41, 2: 2.50, 3: 2.49}, lr=3e-3)
    out = compare(capsys, tmp_path / "x-lr-1e-3-seed-*", tmp_path / "x-lr-3e-3-seed-*")
    expected = difference(a, b)
    assert "paired t-test over 3 seeds" in out["A - B"]
    assert numbers(out["A - B"])[:3] == pytest.approx([expected.estimate, expected.low, expected.high], abs=1e-4)
    paired = scipy_stats.ttest_rel(list(a.values()), list(b.values()))  # scipy's own, independently
    assert f"p = {paired.pvalue:.2g}" in out["A - B"] and expected.p_value == pytest.approx(paired.pvalue)
    low, high = paired.confidence_interval(0.95)
    assert numbers(out["A - B"])[1:3] == pytest.approx([low, high], abs=1e-4)
    assert out["A"].startswith("A: 2.5533 ± ") and "n=3" in out["A"] and "seeds 1,2,3" in out["A"]
    assert out["A and B differ in"].endswith("training.lr 1e-3 / 3e-3")
    assert out["verdict"] == f"verdict: B is better (p = {paired.pvalue:.2g}, n=3)"  # lower loss, p < 0.05


def test_different_seeds_give_welchs_test_and_noise_is_not_ranked(tmp_path, capsys):
    a = arm(tmp_path, "a", {1: 2.50, 2: 2.61, 3: 2.55}, lr=1e-3)
    b = arm(tmp_path, "b", {4: 2.48, 5: 2.66, 6: 2.52}, lr=3e-3)
    out = compare(capsys, "--a", *sorted(tmp_path.glob("a-seed-*")), "--b", *sorted(tmp_path.glob("b-seed-*")))
    welch = scipy_stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
    low, high = welch.confidence_interval(0.95)
    assert "Welch's t-test" in out["A - B"] and f"p = {welch.pvalue:.2g}" in out["A - B"]
    assert numbers(out["A - B"])[:3] == pytest.approx([difference(a, b).estimate, low, high], abs=1e-4)
    assert out["verdict"] == f"verdict: not distinguishable at n=3 (p = {welch.pvalue:.2g})"


def test_one_run_a_side_gives_the_difference_with_no_interval(tmp_path, capsys):
    fake_run(tmp_path, "one", 2.50, seed=1)
    fake_run(tmp_path, "two", 2.25, seed=1, lr=3e-3)
    out = compare(capsys, tmp_path / "one", tmp_path / "two")
    assert out["A - B"] == "A - B = +0.2500, no interval (one run on a side)"
    assert out["verdict"].startswith("verdict: no interval")


def test_runs_on_other_tokenizers_are_refused_naming_it_unless_bits_per_byte(tmp_path, capsys):
    fake_run(tmp_path, "a", 2.50, seed=1, tokenizer="bpe-a", bits=1.10)
    fake_run(tmp_path, "b", 2.40, seed=1, tokenizer="bpe-b", bits=1.20)
    with pytest.raises(CompareError, match=r"these runs do not compare: tokenizer: '[0-9a-f]{12}' in a, .* in b.*"
                                           r"--metric BitsPerByte"):
        compare_main([str(tmp_path / "a"), str(tmp_path / "b")])
    out = compare(capsys, tmp_path / "a", tmp_path / "b", "--metric", "BitsPerByte")
    assert out["metric"].startswith("metric: final BitsPerByte") and out["A - B"].startswith("A - B = -0.1000")


def test_a_side_that_mixes_arms_is_refused_naming_the_key(tmp_path):
    fake_run(tmp_path, "x-seed-1", 2.5, seed=1, lr=1e-3)
    fake_run(tmp_path, "x-seed-2", 2.6, seed=2, lr=3e-3)
    fake_run(tmp_path, "y", 2.4, seed=1)
    with pytest.raises(CompareError, match=r"side A mixes runs that differ in training.lr \(1e-3 in x-seed-1, "
                                           r"3e-3 in x-seed-2\)"):
        compare_main([str(tmp_path / "x-seed-*"), str(tmp_path / "y")])


def test_a_run_that_is_not_complete_is_left_out_and_named(tmp_path, capsys):
    arm(tmp_path, "a", {1: 2.50, 2: 2.61})
    fake_run(tmp_path, "a-seed-3", 9.0, seed=3, status="stopped")
    arm(tmp_path, "b", {1: 2.41, 2: 2.50}, lr=3e-3)
    out = compare(capsys, tmp_path / "a-seed-*", tmp_path / "b-seed-*")
    assert "seeds 1,2 " in out["A"] and "paired t-test over 2 seeds" in out["A - B"]  # seed 3 not averaged in
    assert out["left out (not complete)"].endswith("a-seed-3 (stopped at batch 40)")
