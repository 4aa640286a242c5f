"""The recipes of docs/extending.md, followed literally: each case takes the code block of its
section as the file the recipe names (written in a temporary folder and imported under the module name it would
have in the package), adds the registry line the section gives (monkeypatched, standing in for the edit), checks
the section's list of files, and trains it through `rafale -c`. If the instructions go stale, these fail."""

import importlib.util
import json
import re
import sys

import torch

from conftest import ROOT, run_in_process, write_config, write_lm_eval_task
from rafale.data import DATAPIPES
from rafale.models import decoder
from rafale.models.families import FAMILIES

SHORT = {"max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba", "warmup": "0ba", "eval_batches": 2}


def readme_section(title: str) -> str:
    """The recipe `## title` of docs/extending.md (the README's "Hacking on rafale: recipes" until they moved)."""
    recipes = (ROOT / "docs" / "extending.md").read_text()
    return recipes.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def recipe(title: str) -> tuple[str, list[str], str]:
    """(the section, the files it says it touches, its one code block)."""
    section = readme_section(title)
    (files,) = re.findall(r"Files: (.*?)\.\s", section, re.S)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return section, re.findall(r"`([^`]+)`", files), blocks[0] if blocks else ""


def module_from(tmp_path, monkeypatch, name: str, source: str):
    """`source` imported as the module `name` (rafale.models.sequential, ...), what the new file would be: written
    in tmp_path instead, so that the package stays as it is."""
    path = tmp_path / (name.rsplit(".", 1)[-1] + ".py")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


# ---- Adding a model family: a decoder family of its own, reusing GPT-NeoX ----

def test_a_new_family_as_the_readme_writes_it_trains_exports_generates_and_runs_lm_eval(tmp_path, cache_dir, capsys,
                                                                                        monkeypatch):
    section, files, code = recipe("Adding a model family")
    assert files == ["rafale/models/sequential.py", "rafale/models/families.py"]
    assert '`"sequential": SEQUENTIAL,`' in section
    sequential = module_from(tmp_path, monkeypatch, "rafale.models.sequential", code)
    monkeypatch.setitem(FAMILIES, "sequential", sequential.SEQUENTIAL)  # its line in rafale/models/families.py

    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "seq"},
                       model={"type": "sequential", "preset": "sequential-debug"}, training=SHORT)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "seq"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens"] > 0 and summary["model"] == "sequential sequential-debug"
    assert json.loads((run_dir / "model.json").read_text())["parallel_residual"] is False  # its preset, not Pythia's
    assert json.loads((run_dir / "export" / "config.json").read_text())["use_parallel_residual"] is False

    code, out, err = run_in_process(["generate", str(run_dir), "--prompt", "Once upon a time", "--max-new-tokens", "5"],
                                    capsys, monkeypatch)
    assert code == 0 and out.startswith("Once upon a time"), err
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "rafale_toy", [
        {"question": f"Story {i}: the dog was", "choices": [" happy", " sad"], "answer": i % 2} for i in range(4)])
    code, out, err = run_in_process(["lm-eval", str(run_dir), "--tasks", "rafale_toy", "--include-path", str(tasks)],
                                    capsys, monkeypatch)
    assert code == 0 and "rafale_toy" in out, err[-2000:]


def test_a_family_that_cannot_generate_is_refused_by_generate_by_what_it_is(tmp_path, cache_dir, capsys, monkeypatch):
    """`rafale generate` asks the family, not its name: the same decoder under a family that says it cannot
    generate is refused, naming the families that can."""
    import dataclasses

    from rafale.models import pythia

    monkeypatch.setitem(FAMILIES, "mute", dataclasses.replace(pythia.PYTHIA, name="mute", can_generate=False))
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "mute"},
                       model={"type": "mute", "preset": "pythia-debug"}, training=SHORT)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_in_process(["generate", str(tmp_path / "runs" / "mute"), "--prompt", "Once"], capsys,
                                    monkeypatch)
    assert code != 0 and "a mute run cannot generate text; only decoders can (pythia, llama, qwen2, qwen3)" in err, err


def test_a_module_of_its_own_inside_a_known_model_is_not_exported(tmp_path):
    """Even inside the family's own class, an unknown module class (no new parameters) would load as plain GPT-NeoX."""
    import pytest

    from rafale.errors import WeightsError
    from rafale.models.hf import save_pretrained

    class MyAttention(decoder.Attention):
        pass

    cfg = FAMILIES["pythia"].presets["pythia-debug"]
    model = decoder.GPTNeoX(decoder.DecoderConfig(**{**cfg.__dict__, "vocab_size": 128}))
    save_pretrained(model, tmp_path / "plain")  # the model as it is exports
    model.layers[1].attn = MyAttention(model.cfg)
    with pytest.raises(WeightsError, match="layers.1.attn is a MyAttention"):
        save_pretrained(model, tmp_path / "variant")
    assert not (tmp_path / "variant").exists()


# ---- Adding a data task: a task in its own file ----

