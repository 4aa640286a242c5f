"""Several nodes, simulated on one host with Composer's own launcher: one launcher per "node" (--node_rank 0 and 1,
--nproc 1 each, gloo on the CPU), the run folder and the data cache shared, as on a cluster's shared disk. Every
wait is bounded: a stuck node fails the test within minutes, naming the node and showing its processes' output."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import ENV_BIN, ROOT, write_config
from rafale.run_folder import read_checkpoint_weights

# 60 batches, a checkpoint every 10: the tests that signal a run mid-way also slow its steps (SLOW_STEPS)
RUN = {"max_duration": "60ba", "save_interval": "10ba", "eval_interval": "20ba", "eval_batches": 2,
       "checkpoints_to_keep": -1, "batch_size": 8, "precision": "fp32"}
LAUNCHER = [sys.executable, "-c", "import sys; from composer.cli.launcher import main; sys.exit(main())"]
WAIT_S = 600  # for a whole launch (about 1 min here): a node whose rank hangs in a collective is killed after this

# Records every file a process writes, renames or removes under $RAFALE_AUDIT_ROOT (Python's audit hooks), so that
# the test can tell what rank 1 wrote into the shared run folder
AUDIT = '''
import os, sys
root = os.environ.get("RAFALE_AUDIT_ROOT")
if root:
    log = open(os.environ["RAFALE_AUDIT_LOG"], "a", buffering=1)
    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [args[0]] if writes else []
        elif event in ("os.rename", "os.replace", "os.remove", "os.symlink", "os.truncate"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(root):
                log.write(f"{event} {path}\\n")
    sys.addaudithook(hook)
'''

# Slows every optimizer step of a rank (a process Composer's launcher started, so RANK is set) by
# $RAFALE_TEST_STEP_SLEEP seconds, so that a signal the test sends after batch 10 lands mid-run on any machine: a
# CI machine trained all 60 batches in 1.6 s, and the run ended before the signal came
SLOW_STEPS = '''
import os
if os.environ.get("RAFALE_TEST_STEP_SLEEP") and "RANK" in os.environ:
    import time
    import torch.optim.optimizer
    pause = float(os.environ["RAFALE_TEST_STEP_SLEEP"])
    torch.optim.optimizer.register_optimizer_step_post_hook(lambda *args: time.sleep(pause))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp_path: Path, name: str) -> Path:
    return write_config(tmp_path / f"{name}.yaml", run={"output_dir": str(tmp_path / "runs"), "name": name},
                        training=RUN)


def launch(node: int, cfg: Path, port: int, logs: Path, env: dict, *overrides) -> subprocess.Popen:
    """One node's launcher, in a session of its own so that a signal can reach its processes as SLURM's would."""
    logs.mkdir(parents=True, exist_ok=True)
    command = [*LAUNCHER, "--world_size", "2",
               "--node_rank", str(node), "--nproc", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--stdout", str(logs / f"node{node}.out"), "--stderr", str(logs / f"node{node}.err"),
               str(ROOT / "rafale" / "main.py"), "-c", str(cfg), *overrides]
    with open(logs / f"launcher{node}.log", "a") as out:
        return subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def output(logs: Path, node: int) -> str:
    return "".join((logs / f"{name}{node}.{ext}").read_text() if (logs / f"{name}{node}.{ext}").exists() else ""
                   for name, ext in (("node", "out"), ("node", "err"), ("launcher", "log")))


def wait_all(processes: dict[int, subprocess.Popen], logs: Path, timeout: float = WAIT_S) -> dict[int, int]:
    """Exit codes by node; a node still running at the deadline is killed and the test fails naming it."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes.values()):
        if time.monotonic() > deadline:
            stuck = [node for node, p in processes.items() if p.poll() is None]
            for p in processes.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"node(s) {stuck} still running after {timeout:.0f} s:\n"
                        + "\n".join(f"--- node {n}:\n{output(logs, n)[-3000:]}" for n in stuck))
        time.sleep(0.1)
    return {node: p.returncode for node, p in processes.items()}


