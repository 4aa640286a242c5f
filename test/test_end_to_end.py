"""The CLI as a user runs it: subprocesses on the tiny debug config."""

import re
import shutil
from pathlib import Path
import sys

import pytest
import torch
import yaml

from conftest import ENV_BIN, RAFALE, ROOT, run_cli, write_config


def losses(output: str):
    start = float(re.search(r"validation loss at start: ([\d.]+)", output).group(1))
    end = float(re.search(r"validation loss at end: ([\d.]+)", output).group(1))
    return start, end


def test_debug_overfits_one_batch(debug_config, tmp_path):
    # through `python rafale/main.py`: every spelling of the command is the same program (tested below, on the
    # data step), and this one trains too
    result = run_cli([sys.executable, str(ROOT / "rafale" / "main.py"), "-c", str(debug_config)], env={"DEBUG": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    start, end = losses(result.stdout)
    # a broken model (no gradient, wrong labels, a leaking causal mask...) cannot memorize a batch this well
    assert end < 0.3 * start, result.stdout[-2000:]
    assert "DEBUG: loss on the batch went from" in result.stdout
    assert not (tmp_path / "runs" / "pythia-debug-debug" / "checkpoints").exists()


def test_data_only_builds_the_cache_and_trains_nothing(tmp_path):
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")}, data={"num_train_stories": 300})
    result = run_cli([*RAFALE, "-c", str(cfg)], env={"DATA": "1", "RAFALE_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"train: [\d,]+ tokens in [\d,]+ blocks", result.stdout)
    assert f"data cached at {cache}" in result.stdout and result.stdout.count(str(cache)) == 2  # and preparing into
    assert len(list(cache.glob("causal_lm/*/rafale.json"))) == 1
    assert not (tmp_path / "runs").exists()
    # the flag does the same, and now finds the cache
    again = run_cli([*RAFALE, "-c", str(cfg), "--data-only"], env={"RAFALE_CACHE": str(cache)})
    assert again.returncode == 0 and "using cached data" in again.stdout


def test_training_lowers_validation_loss_then_eval_only_reports_it(debug_config, tmp_path):
    run_dir = tmp_path / "runs" / "pythia-debug"
    result = run_cli([*RAFALE, "-c", str(debug_config)])
    assert result.returncode == 0, result.stderr[-3000:]
    start, end = losses(result.stdout)
    assert end < start - 1.0, result.stdout[-2000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_duration"] == "40ba"
    assert (run_dir / "tokenizer.json").is_file()
    checkpoints = sorted((run_dir / "checkpoints").glob("ep*-ba*-rank0.pt"))
    assert [c.name for c in checkpoints] == ["ep0-ba20-rank0.pt", "ep0-ba40-rank0.pt"]

    eval_cfg = write_config(
        tmp_path / "eval.yaml",
        run={"output_dir": str(tmp_path / "runs"), "name": "pythia-debug-eval"},
        training={"eval_only": True, "load_path": str(checkpoints[-1])},
    )
    evaluated = run_cli([*RAFALE, "-c", str(eval_cfg)])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    reported = float(re.search(r"validation loss: ([\d.]+)", evaluated.stdout).group(1))
    assert reported == pytest.approx(end, abs=1e-3)
    assert "tokens trained" not in evaluated.stdout
    assert "its record: " + str(tmp_path / "runs" / "pythia-debug-eval" / "evals") in evaluated.stdout


def console_script(name: str) -> str:
    """The environment's console script: beside the running interpreter (however the environment was made and
    whether or not it is activated), else on PATH."""
    found = ENV_BIN / name if (ENV_BIN / name).is_file() else shutil.which(name)
    assert found, f"no {name} in {ENV_BIN} or on PATH: is rafale installed in this environment (pip install -e .)?"
    return str(found)


@pytest.mark.parametrize("entry", ["console_script", "main_py", "main_folder", "module"])
def test_every_spelling_of_the_command_runs_rafale(debug_config, entry):
    """`rafale`, `python rafale/main.py`, `python rafale/main` (the original README's spelling) and
    `python -m rafale` are the same program; DATA=1 keeps it to the data step."""
    command = {
        "console_script": [console_script("rafale")],
        "main_py": [sys.executable, str(ROOT / "rafale" / "main.py")],
        "main_folder": [sys.executable, str(ROOT / "rafale" / "main")],
        "module": RAFALE,
    }[entry]
    result = run_cli([*command, "-c", str(debug_config), "--data-only"], cwd=debug_config.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"train: [\d,]+ tokens in [\d,]+ blocks", result.stdout), result.stdout


def test_the_main_folder_does_not_shadow_the_module():
    import rafale.main

    assert Path(rafale.main.__file__).name == "main.py" and callable(rafale.main.main)


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tmp_path, cache_dir, capsys, monkeypatch):
    from safetensors.torch import load_file

    from conftest import run_in_process

    weights = {}
    for microbatch in (8, 2):  # one forward/backward of 8 blocks, or four of 2 accumulated
        cfg = write_config(tmp_path / f"mb{microbatch}.yaml",
                           run={"output_dir": str(tmp_path / "runs"), "name": f"mb{microbatch}"},
                           training={"max_duration": "3ba", "eval_interval": "3ba", "save_interval": "3ba",
                                     "batch_size": 8, "microbatch_size": microbatch})
        code, _, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
        assert code == 0, err[-3000:]
        weights[microbatch] = load_file(tmp_path / "runs" / f"mb{microbatch}" / "export" / "model.safetensors")
    for name, tensor in weights[8].items():
        torch.testing.assert_close(weights[2][name], tensor, atol=1e-4, rtol=1e-3)