def test_a_new_data_task_as_the_readme_writes_it_trains(tmp_path, cache_dir, capsys, monkeypatch):
    section, files, code = recipe("Adding a data task")
    assert files == ["rafale/data/reversed_lm.py", "rafale/data/__init__.py"]
    assert '`"reversed_lm": ReversedLMDataPipe,`' in section
    reversed_lm = module_from(tmp_path, monkeypatch, "rafale.data.reversed_lm", code)
    monkeypatch.setitem(DATAPIPES, "reversed_lm", reversed_lm.ReversedLMDataPipe)  # its line in rafale/data/__init__.py
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "reversed"},
                       model={"task": "reversed_lm"}, training=SHORT)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "reversed" / "summary.json").read_text())
    assert summary["task"] == "reversed_lm" and summary["tokens"] > 0
    assert "/reversed_lm/" in out  # its own cache folder
    # an encoder has no causal-LM head: the task is refused for it, naming what it does
    bert = write_config(tmp_path / "bert.yaml", model={"type": "bert", "preset": "bert-tiny", "task": "reversed_lm"})
    code, out, err = run_in_process(["-c", str(bert)], capsys, monkeypatch)
    assert code == 2 and "model.task" in err and "mlm or classification" in err, err


# ---- Adding an optimizer: a class by its dotted path, no edit ----

SIGN_SGD = '''import torch

BUILT = []  # (the test's window on what the run built)


class SignSGD(torch.optim.Optimizer):
    """signSGD (Bernstein et al. 2018): each parameter moves by lr against the sign of its gradient."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        BUILT.append(self)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad.sign(), alpha=-group["lr"])
'''


def test_an_optimizer_by_its_dotted_path_trains_with_no_edit(tmp_path, cache_dir, capsys, monkeypatch):
    section, files, _ = recipe("Adding an optimizer")
    assert files == [] and "Files: none." in section
    (tmp_path / "my_optimizers.py").write_text(SIGN_SGD)
    monkeypatch.chdir(tmp_path)  # beside the config, in the working directory, as the README says
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "sign"},
                       training=SHORT | {"optimizer": {"name": "my_optimizers.SignSGD"}})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    built = sys.modules["my_optimizers"].BUILT  # the run's optimizer was the file's class,
    assert built and {group["weight_decay"] for group in built[-1].param_groups} == {0.1, 0.0}  # with rafale's groups
    assert json.loads((tmp_path / "runs" / "sign" / "summary.json").read_text())["tokens"] > 0
    monkeypatch.delitem(sys.modules, "my_optimizers")


# ---- A new position scheme: ALiBi, the README's code block run as it would sit in rafale/models/decoder.py ----

def alibi_from_readme():
    """The README's ALiBi class, defined in the namespace of rafale/models/decoder.py (a copy of it), so that it
    is what pasting it into that file gives."""
    import re

    section = readme_section("A new attention or position scheme")
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = dict(vars(decoder))
    exec(code, namespace)
    return namespace["ALiBi"], section


def test_alibi_as_the_readme_writes_it_trains_decodes_and_is_refused_by_the_export(tmp_path, cache_dir, capsys,
                                                                                   monkeypatch):
    import re

    ALiBi, section = alibi_from_readme()
    # the recipe touches one file, and its registry line is the one the test adds
    assert recipe("A new attention or position scheme")[1] == ["rafale/models/decoder.py"]
    assert '`"alibi": ALiBi,`' in section
    monkeypatch.setitem(decoder.POSITIONS, "alibi", ALiBi)

    # the same tokens greedily with and without the KV cache, left padding included
    torch.manual_seed(0)
    model = decoder.GPTNeoX(decoder.DecoderConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                                                  intermediate_size=64, max_position_embeddings=64,
                                                  positions="alibi")).eval()
    assert isinstance(model.positions, ALiBi)
    ids = torch.randint(2, 96, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        cached = model.generate(ids, 12, use_cache=True, **kwargs)
        full = model.generate(ids, 12, use_cache=False, **kwargs)
        assert torch.equal(cached, full), kwargs
    # the scores really depend on distance: a head's bias grows linearly with it
    span = decoder.Span(past=0, T=5)
    bias, is_causal = model.positions.mask(span, torch.float32)
    assert not is_causal and bias.shape == (1, 4, 5, 5) and bias[0, 0, 4, 0] == -4 * model.positions.slopes[0]

    # through rafale -c: refused by the export before training starts, trains, overfits in DEBUG
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "alibi"},
                       model={"positions": "alibi"}, training=SHORT)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    refusal = "no Hugging Face export for this run: GPTNeoXForCausalLM has no alibi for model.positions"
    assert refusal in out and out.index(refusal) < out.index("[0/4"), out  # before the first evaluation
    assert not (tmp_path / "runs" / "alibi" / "export").exists()
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DEBUG": "1"})
    assert code == 0, err
    start, end = (float(x) for x in re.search(r"DEBUG: loss on the batch went from ([\d.]+) to ([\d.]+)", out).groups())
    assert end < 0.3 * start, out