def two_nodes(cfg: Path, logs: Path, env: dict, node1_env: dict) -> dict[int, subprocess.Popen]:
    port = free_port()
    return {0: launch(0, cfg, port, logs, env), 1: launch(1, cfg, port, logs, {**env, **node1_env})}


def wait_for_batch(run_dir: Path, batch: int, processes, logs: Path):
    """Until the run's record (saved with each checkpoint) stands at `batch` or later."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            if summary["batches"] >= batch and summary["status"] == "in progress":
                return summary["batches"]
        except (OSError, ValueError, KeyError):
            pass
        for node, p in processes.items():
            if p.poll() is not None:
                pytest.fail(f"node {node} ended (code {p.returncode}) before batch {batch}:\n{output(logs, node)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the run never reached batch {batch}")
        time.sleep(0.005)


def training_processes(process: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(process.pid).children(recursive=True) if "main.py" in " ".join(c.cmdline())]


def same_weights(a: Path, b: Path):
    wa, wb = read_checkpoint_weights(a), read_checkpoint_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # gloo's all-reduce on a CPU is deterministic: bit for bit


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted one-process run (in this process) and an uninterrupted two-node run of the same config
    (the same global batch), the two nodes starting on an empty shared cache, the writes of node 1's processes
    into the run folders recorded."""
    from rafale.main import main

    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "audit").mkdir()
    (tmp / "audit" / "sitecustomize.py").write_text(AUDIT)
    cache = tmp / "cache"
    with pytest.raises(SystemExit) as exit:
        main(["-c", str(config(tmp, "one"))])
    assert exit.value.code == 0
    audit = {"PYTHONPATH": str(tmp / "audit"), "RAFALE_AUDIT_ROOT": str(tmp / "runs"),
             "RAFALE_AUDIT_LOG": str(tmp / "node1-writes.log")}
    logs = tmp / "logs-two"
    nodes = two_nodes(config(tmp, "two"), logs, {"RAFALE_CACHE": str(cache)}, audit)
    assert wait_all(nodes, logs) == {0: 0, 1: 0}, output(logs, 0)[-3000:] + output(logs, 1)[-3000:]
    return tmp, logs


def test_two_nodes_build_the_cache_once_and_train_what_one_process_does(reference):
    tmp, logs = reference
    both = output(logs, 0) + output(logs, 1)
    assert both.count("rafale: preparing data into") == 1 and "using cached data" in both, both[-3000:]
    assert len(list((tmp / "cache" / "causal_lm").glob("*/rafale.json"))) == 1
    one, two = (json.loads((tmp / "runs" / name / "summary.json").read_text()) for name in ("one", "two"))
    assert two["status"] == "complete" and two["batches"] == 60 and two["tokens"] == one["tokens"]
    for name in ("LanguageCrossEntropy", "BitsPerByte"):
        assert abs(two["validation"][name] - one["validation"][name]) < 1e-4, (name, one, two)
    # only rank 0 wrote the record and the export: node 1's processes wrote nothing into the run folder
    node1_writes = (tmp / "node1-writes.log").read_text() if (tmp / "node1-writes.log").exists() else ""
    assert node1_writes == "", node1_writes[:2000]
    assert (tmp / "runs" / "two" / "export" / "model.safetensors").is_file()
    rows = [json.loads(line)["step"] for line in (tmp / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows))  # one row per step: one writer


# A run whose validation loss flattens out and turns (12 stories at a constant lr 1e-2: best 4.2575 at batch 30, then
# 4.2619 and 4.2745), kept best and stopped early with a patience of 3 batches: stopped early at batch 34.
ROAD = {"max_duration": "40ba", "eval_interval": "2ba", "save_interval": "4ba", "eval_batches": 4, "batch_size": 8,
        "lr": 1e-2, "schedule": "constant", "warmup": 0, "precision": "fp32", "keep_best": "LanguageCrossEntropy",
        "early_stopping": {"metric": "LanguageCrossEntropy", "patience": "3ba"}}
INTERRUPTED_AT = 31  # after the best evaluation (30), before the evaluations that stop the run (32, 34)


