import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Under pytest-xdist (`-n 2`, README command 2), each worker takes its share of the cores: torch's default (a
# thread per core in every worker) would run twice as many threads as cores. Set before torch is imported, and
# inherited by the `rafale` subprocesses the tests start, so in-process and subprocess runs use the same count.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


# The files whose tests take longest, longest first (`--durations` on this project's 2-core machine): collected
# first, so that with `-n 2 --dist loadfile --no-loadscope-reorder` a worker starts on each of them while the other
# works through the rest, instead of one worker finishing test_multinode.py alone at the end.
LONGEST_FIRST = ("test_multinode.py", "test_robustness.py", "test_end_to_end.py", "test_run_folder.py",
                 "test_record.py", "test_console.py", "test_encoder_end_to_end.py", "test_help_examples.py",
                 "test_llama.py", "test_startup.py", "test_law.py", "test_lm_eval.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then as it was: tiny matmuls gain nothing from threads, a busy 2-core
    machine makes them far slower, and a count left changed would make later in-process runs differ in the last
    bits from subprocess ones. A file takes it for all its tests with pytestmark = usefixtures("one_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(model, seed=0):
    """Every parameter of `model` far from its init (norm weights around 1), so a swapped or dropped tensor shows in
    a parity test; returns the model in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(noise + 1.0 if name.endswith("weight") and "norm" in name.lower() else noise)
    return model.eval()


def write_lm_eval_task(folder: Path, name: str, rows: list[dict]) -> None:
    """A local lm-evaluation-harness task, multiple choice over {question, choices, answer} rows: FOLDER/<name>.yaml
    (the task `name`) and its data, FOLDER/<name>.jsonl."""
    import json

    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / f"{name}.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache for the whole session, so tests that use the same data build it once."""
    path = tmp_path_factory.mktemp("rafale_cache")
    os.environ["RAFALE_CACHE"] = str(path)
    return path


def write_config(path: Path, base: str = "pythia_debug.yaml", **sections) -> Path:
    """A copy of test/<base> with some keys changed: write_config(p, training={"lr": 0.1}); `...` removes a key."""
    cfg = yaml.safe_load((ROOT / "test" / base).read_text())
    for section, values in sections.items():
        if values is None:
            cfg.pop(section, None)
        else:
            cfg.setdefault(section, {}).update(values)
            cfg[section] = {k: v for k, v in cfg[section].items() if v is not ...}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def debug_config(tmp_path, cache_dir):
    return write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")})


def run_cli(args, env=None, cwd=ROOT, timeout=600):
    """Run a command with the test environment; returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(args, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


RAFALE = [sys.executable, "-m", "rafale"]
# the running interpreter's environment (a venv anywhere, a conda env; sys.executable unresolved: a venv's python is
# a link to the system's), whose bin/ holds the console scripts: not necessarily the README's .venv
ENV_BIN = Path(sys.executable).parent


def run_in_process(args, capsys, monkeypatch, env=None):
    """rafale.main.main(args) in this process (no interpreter start-up): returns (exit code, stdout, stderr)."""
    from rafale.main import main

    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    try:
        main(args)
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
