"""The Hugging Face export refuses any model whose config says something transformers' class cannot (one general
check: the config through config.json and back), and a run says so before its first training batch."""

import dataclasses
import re
import typing

import pytest

from conftest import run_in_process, write_config
from rafale.models import clip
from rafale.models.families import FAMILIES
from rafale.models.decoder import DecoderConfig, GPTNeoX
from rafale.models.encoder import EncoderConfig, build_encoder
from rafale.models.hf import (TRAINING_ONLY_FIELDS, WeightsError, architectures, config_refusal, export_refusal,
                              save_pretrained)

# (family, task) -> the architecture save_pretrained writes
ARCHITECTURE = {(family.name, head): name for name, (family, head) in architectures().items()}


def with_vocab(cfg):
    """A preset with the vocabulary a tokenizer would give it (the tiny ones leave it to the data)."""
    if isinstance(cfg, clip.ClipConfig):
        return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=cfg.text.vocab_size or 128))
    return dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 128)


def test_every_preset_of_every_family_is_exportable():
    checked = 0
    for family, presets in ((name, f.presets) for name, f in FAMILIES.items()):
        for name, cfg in presets.items():
            for task in FAMILIES[family].heads:
                architecture = ARCHITECTURE[(family, task)]
                assert config_refusal(with_vocab(cfg), architecture) is None, (family, name, task)
                checked += 1
    assert checked == 28  # 4 Pythia, 4 Llama, 3 Qwen2, 3 Qwen3, 2 x 2 BERT and RoBERTa presets x 2 tasks, 3 CLIP,
    # 3 SigLIP


def test_tiny_models_of_every_head_are_exportable():
    assert export_refusal(GPTNeoX(with_vocab(FAMILIES["pythia"].presets["pythia-debug"]))) is None
    for family, preset in (("bert", "bert-tiny"), ("roberta", "roberta-tiny")):
        for head in ("base", "mlm", "classification"):
            assert export_refusal(build_encoder(with_vocab(FAMILIES[family].presets[preset]), head)) is None, (family, head)
    assert export_refusal(clip.build_model(with_vocab(FAMILIES["siglip"].presets["siglip-debug"]))) is None


def test_rmsnorm_is_refused_by_name_with_its_value(tmp_path):
    model = GPTNeoX(dataclasses.replace(with_vocab(FAMILIES["pythia"].presets["pythia-debug"]), norm="rmsnorm"))
    why = export_refusal(model)
    assert why is not None and "model.norm" in why and "rmsnorm" in why and "layernorm" in why, why
    with pytest.raises(WeightsError, match=r"model\.norm"):
        save_pretrained(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def other_value(value, annotation):
    """A valid value of a config field other than `value`, for the round trip."""
    if typing.get_origin(annotation) is typing.Literal:
        return next(v for v in typing.get_args(annotation) if v != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, int):
        return value * 2 if value else 1
    return None


# what each decoder's config.json cannot say, among the fields a bool, number or Literal flips
CANNOT_SAY = {
    "pythia": {"norm", "mlp_bias", "qk_norm", "tie_embeddings"},  # qkv_bias: invalid beside attention_bias
    "llama": {"norm", "parallel_residual", "rotary_pct", "qkv_bias", "qk_norm"},
    "qwen2": {"norm", "parallel_residual", "rotary_pct", "qk_norm", "mlp_bias", "qkv_bias"},
    "qwen3": {"norm", "parallel_residual", "rotary_pct", "qk_norm", "mlp_bias", "qkv_bias"},
}


@pytest.mark.parametrize("base", [
    ("pythia", "pythia-debug", "GPTNeoXForCausalLM"),
    ("llama", "llama-debug", "LlamaForCausalLM"),
    ("qwen2", "qwen2-debug", "Qwen2ForCausalLM"),
    ("qwen3", "qwen3-debug", "Qwen3ForCausalLM"),
    ("bert", "bert-tiny", "BertForSequenceClassification"),
    ("roberta", "roberta-tiny", "RobertaForMaskedLM"),
])
def test_each_field_either_comes_back_or_is_refused_by_name(base):
    """Change each field of the config, one at a time: the export writes it (and transformers reads the same value
    back, which the round trip sees) or refuses it, naming it."""
    family, preset, architecture = base
    cfg = with_vocab(FAMILIES[family].presets[preset])
    refused = set()
    for f in dataclasses.fields(cfg):
        if f.name in TRAINING_ONLY_FIELDS:
            continue
        value = other_value(getattr(cfg, f.name), f.type)
        if value is None:
            continue
        changed = dataclasses.replace(cfg, **{f.name: value})
        if f.name == "pad_token_id" and family == "roberta":
            changed = dataclasses.replace(changed, position_offset=value + 1)
        try:
            changed.validate()
        except ValueError:
            continue  # a value the config itself refuses (position_offset alone, a family's pooling)
        why = config_refusal(changed, architecture)
        if why is not None:
            assert f"model.{f.name}" in why and str(value) in why, (f.name, why)
            refused.add(f.name)
    # BERT and RoBERTa's config.json say everything rafale's encoder varies
    assert refused == CANNOT_SAY.get(family, set())


@dataclasses.dataclass
class QKNormDecoderConfig(DecoderConfig):
    qk_norm: bool = False  # a research variant's field, as model.norm was added


@dataclasses.dataclass
class GatedEncoderConfig(EncoderConfig):
    gate: str = "none"


def test_a_new_field_at_another_value_than_its_default_is_refused_by_name():
    cfg = QKNormDecoderConfig(**dataclasses.asdict(with_vocab(FAMILIES["pythia"].presets["pythia-debug"])))
    assert export_refusal(GPTNeoX(cfg)) is None  # at its default the variant is the plain model
    why = export_refusal(GPTNeoX(dataclasses.replace(cfg, qk_norm=True)))
    assert why == "GPTNeoXForCausalLM has no True for model.qk_norm (an export would load as False)", why

    cfg = GatedEncoderConfig(**dataclasses.asdict(with_vocab(FAMILIES["bert"].presets["bert-tiny"])))
    assert export_refusal(build_encoder(cfg, "mlm")) is None
    why = export_refusal(build_encoder(dataclasses.replace(cfg, gate="glu"), "mlm"))
    assert why is not None and "model.gate" in why and "glu" in why, why


def test_clip_towers_are_checked_field_by_field():
    cfg = with_vocab(FAMILIES["clip"].presets["clip-debug"])
    assert config_refusal(cfg, "CLIPModel") is None
    # CLIPModel's config.json has no pooling of its own: the family says it, so a text tower pooled otherwise
    # cannot be written (the config check refuses that value for a CLIP; the round trip would too)
    changed = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pooling="last"))
    why = config_refusal(changed, "CLIPModel")
    assert why is not None and "model.text.pooling" in why, why