def two_processes(logs: Path, script: str, cfg: Path, *overrides, env=None) -> tuple[int, list[str], str]:
    """One launcher with two processes (--nproc 2, gloo on the CPU) running `script` (rafale/main.py, or
    test/signalled_run.py); returns both ranks' output once every rank has ended. A rank still alive after WAIT_S
    (one waiting in a collective the other skipped) fails the test, naming the ranks alive and their output.
    Returns (the launcher's exit code, each rank's output, every log for a failure's message)."""
    logs.mkdir(parents=True)
    with open(logs / "launcher.log", "w") as out:
        launcher = subprocess.Popen([*LAUNCHER, "-n", "2", "--master_port", str(free_port()),
                                     "--stdout", str(logs / "rank{rank}.out"), "--stderr", str(logs / "rank{rank}.err"),
                                     script, "-c", str(cfg), *overrides], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    text = lambda: "".join(f"--- {f.name}:\n{f.read_text()[-3000:]}\n" for f in sorted(logs.iterdir()))
    try:
        launcher.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        alive = sorted(p.environ().get("RANK", "?") for p in training_processes(launcher))
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail(f"rank(s) {alive} of {script} {' '.join(overrides)} still running after {WAIT_S} s:\n{text()}")
    # rank 0 writes to the launcher's own output, which then shows the other ranks' output when one failed
    ranks = [(logs / "launcher.log").read_text().split("----------Begin global rank")[0],
             (logs / "rank1.out").read_text() + (logs / "rank1.err").read_text()]
    return launcher.returncode, ranks, text()


def record_of(run_dir: Path) -> dict:
    """What a run's record says that does not depend on its name, its clock or how many processes ran it."""
    summary = json.loads((run_dir / "summary.json").read_text())
    approx = lambda value: pytest.approx(value, rel=1e-5, abs=1e-4) if isinstance(value, float) else value
    kept = {key: summary.get(key) for key in ("status", "batches", "epochs", "samples", "tokens", "validation_step",
                                              "stopped_by", "early_stopped", "early_stopping", "best")}
    for outcome in ("early_stopped", "early_stopping", "best"):  # (two processes sum in another order)
        if kept[outcome]:
            kept[outcome] = {k: approx(v) for k, v in kept[outcome].items() if k != "export"}
    kept["validation"] = {k: approx(v) for k, v in summary["validation"].items()}
    kept["segments"] = [(s["batches"], s["ended"]) for s in summary["segments"]]
    kept["checkpoints"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return kept


def assert_same_record(one: Path, two: Path):
    """Two run folders hold the same record: summary.json (its values to 1e-4, or 1e-5 relative for perplexities),
    metrics.jsonl (the same steps and metrics), config.yaml (but for the run's name), the kept checkpoints."""
    assert record_of(two) == record_of(one)
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    ra, rb = rows(one), rows(two)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        for key in [k for k in x if k.startswith(("loss/", "metrics/"))]:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-4), (x["step"], key)
    ca, cb = (yaml.safe_load((d / "config.yaml").read_text()) for d in (one, two))
    ca["run"]["name"] = cb["run"]["name"]
    assert cb == ca


def test_two_processes_interrupted_resumed_stopped_early_evaluated_and_rerun_record_what_one_process_does(
        tmp_path, cache_dir, capsys, monkeypatch):
    """The record's whole road with two processes of one launcher (--nproc 2, as on a machine with 2 GPUs) and with
    one: SIGTERM (to rank 0 only) at batch 31; a resume that keep_best and early stopping carry on from the record
    (every rank must stop at batch 34, knowing the best of batch 30 that rank 0 read); an eval-only; a re-run. Every
    rank ends every time, and the two folders hold the same record, checkpoints and weights."""
    import rafale.run.train as train_module
    from conftest import run_in_process
    from signalled_run import SignalAt

    def config_of(name):
        return write_config(tmp_path / f"{name}.yaml", run={"output_dir": str(tmp_path / "runs"), "name": name},
                            data={"num_train_stories": 12}, training=ROAD)

    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    main_py, signalled = str(ROOT / "rafale" / "main.py"), str(ROOT / "test" / "signalled_run.py")

    # one process, in this one
    with monkeypatch.context() as m:
        callbacks = train_module.make_callbacks
        m.setattr(train_module, "make_callbacks", lambda *args: callbacks(*args) + [SignalAt(INTERRUPTED_AT)])
        code, out, err = run_in_process(["-c", str(config_of("one"))], capsys, monkeypatch)
    assert code == 143, (out + err)[-3000:]
    stopped_one = record_of(one)
    code, out, err = run_in_process(["-c", str(config_of("one"))], capsys, monkeypatch)
    assert code == 0 and "stopped early at batch 34" in out, (out + err)[-3000:]
    evaluated = next((one / "checkpoints").glob("ep*-ba32-rank0.pt")).name
    code, out, err = run_in_process(["-c", str(config_of("one")), "training.eval_only=true",
                                     f"training.load_path={one / 'checkpoints' / evaluated}"], capsys, monkeypatch)
    assert code == 0, (out + err)[-3000:]

    # two processes: interrupted, resumed, evaluated, re-run; every rank ends each time
    code, ranks, logs = two_processes(tmp_path / "logs-stop", signalled, config_of("two"),
                                      env={"RAFALE_TEST_SIGNAL_AT": str(INTERRUPTED_AT)})
    assert code == 143 and all(f"stopped by SIGTERM at batch {INTERRUPTED_AT}" in rank for rank in ranks), logs
    stopped_two = record_of(two)
    assert stopped_two == stopped_one and stopped_two["status"] == "stopped" and stopped_two["batches"] == 31
    assert stopped_two["stopped_by"] == "SIGTERM" and stopped_two["early_stopped"] is None  # a signal, not the stopper
    code, ranks, logs = two_processes(tmp_path / "logs-resume", main_py, config_of("two"))
    assert code == 0 and all("stopped early at batch 34" in rank for rank in ranks), logs
    assert all(f"resumed {two} at batch {INTERRUPTED_AT}" in rank for rank in ranks), logs
    assert_same_record(one, two)
    assert record_of(two)["checkpoints"] == sorted([evaluated, next((two / "checkpoints").glob("ep*-ba34-*")).name,
                                                    "latest-rank0.pt"])  # checkpoints_to_keep (2) over both segments
    before = {name: (two / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.jsonl")}
    code, ranks, logs = two_processes(tmp_path / "logs-eval", main_py, config_of("two"), "training.eval_only=true",
                                      f"training.load_path={two / 'checkpoints' / evaluated}")
    assert code == 0 and len({re.search(r"its record: (\S+)", rank).group(1) for rank in ranks}) == 1, logs
    code, ranks, logs = two_processes(tmp_path / "logs-rerun", main_py, config_of("two"))
    assert code == 0 and all("already complete" in rank for rank in ranks), logs
    assert {name: (two / name).read_bytes() for name in before} == before

    (eval_one,), (eval_two,) = (list((d / "evals").iterdir()) for d in (one, two))
    va, vb = (json.loads((d / "summary.json").read_text())["validation"] for d in (eval_one, eval_two))
    assert vb == {k: pytest.approx(v, rel=1e-5, abs=1e-4) for k, v in va.items()}
    wa = read_checkpoint_weights(one / "checkpoints" / "latest-rank0.pt")
    wb = read_checkpoint_weights(two / "checkpoints" / "latest-rank0.pt")
    # each process took half of each global batch and the gradients were averaged: one process's steps, up to the
    # order of the sums (2.2e-4 apart after 34 Adam steps at lr 1e-2, which turn a tiny gradient into a full step)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-3, rtol=1e-3)


# Records what a process other than rank 0 opens or lists under $RAFALE_READS_ROOT (Python's audit hooks)
READS = '''
import os, sys
root = os.environ.get("RAFALE_READS_ROOT")
if root and os.environ.get("RANK", "0") != "0":
    log = open(os.environ["RAFALE_READS_LOG"], "a", buffering=1)
    def hook(event, args):
        if event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(root):
                log.write(f"{event} {path}\\n")
    sys.addaudithook(hook)
'''


def test_a_refused_branch_stops_every_rank_with_rank_zero_s_error_and_only_rank_zero_reads_the_parent(
        tmp_path, cache_dir, capsys, monkeypatch):
    """A cooldown branch from where its parent kept no checkpoint, with two processes: rank 0 alone reads the parent
    (its config, its checkpoints) and the branch's folder, and every rank stops with rank 0's one-line refusal."""
    from conftest import run_in_process

    parent_training = {"max_duration": "8ba", "save_interval": "4ba", "eval_interval": "4ba", "eval_batches": 1,
                       "checkpoints_to_keep": -1, "schedule": "constant", "warmup": 0, "precision": "fp32"}
    cfg = write_config(tmp_path / "parent.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "parent"},
                       data={"num_train_stories": 12}, training=parent_training)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    parent = tmp_path / "runs" / "parent"
    (tmp_path / "reads").mkdir()
    (tmp_path / "reads" / "sitecustomize.py").write_text(READS)
    reads = tmp_path / "rank1-reads.log"
    code, ranks, logs = two_processes(
        tmp_path / "logs", str(ROOT / "rafale" / "main.py"), cfg, "run.name=branch", "training.schedule=wsd",
        f"training.branch_from.run={parent}", "training.branch_from.at=3ba",
        env={"PYTHONPATH": str(tmp_path / "reads"), "RAFALE_READS_ROOT": str(tmp_path),
             "RAFALE_READS_LOG": str(reads), "RAFALE_CACHE": str(cache_dir)})
    refusal = (f"rafale: error: config error at 'training.branch_from.at': {parent} has no checkpoint at batch 3 "
               "(it has 4, 8)")
    assert code != 0, logs
    for rank in ranks:
        errors = [line for line in rank.splitlines() if line.startswith("rafale: error:")]
        assert len(errors) == 1 and errors[0].startswith(refusal) and "Traceback" not in rank, logs
    read = reads.read_text().splitlines()
    assert f"open {cfg}" in read  # the hook watched rank 1: it read its config, and nothing of the parent's
    assert not [line for line in read if str(tmp_path / "runs") in line], read  # nor of the branch's folder
    assert not (tmp_path / "runs" / "branch" / "checkpoints").exists()


def test_a_run_folder_the_nodes_do_not_share_is_an_error_on_every_node(reference, tmp_path):
    """Node 1 with a run folder of its own (a node-local disk): both nodes stop at once with one clear error."""
    cfg, logs, port = config(tmp_path, "apart"), tmp_path / "logs", free_port()
    env = {"RAFALE_CACHE": str(reference[0] / "cache")}
    nodes = {0: launch(0, cfg, port, logs, env),
             1: launch(1, cfg, port, logs, env, f"run.output_dir={tmp_path / 'node1-disk'}")}
    codes = wait_all(nodes, logs)
    assert codes[0] != 0 and codes[1] != 0
    for node in (0, 1):
        text = output(logs, node)
        assert "is not shared by every node: node 1 (rank 1) cannot see" in text and "Traceback" not in text, text[-3000:]
    assert not (tmp_path / "runs" / "apart" / "checkpoints").exists()


def test_the_slurm_script_stops_requeues_and_resumes_on_every_node(reference, tmp_path):
    """test/slurm_multinode.sbatch as a cluster user submits it, under stand-ins for srun (one copy of the command
    per node, SLURM_NODEID set, SIGTERM forwarded) and scontrol: SIGTERM to every process of the job step (the time
    limit near) saves and requeues; the requeued job resumes on every node; a rank SIGKILLed fails the job, whose
    next submission resumes from the newest checkpoint; the end is the uninterrupted two-node run's weights."""
    ref_tmp, _ = reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'''#!/bin/bash
case "$1 $2" in
  "show hostnames") echo 127.0.0.1; echo 127.0.0.2 ;;
  "requeue "*) echo "requeue $2" >> {tmp_path / "requeued.log"} ;;
  *) echo "scontrol stand-in: $*" >&2; exit 1 ;;
esac
''')
    (bin_dir / "srun").write_text('''#!/bin/bash
# one copy of the command per node (SLURM_NODEID 0..SLURM_NNODES-1), or one with --nodes=1 --ntasks=1
nodes=$SLURM_NNODES
while [[ "$1" == --* ]]; do case "$1" in --nodes=1) nodes=1 ;; esac; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
code=0
for pid in "${pids[@]}"; do
  while true; do wait "$pid"; c=$?; kill -0 "$pid" 2>/dev/null || break; done  # a trapped signal interrupts wait
  [ "$c" -gt "$code" ] && code=$c
done
exit $code
''')
    for stand_in in ("srun", "scontrol"):
        (bin_dir / stand_in).chmod(0o755)
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_STEPS)
    cfg = config(tmp_path, "two")  # the reference two-node run's config, in another folder
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_GPUS_PER_NODE="1",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="4242", RAFALE_CACHE=str(tmp_path / "cache"),
               RAFALE_OUTPUT_DIR=str(tmp_path / "shared-runs"), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(tmp_path / "slow"), RAFALE_TEST_STEP_SLEEP="0.1",
               RAFALE_ENV=str(ENV_BIN.parent))  # this interpreter's environment, wherever it is
    run_dir = tmp_path / "shared-runs" / "two"

    def submit(job: int) -> subprocess.Popen:
        env["MASTER_PORT"] = str(free_port())
        with open(tmp_path / f"job{job}.out", "w") as out:
            return subprocess.Popen(["bash", "test/slurm_multinode.sbatch", str(cfg)], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def finish(job: int, process: subprocess.Popen) -> tuple[int, str]:
        try:
            process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"job {job} still running after {WAIT_S} s:\n{(tmp_path / f'job{job}.out').read_text()[-3000:]}")
        return process.returncode, (tmp_path / f"job{job}.out").read_text()

    # job 1: SIGTERM to every process of the job step, as SLURM sends it two minutes before the time limit
    job = submit(1)
    wait_for_batch(run_dir, 10, {1: job}, tmp_path)
    for process in [*training_processes(job), *(p for p in psutil.Process(job.pid).children(recursive=True)
                                               if "composer.cli.launcher" in " ".join(p.cmdline()))]:
        process.send_signal(signal.SIGTERM)
    code, out = finish(1, job)
    assert code == 143 and "requeueing job 4242" in out, out[-3000:]
    assert (tmp_path / "requeued.log").read_text() == "requeue 4242\n"
    assert out.count("rafale: preparing data into") == 1  # the --data-only step, before the training step
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["status"] == "stopped" and 10 <= stopped["batches"] < 60
    assert len(set(re.findall(r"stopped by SIGTERM at batch (\d+)", out))) == 1  # both ranks, the same batch
    # job 2 (the requeued one): resumes on every rank, then one rank is SIGKILLed after a later checkpoint
    job = submit(2)
    later = wait_for_batch(run_dir, stopped["batches"] + 10, {2: job}, tmp_path)
    rank1 = [p for p in training_processes(job) if "RANK" in p.environ() and p.environ()["RANK"] == "1"]
    assert len(rank1) == 1
    rank1[0].kill()
    code, out = finish(2, job)
    assert code not in (0, 143) and out.count(f"resumed {run_dir} at batch {stopped['batches']}") == 2, out[-3000:]
    # job 3: resumes from the newest checkpoint on every rank, and ends where the uninterrupted run ended
    code, out = finish(3, submit(3))
    assert code == 0, out[-3000:]
    resumed = [int(b) for b in re.findall(rf"resumed {re.escape(str(run_dir))} at batch (\d+)", out)]
    assert len(resumed) == 2 and len(set(resumed)) == 1 and resumed[0] >= later, out[-3000:]
    assert "using cached data" in out and "preparing data" not in out
    same_weights(ref_tmp / "runs" / "two" / "checkpoints" / "ep0-ba60-rank0.pt", run_dir / "checkpoints" / "ep0-ba60-rank0.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["validation"] == json.loads(
        (ref_tmp / "runs" / "two" / "summary.json").read_text())["validation"]
    assert [s["batches"][0] for s in summary["segments"]] == [0, stopped["batches"], resumed[0]]
