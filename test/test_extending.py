"""The README's "Adding a model", "Adding a datapipe" and "Adding an optimizer", followed literally: each
registers a tiny new piece the way the README says (the dicts are monkeypatched, standing in for the one-line
edit) and trains it for a few steps with `rafale -c`. If the instructions go stale, these fail."""

import json

import torch

from conftest import run_in_process, write_config
from rafale import datapipes, optim
from rafale.models import configurations, decoder
from rafale.models.composer import ComposerLM

SHORT = {"max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba", "warmup": "0ba", "eval_batches": 2}


# ---- Adding a model: an attention variant, defined here as it would be in rafale/models/decoder.py ----

class NoRotaryAttention(decoder.Attention):
    """GPT-NeoX attention without rotary positions (cos 1, sin 0): no parameter of its own, other maths."""

    def forward(self, x, cos, sin, *args, **kwargs):
        return super().forward(x, torch.ones_like(cos), torch.zeros_like(sin), *args, **kwargs)


class NoRotaryGPTNeoX(decoder.GPTNeoX):
    def __init__(self, cfg: decoder.DecoderConfig):
        super().__init__(cfg)
        for layer in self.layers:
            layer.attention = NoRotaryAttention(cfg)
        self.reset_parameters()


def build_norotary(model_cfg, task, meta, tokenizer):
    model_cfg.vocab_size = configurations.model_vocab_size(model_cfg.vocab_size, meta["vocab_size"])
    return ComposerLM(NoRotaryGPTNeoX(model_cfg), vocab_size=meta["vocab_size"])


def test_adding_a_model_trains_and_its_export_is_refused_honestly(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.setitem(configurations.PRESETS, "norotary", {"norotary-debug": configurations.PYTHIA_PRESETS["pythia-debug"]})
    monkeypatch.setitem(configurations.TASKS, "norotary", ("causal_lm",))
    monkeypatch.setitem(configurations.model_config_dict, "norotary", build_norotary)
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "norotary"},
                       model={"type": "norotary", "preset": "norotary-debug"}, training=SHORT)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "norotary"
    assert json.loads((run_dir / "summary.json").read_text())["tokens"] > 0
    # trained, checkpointed, and not exported as the plain GPT-NeoX it is not
    assert list((run_dir / "checkpoints").glob("ep*-ba4-rank0.pt"))
    assert not (run_dir / "export").exists()
    assert "no Hugging Face export" in out and "NoRotaryGPTNeoX" in out
    code, out, err = run_in_process(["export", str(run_dir)], capsys, monkeypatch)
    assert code == 2 and "no Hugging Face export" in err and "NoRotaryGPTNeoX" in err
    assert not (run_dir / "export").exists()


def test_a_module_of_its_own_inside_a_known_model_is_not_exported(tmp_path):
    """Even inside the family's own class, an unknown module class (no new parameters) would load as plain GPT-NeoX."""
    import pytest

    from rafale.errors import WeightsError
    from rafale.models.hf import save_pretrained

    cfg = configurations.PYTHIA_PRESETS["pythia-debug"]
    model = decoder.GPTNeoX(decoder.DecoderConfig(**{**cfg.__dict__, "vocab_size": 128}))
    save_pretrained(model, tmp_path / "plain")  # the model as it is exports
    model.layers[1].attention = NoRotaryAttention(model.cfg)
    with pytest.raises(WeightsError, match="layers.1.attention is a NoRotaryAttention"):
        save_pretrained(model, tmp_path / "variant")
    assert not (tmp_path / "variant").exists()


# ---- Adding a datapipe: a task defined here as it would be in rafale/datapipes.py ----

class ReversedLMDataPipe(datapipes.CausalLMDataPipe):
    """Causal LM on each document read backwards, word by word."""

    name = "reversed_lm"

    def _prepare(self, raw, tokenizer, meta):
        backwards = raw.map(lambda ex: {"text": " ".join(reversed(ex["text"].split(" ")))})
        return super()._prepare(backwards, tokenizer, meta)


def test_adding_a_datapipe_trains(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.setitem(datapipes.DATAPIPES, "reversed_lm", ReversedLMDataPipe)
    monkeypatch.setitem(configurations.TASKS, "pythia", ("causal_lm", "reversed_lm"))
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "reversed"},
                       model={"task": "reversed_lm"}, training=SHORT)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "reversed" / "summary.json").read_text())
    assert summary["task"] == "reversed_lm" and summary["tokens"] > 0
    assert "/reversed_lm/" in out  # its own cache folder


# ---- Adding an optimizer: a factory as it would be in rafale/optim.py ----

def test_adding_an_optimizer_trains(tmp_path, cache_dir, capsys, monkeypatch):
    built = []

    def sgd_nesterov(groups, t, args, device):
        """SGD with Nesterov momentum; `momentum` may be set in training.optimizer."""
        built.append(args)
        return optim.construct_optimizer(torch.optim.SGD, optim.groups_with_lr(groups, t.lr),
                                {"lr": t.lr, "momentum": 0.9, "nesterov": True}, args)

    monkeypatch.setitem(optim.OPTIMIZERS, "sgd_nesterov", sgd_nesterov)
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "sgd"},
                       training=SHORT | {"optimizer": {"name": "sgd_nesterov", "momentum": 0.8}})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    assert {"momentum": 0.8} in built  # the run's optimizer, its argument from the config
    assert json.loads((tmp_path / "runs" / "sgd" / "summary.json").read_text())["tokens"] > 0


# ---- A new position scheme: ALiBi, the README's code block run as it would sit in rafale/models/decoder.py ----

def readme_section(title: str) -> str:
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    return readme.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]


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
    assert re.findall(r"Files: (.*?)\. ", section) == ["`rafale/models/decoder.py`"]
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
