"""The commands that do not train start without Composer or transformers (Composer's import alone takes longer
than the rest of such a command: it pulls in torchmetrics, transformers and matplotlib). Each command runs once,
in a fresh interpreter, on a run trained here; then sys.modules is read.

Commands that cannot avoid them: `rafale -c cfg.yaml` and `sweep` train (Composer's Trainer), and are not listed;
`export` loads what it wrote back in transformers to check it (rafale/run_folder/export_proof.py), and is listed for Composer
only (ALLOWED); `lm-eval` runs lm-evaluation-harness (which imports transformers), and `zero-shot` needs a CLIP run,
which is not trained here (it loads its model as `generate` does, through rafale.run_folder.load_run_model)."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_config
from rafale.data.stories import story_splits

HEAVY = ("composer", "transformers")

# (id, argv, environment) of each command checked; one line per command. The placeholders are filled by the
# `folder` fixture: {run} a trained pythia-debug run folder, {runs} the folder of runs it is in, {config} its config,
# {texts} a .txt of a few stories, {out} a folder that does not exist yet. To add a command, add its line, e.g.
#     ("score", ["score", "{run}", "--file", "{texts}"], {}),
COMMANDS = [
    ("generate", ["generate", "{run}", "--prompt", "Once upon a time", "--max-new-tokens", "3"], {}),
    ("generate-hf-folder", ["generate", "{run}/export", "--prompt", "Once upon a time", "--max-new-tokens", "3"], {}),
    ("runs", ["runs", "{runs}"], {}),
    ("plot", ["plot", "{run}"], {}),
    ("data-only", ["-c", "{config}"], {"DATA": "1"}),
    ("export", ["export", "{run}", "--out", "{out}"], {}),
    ("score", ["score", "{run}", "--file", "{texts}"], {}),
    ("score-per-line", ["score", "{run}", "--file", "{texts}", "--per-line"], {}),
    # predict needs a classifier run: test/test_predict_score.py checks its imports on one
]
ALLOWED = {"export": ("transformers",)}  # command -> what of HEAVY it needs (see above)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cache_dir):
    """The placeholders of COMMANDS, around a pythia-debug run trained for two batches (in this process)."""
    from rafale.main import main

    root = tmp_path_factory.mktemp("startup")
    cfg = write_config(root / "cfg.yaml", run={"output_dir": str(root / "runs")},
                       training={"max_duration": "2ba", "eval_interval": "2ba", "save_interval": "2ba"})
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exit:
        main(["-c", str(cfg)])
    assert exit.value.code == 0, out.getvalue()[-3000:]
    (root / "texts.txt").write_text("\n".join(story_splits(5, 1, seed=0)["train"]))
    return {"run": str(root / "runs" / "pythia-debug"), "runs": str(root / "runs"), "config": str(cfg),
            "texts": str(root / "texts.txt"), "out": str(root / "out")}


def modules_after(argv: list[str], env: dict) -> dict:
    """rafale.main.main(argv) in a fresh interpreter: its exit code, output, and which of HEAVY it imported."""
    probe = f"""
import json, sys
from rafale.main import main
try:
    main({argv!r})
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "output": done.stdout + done.stderr}


@pytest.mark.parametrize("argv,env", [(argv, env) for _, argv, env in COMMANDS], ids=[name for name, _, _ in COMMANDS])
def test_the_command_imports_neither_composer_nor_transformers(folder, argv, env):
    result = modules_after([arg.format(**folder) for arg in argv], env)
    assert result["code"] == 0, result["output"][-3000:]
    heavy = [m for m in result["heavy"] if m not in ALLOWED.get(argv[0], ())]
    assert heavy == [], f"{argv[0]} imported {heavy}"
