"""Two processes through Composer's launcher (gloo on CPU) train exactly what one process does."""

import re
import socket
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_the_step_of_one_rank_with_the_same_global_batch(tmp_path, cache_dir):
    step = {"max_duration": "2ba", "eval_interval": "2ba", "save_interval": "2ba", "batch_size": 8, "warmup": "0ba"}
    configs = {}
    for name in ("one", "two"):
        configs[name] = write_config(tmp_path / f"{name}.yaml", run={"output_dir": str(tmp_path / "runs"), "name": name},
                                     training=step)
    one = run_cli([sys.executable, "-m", "rafale", "-c", str(configs["one"])])
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [sys.executable, "-c", "from composer.cli.launcher import main; main()",
                "-n", "2", "--master_port", str(free_port())]
    two = run_cli([*launcher, str(ROOT / "rafale" / "main.py"), "-c", str(configs["two"])])
    assert two.returncode == 0, (two.stdout[-3000:], two.stderr[-3000:])

    a = load_file(tmp_path / "runs" / "one" / "export" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "two" / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # each rank took half of the same global batch; gradients were averaged across ranks
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)
    # the step did something, and both report the same validation loss after it
    ends = [float(re.search(r"validation loss at end: ([\d.]+)", r.stdout).group(1)) for r in (one, two)]
    start_loss = float(re.search(r"validation loss at start: ([\d.]+)", one.stdout).group(1))
    assert ends[0] < start_loss and abs(ends[0] - ends[1]) < 1e-3