# ----------------------------------------------------------------------------------------------------
# through `rafale -c` and `rafale export`

SHORT = {"max_duration": "2ba", "eval_interval": "2ba", "save_interval": "2ba", "log_interval": "1ba"}


def run(tmp_path, capsys, monkeypatch, name, **model):
    cfg = write_config(tmp_path / f"{name}.yaml", run={"output_dir": str(tmp_path / "runs"), "name": name},
                       training=SHORT, model=model)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    return tmp_path / "runs" / name, out


def test_a_run_that_cannot_be_exported_says_so_before_training_and_still_trains(tmp_path, cache_dir, capsys,
                                                                                 monkeypatch):
    run_dir, out = run(tmp_path, capsys, monkeypatch, "rms", norm="rmsnorm")
    lines = out.splitlines()
    refusal = [i for i, line in enumerate(lines) if line.startswith("rafale: no Hugging Face export for this run:")]
    first_batch = next(i for i, line in enumerate(lines) if re.match(r"\[\s*1/2\s", line))
    first_console_line = next(i for i, line in enumerate(lines) if line.startswith("["))  # the evaluation at step 0
    assert len(refusal) == 1 and refusal[0] < first_console_line <= first_batch, out
    assert "model.norm" in lines[refusal[0]] and "the checkpoints will hold the weights" in lines[refusal[0]]
    # it trained, kept its checkpoints, and its end says why there is no export
    assert (run_dir / "checkpoints" / "ep0-ba2-rank0.pt").is_file() and not (run_dir / "export").exists()
    assert re.search(r"^rafale: no Hugging Face export: .*model\.norm", out, re.M), out

    code, out, err = run_in_process(["export", str(run_dir)], capsys, monkeypatch)
    assert code == 2 and not (run_dir / "export").exists()
    message = err.strip().splitlines()
    assert len(message) == 1 and "no Hugging Face export" in message[0] and "model.norm" in message[0], err


def test_a_plain_run_prints_no_refusal_and_exports(tmp_path, cache_dir, capsys, monkeypatch):
    run_dir, out = run(tmp_path, capsys, monkeypatch, "plain")
    assert "no Hugging Face export" not in out, out
    assert (run_dir / "export" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------
# The small-model speed tricks (modded-nanogpt's): each exports to an HF class that computes the same, or is refused
# by name before training starts

TRICKS = [
    # (family, the trick's fields, the refusal's words, or None: it exports)
    ("pythia", {"mlp": "relu2"}, None),  # GPT-NeoX's hidden_act: relu2 is ReLU^2
    ("pythia", {"mlp": "swiglu"}, "GPTNeoXForCausalLM has no swiglu for model.mlp"),
    ("pythia", {"qk_norm": True}, "GPTNeoXForCausalLM has no True for model.qk_norm"),
    ("pythia", {"zero_init_proj": True}, None),  # how the weights start: the weights are exported
    ("pythia", {"logit_softcap": 15.0}, "GPTNeoXForCausalLM has no 15.0 for model.logit_softcap"),
    ("llama", {"mlp": "relu2"}, "LlamaForCausalLM has no relu2 for model.mlp"),
    ("llama", {"qk_norm": True}, "LlamaForCausalLM has no True for model.qk_norm"),  # model.type: qwen3 has it
    ("llama", {"tie_embeddings": False}, None),  # an untied head
    ("llama", {"zero_init_proj": True}, None),
    ("llama", {"logit_softcap": 30.0}, "LlamaForCausalLM has no 30.0 for model.logit_softcap"),
    ("qwen3", {"tie_embeddings": False, "zero_init_proj": True}, None),  # QK-norm and SwiGLU: Qwen3 itself
    ("qwen3", {"mlp": "relu2"}, "Qwen3ForCausalLM has no relu2 for model.mlp"),
]


@pytest.mark.parametrize("family, fields, refusal", TRICKS, ids=[f"{f}-{'-'.join(map(str, d.values()))}" for f, d, _ in TRICKS])
def test_each_speed_trick_exports_to_what_computes_the_same_or_is_refused_by_name(tmp_path, family, fields, refusal):
    import torch

    transformers = pytest.importorskip("transformers")
    preset = next(iter(name for name in FAMILIES[family].presets if name.endswith("-debug")))
    model = GPTNeoX(dataclasses.replace(with_vocab(FAMILIES[family].presets[preset]), **fields)).eval()
    why = export_refusal(model)
    if refusal is not None:
        assert why is not None and refusal in why, why
        return
    assert why is None, why
    with torch.no_grad():
        for p in model.parameters():  # away from the init (zero projections, unit norms), so every tensor counts
            p.add_(torch.randn_like(p) * 0.1)
    save_pretrained(model, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
