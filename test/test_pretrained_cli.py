"""Weights through the CLI: the export at the end of a run, `rafale export`, and starting from pretrained weights."""

import re

import pytest
import torch
from safetensors.torch import load_file

from rafale.config import ConfigError, load_config
from rafale.resolve import resolve_model_config
from rafale.models.hf import from_pretrained
from conftest import run_in_process, write_config

transformers = pytest.importorskip("transformers")


def train(tmp_path, capsys, monkeypatch, name, **sections):
    sections["run"] = {"output_dir": str(tmp_path / "runs"), "name": name, **sections.get("run", {})}
    sections["training"] = {"max_duration": "10ba", "eval_interval": "10ba", "save_interval": "10ba",
                            **sections.get("training", {})}
    cfg = write_config(tmp_path / f"{name}.yaml", **sections)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    return cfg, tmp_path / "runs" / name, out


def val_loss(out, when):
    return float(re.search(rf"validation loss at {when}: ([\d.]+)", out).group(1))


def test_run_exports_hf_weights_and_finetunes_from_them(tmp_path, cache_dir, capsys, monkeypatch):
    _, run_dir, out = train(tmp_path, capsys, monkeypatch, "pre")
    export = run_dir / "export"
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = from_pretrained(export)
    ids = torch.randint(0, 500, (2, 16))
    torch.testing.assert_close(hf_model(ids).logits, ours(ids), atol=1e-5, rtol=1e-4)
    # the true vocabulary is exported, not the embedding padded to a multiple of 64
    from rafale.run_folder import latest_checkpoint, read_checkpoint_weights

    trained = read_checkpoint_weights(latest_checkpoint(run_dir))
    assert trained["embed.weight"].shape[0] == 512  # padded to a multiple of 64 for training
    assert hf_model.config.vocab_size == 500 == transformers.AutoTokenizer.from_pretrained(export).vocab_size
    torch.testing.assert_close(ours.head.weight, trained["head.weight"][:500])

    # `rafale export` of the last checkpoint writes the same tensors
    code, _, err = run_in_process(["export", str(run_dir), "--out", str(tmp_path / "again")], capsys, monkeypatch)
    assert code == 0, err
    a, b = load_file(export / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # fine-tuning starts from those weights (and their tokenizer): its first loss is the first run's last
    _, _, tuned = train(tmp_path, capsys, monkeypatch, "tuned", model={"pretrained": str(export), "preset": ...},
                        data={"tokenizer": ...})
    assert val_loss(tuned, "start") == pytest.approx(val_loss(out, "end"), abs=1e-3)


def test_classifier_starts_from_an_mlm_runs_encoder(tmp_path, cache_dir, capsys, monkeypatch):
    from rafale.run.train import prepare_data
    from rafale.run.train import build_model

    model = {"type": "bert", "task": "mlm", "preset": "bert-tiny"}
    _, run_dir, _ = train(tmp_path, capsys, monkeypatch, "mlm", model=model)
    cfg_path = write_config(
        tmp_path / "cls.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "cls"},
        model={"type": "bert", "task": "classification", "preset": None, "pretrained": str(run_dir)},  # its export/
        data={"tokenizer": ...},  # the pretrained folder's tokenizer, then
    )
    cfg = load_config(cfg_path)
    assert cfg.data.tokenizer == str(run_dir / "export" / "tokenizer.json")
    model_cfg = resolve_model_config(cfg)
    data = prepare_data(cfg)
    composer_model = build_model(cfg, model_cfg, data)
    mlm = from_pretrained(run_dir / "export")
    ours = composer_model.model.state_dict()
    for name, tensor in mlm.bert.state_dict().items():
        assert torch.equal(ours[f"bert.{name}"], tensor), name
    assert composer_model.model.classifier.out_features == 3
    # and it trains through the CLI
    code, out, err = run_in_process(["-c", str(cfg_path), "--debug"], capsys, monkeypatch)
    assert code == 0, err[-3000:]


def test_pretrained_that_disagrees_with_the_config_is_an_error(tmp_path, cache_dir, capsys, monkeypatch):
    _, run_dir, _ = train(tmp_path, capsys, monkeypatch, "base")
    export = str(run_dir / "export")
    bad_preset = write_config(tmp_path / "a.yaml", model={"pretrained": export, "preset": "pythia-tiny"})
    with pytest.raises(ConfigError, match=r"'model.preset'.*disagrees with the pretrained"):
        resolve_model_config(load_config(bad_preset))
    bad_size = write_config(tmp_path / "b.yaml", model={"pretrained": export, "preset": None, "num_layers": 5})
    with pytest.raises(ConfigError, match=r"'model.num_layers'.*disagrees"):
        resolve_model_config(load_config(bad_size))
    bad_type = write_config(tmp_path / "c.yaml", model={"pretrained": export, "type": "bert", "preset": None})
    with pytest.raises(ConfigError, match=r"'model.type'.*GPTNeoXForCausalLM"):
        resolve_model_config(load_config(bad_type))
    missing = write_config(tmp_path / "d.yaml", model={"pretrained": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match=r"'model.pretrained'.*config.json"):
        resolve_model_config(load_config(missing))
