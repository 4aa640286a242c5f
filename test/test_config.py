import dataclasses
import textwrap

import pytest
import yaml

from rafale.config import Config, ConfigError, config_from_dict, config_reference, load_config, save_config
from rafale.resolve import resolve_model_config
from rafale.models.families import FAMILIES
from conftest import RAFALE, ROOT, run_cli

BASE = yaml.safe_load((ROOT / "test" / "pythia_debug.yaml").read_text())


def with_changes(**sections):
    cfg = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def error_of(raw) -> str:
    """The error of loading `raw` as the CLI does: the schema, then the model section against its family."""
    with pytest.raises(ConfigError) as info:
        resolve_model_config(config_from_dict(raw))
    return str(info.value)


def test_good_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "test" / "pythia_debug.yaml")
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert cfg.training.lr == 3e-3 and cfg.data.block_size == 64 and cfg.model.preset == "pythia-debug"


def test_default_configs_load():
    for name in ("pythia_tinystories.yaml", "pythia_tinystories_full.yaml", "pythia_debug.yaml"):
        assert isinstance(load_config(ROOT / "test" / name), Config)


@pytest.mark.parametrize(
    "changes, key, expected",
    [
        ({"training": {"lrr": 0.1}}, "training.lrr", "did you mean 'lr'"),
        ({"data": {"blok_size": 8}}, "data.blok_size", "did you mean 'block_size'"),
        ({"trainer": {"lr": 0.1}}, "trainer", "did you mean 'training'"),
        ({"training": {"batch_size": "many"}}, "training.batch_size", "expected an integer"),
        ({"training": {"batch_size": 2.5}}, "training.batch_size", "expected an integer"),
        ({"training": {"lr": "fast"}}, "training.lr", "expected a number"),
        ({"training": {"clip_norm": [1]}}, "training.clip_norm", "expected a number or null"),
        ({"run": {"autoresume": "yes"}}, "run.autoresume", "expected true or false"),
        ({"training": {"precision": "fp8"}}, "training.precision", "'fp32' or 'amp_fp16' or 'amp_bf16'"),
        ({"training": {"betas": [0.9]}}, "training.betas", "a list of 2"),
        ({"training": {"batch_size": 0}}, "training.batch_size", "must be positive"),
        ({"training": {"lr": -1.0}}, "training.lr", "must be positive"),
        ({"data": {"block_size": -4}}, "data.block_size", "must be positive"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction", "between 0 and 1"),
        ({"data": {"block_size": 1024}}, "data.block_size", "larger than the model's max_position_embeddings (256)"),
        ({"training": {"microbatch_size": 16}}, "training.microbatch_size", "cannot be larger than training.batch_size"),
        ({"training": {"max_duration": "ten epochs"}}, "training.max_duration", "Composer time string"),
        ({"training": {"max_duration": "0.5dur"}}, "training.max_duration", "cannot be a fraction"),
        ({"training": {"eval_interval": "0ba"}}, "training.eval_interval", "must be positive"),
        ({"data": {"source": "no/such/file.txt"}}, "data.source", "no such file or folder"),
        ({"data": {"tokenizer": "no/such/tokenizer.json"}}, "data.tokenizer", "no such file"),
        ({"training": {"load_path": "no/such.pt"}}, "training.load_path", "no such checkpoint"),
        ({"training": {"eval_only": True}}, "training.load_path", "eval_only needs a checkpoint"),
        ({"model": {"type": "pythiaa"}}, "model.type=pythiaa", "did you mean 'pythia'"),
        ({"model": {"preset": "pythia-7b"}}, "model.preset=pythia-7b", "valid keys"),
        ({"model": {"num_layer": 3}}, "model.num_layer", "did you mean 'num_layers'"),
        ({"model": {"num_layers": "two"}}, "model.num_layers", "expected an integer"),
        ({"model": {"num_heads": 3}}, "model", "divisible by num_heads"),
        ({"model": {"qkv_bias": True}}, "model", "says again what attention_bias: true does"),  # Pythia's is true
        ({"run": {"name": "a/b"}}, "run.name", "plain folder name"),
        ({"run": {"device": "gpu"}, "training": {"fsdp": {"state_dict_type": "sharded"}}},
         "training.fsdp.state_dict_type", "full checkpoints only"),
    ],
)
def test_bad_values_name_the_key(changes, key, expected):
    message = error_of(with_changes(**changes))
    assert f"'{key}'" in message and expected in message, message


def test_missing_and_malformed_sections():
    assert "'model': required section is missing" in error_of({k: v for k, v in BASE.items() if k != "model"})
    assert "expected a mapping" in error_of({**BASE, "training": [1, 2]})
    assert "expected a mapping of sections" in error_of([1, 2])
    assert "empty" in error_of(None)


def test_numbers_written_as_yaml_strings_are_accepted():
    # PyYAML reads 1e-3 (no dot) as a string; a learning rate written that way is still a number
    cfg = config_from_dict(with_changes(training={"lr": "1e-3"}))
    assert cfg.training.lr == 1e-3


def test_model_overrides_apply_to_the_preset():
    cfg = config_from_dict(with_changes(model={"num_layers": 3, "rotary_pct": 1.0}))
    model_cfg = resolve_model_config(cfg)
    assert (model_cfg.num_layers, model_cfg.rotary_pct) == (3, 1.0)
    assert model_cfg.hidden_size == FAMILIES["pythia"].presets["pythia-debug"].hidden_size
    assert FAMILIES["pythia"].presets["pythia-debug"].num_layers == 2  # the preset itself is untouched


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        model:
          type: pythia
        training:
          lr: [0.1
        """))
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_reference_documents_every_field():
    reference = config_reference()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f"`{f.name}`" in reference
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(with_changes(training={"lrr": 0.1}, run={"output_dir": str(tmp_path / "runs")})))
    result = run_cli([*RAFALE, "-c", str(cfg)], env={"RAFALE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert "config error at 'training.lrr'" in result.stderr and "did you mean 'lr'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()
