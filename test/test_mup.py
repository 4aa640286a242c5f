"""muP (model.parametrization: mup): the standard model at m = 1, Tensor Programs V's AdamW rules by hand at m = 4
(init, learning rates, the output multiplier, the attention scale), Muon's lrs, the export folded into a standard
model that transformers computes the same, and the bad inputs refused before any data work."""

import dataclasses

import pytest
import torch

from conftest import ROOT, randomize_, run_in_process, write_config
from rafale.config import ConfigError, TrainingConfig, config_from_dict
from rafale.models import mup as mup_lib
from rafale.models.decoder import Decoder
from rafale.models.mup import fold_mup
from rafale.models.families import FAMILIES
from rafale.models.hf import export_refusal, save_pretrained
from rafale.resolve import resolve_model_config
from rafale.run import optim
from rafale.run_folder.export_proof import TOLERANCE, prove_export

HIDDEN_MATRICES = ("attn.qkv.weight", "attn.proj.weight", "mlp.up.weight", "mlp.down.weight", "mlp.gate.weight")


def debug_decoder(family="pythia", seed=0, **fields) -> Decoder:
    preset = next(p for name, p in FAMILIES[family].presets.items() if name.endswith("-debug"))
    torch.manual_seed(seed)
    return Decoder(dataclasses.replace(preset, vocab_size=128, **fields))


def adamw_step(model: Decoder, lr=1e-2) -> None:
    optimizer = optim.build_optimizer(model, TrainingConfig(lr=lr, weight_decay=0.1), "cpu")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).backward()
    optimizer.step()


def lr_of_each_parameter(optimizer, model) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {name: lr_of[id(p)] for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------
# m = 1: the standard model, exactly


@pytest.mark.parametrize("family", ["pythia", "llama", "qwen2", "qwen3"])
def test_at_the_base_width_mup_is_the_standard_model(family, one_thread):
    standard = debug_decoder(family)
    mup = debug_decoder(family, mup_base_width=standard.cfg.hidden_size)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert mup_lib.width_mult(mup.cfg) == 1 and mup_lib.attention_scale(mup.cfg) is None
    assert torch.equal(mup(ids), standard(ids))  # the same draws, the same forward
    adamw_step(standard)
    adamw_step(mup)
    for (name, a), (_, b) in zip(standard.named_parameters(), mup.named_parameters()):
        assert torch.equal(a, b), name  # one AdamW step's update, equal too


# ----------------------------------------------------------------------------------------------------
# m = 4: each rule by hand


def test_at_four_times_the_base_width_hidden_matrices_learn_at_lr_over_4(one_thread):
    model = debug_decoder("llama", mup_base_width=16, tie_embeddings=False)  # hidden_size 64: m = 4
    optimizer = optim.build_optimizer(model, TrainingConfig(lr=8e-3), "cpu")
    lrs = lr_of_each_parameter(optimizer, model)
    hidden = {f"layers.{i}.{m}" for i in range(2) for m in ("attn.qkv.weight", "attn.proj.weight",
                                                            "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight")}
    assert hidden < set(lrs) and len(lrs) == len(hidden) + 1 + 1 + 2 * 2 + 1  # embed, head, 2 norms a block, final
    for name, lr in lrs.items():
        assert lr == (8e-3 / 4 if name in hidden else 8e-3), name  # embed, head, norms: the base lr


def test_muon_keeps_its_lr_and_its_adamw_part_the_base_lr():
    model = debug_decoder("pythia", mup_base_width=16)
    optimizer = optim.build_optimizer(model, TrainingConfig(lr=8e-3, optimizer={"name": "muon", "lr": 0.02}), "cpu")
    for name, lr in lr_of_each_parameter(optimizer, model).items():
        assert lr == (0.02 if name.endswith(HIDDEN_MATRICES) else 8e-3), name


def test_init_stds_by_hand():
    model = debug_decoder("pythia", mup_base_width=16, hidden_size=256, intermediate_size=1024)  # m = 16
    assert mup_lib.width_mult(model.cfg) == 16 and mup_lib.hidden_init_std(model.cfg) == pytest.approx(0.02 / 4)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        expected = 0.005 if name.endswith(HIDDEN_MATRICES) else 0.02  # 0.02 / sqrt(16) inside the blocks
        assert p.std().item() == pytest.approx(expected, rel=0.03), name


def test_the_logits_are_the_readout_over_m_and_the_scores_scale_as_1_over_d():
    model = debug_decoder("pythia", mup_base_width=16).eval()  # hidden 64, 4 heads of 16; base heads of 4
    assert mup_lib.width_mult(model.cfg) == 4
    assert model.layers[0].attn.scale == pytest.approx(4 ** 0.5 / 16)  # sqrt(base head) / head, = 1/(sqrt(16) * 2)
    normed = {}
    model.norm.register_forward_hook(lambda module, args, out: normed.setdefault("x", out))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    torch.testing.assert_close(logits, normed["x"] @ model.head.weight.T / 4)


def test_the_attention_scores_use_the_mup_scale():
    """One block's attention computed by hand (softmax(q k^T * scale) v, causal) equals the model's."""
    model = debug_decoder("pythia", mup_base_width=16, rotary_pct=0.0).eval()
    attn, x = model.layers[0].attn, torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    from rafale.models.decoder import POSITIONS, Span

    out = attn(x, POSITIONS["rotary"](model.cfg), Span(0, 6))
    q, k, v = attn.qkv(x).view(1, 6, 4, 3, 16).unbind(3)  # one query head per key/value head: [q, k, v] each
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (2 / 16)
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    by_hand = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(1, 6, 64)
    torch.testing.assert_close(out, attn.proj(by_hand))


# ----------------------------------------------------------------------------------------------------
# the export: a standard model that transformers loads and computes the same


@pytest.mark.parametrize("family, fields", [
    ("pythia", {}),
    ("llama", {"tie_embeddings": False}),
    ("qwen2", {"tie_embeddings": False}),
    ("qwen3", {"tie_embeddings": False, "head_dim": None}),  # QK-norm: the scale folds into q_norm's weight
], ids=["pythia", "llama", "qwen2", "qwen3"])
def test_an_untied_mup_model_exports_and_proves_itself(family, fields, tmp_path, one_thread):
    model = randomize_(debug_decoder(family, mup_base_width=16, **fields))  # m = 4
    assert mup_lib.attention_scale(model.cfg) is not None and export_refusal(model) is None
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fold_mup(model)(ids), model(ids))
    save_pretrained(model, tmp_path / "export")
    assert prove_export(model, tmp_path / "export").max_difference <= TOLERANCE  # transformers' logits = rafale's


def test_a_tied_mup_model_is_refused_by_name():
    model = debug_decoder("llama", mup_base_width=16, tie_embeddings=True)
    assert "tie_embeddings" in export_refusal(model) and "mup" in export_refusal(model)


# ----------------------------------------------------------------------------------------------------
# bad input: one line naming the key, before any data work


def config(model=None, training=None, base="pythia_debug.yaml"):
    import yaml
    from conftest import ROOT

    raw = yaml.safe_load((ROOT / "test" / base).read_text())
    raw["model"].update(model or {})
    raw["training"].update(training or {})
    return config_from_dict(raw)


@pytest.mark.parametrize("model, training, key, words", [
    ({"parametrization": "mup"}, {}, "model.mup_base_width", "needs a base width"),
    ({"mup_base_width": 64}, {}, "model.mup_base_width", "set model.parametrization: mup"),
    ({"parametrization": "mup", "mup_base_width": 0}, {}, "model.mup_base_width", "must be positive"),
    ({"parametrization": "mu-p"}, {}, "model.parametrization", "mup"),
    ({"parametrization": "mup", "mup_base_width": 32}, {"optimizer": {"name": "lion"}}, "model.parametrization",
     "not 'lion'"),
    ({"parametrization": "mup", "mup_base_width": 32}, {"optimizer": {"name": "torch.optim.SGD"}},
     "model.parametrization", "torch.optim.SGD"),
    ({"parametrization": "mup", "mup_base_width": 32}, {"optimizer": {"name": "muon", "use_adjusted_lr": True}},
     "training.optimizer.use_adjusted_lr", "grows with width"),
])
def test_bad_mup_settings_name_the_key(model, training, key, words):
    with pytest.raises(ConfigError) as err:
        config(model, training)
    assert f"'{key}'" in str(err.value) and words in str(err.value), str(err.value)


def test_an_encoder_under_mup_is_refused_by_name():
    cfg = config({"type": "bert", "preset": "bert-tiny", "parametrization": "mup", "mup_base_width": 32},
                 base="bert_mlm_stories.yaml")
    with pytest.raises(ConfigError, match=r"'model.parametrization'.*decoder families \(pythia, llama, qwen2, qwen3"
                                          r"\), not model.type bert"):
        resolve_model_config(cfg)


def test_mup_reaches_the_decoder_through_resolve():
    model_cfg = resolve_model_config(config({"parametrization": "mup", "mup_base_width": 16}))
    assert model_cfg.mup_base_width == 16 and mup_lib.width_mult(model_cfg) == 4


def test_the_cli_refuses_mup_with_another_optimizer_before_any_data_work(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"cache_dir": str(tmp_path / "cache")}, model={"parametrization": "mup",
                                                                          "mup_base_width": 16},
                       training={"optimizer": {"name": "soap"}})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 2 and "'model.parametrization'" in err and "soap" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_a_mup_run_trains_and_its_export_is_proven(tmp_path, cache_dir, capsys, monkeypatch):
    """`rafale -c` end to end: the config's muP reaches the model and the optimizer, the run's export is the folded
    standard model and transformers computes the same (the run prints the proof's line), the saved config says mup."""
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       model={"parametrization": "mup", "mup_base_width": 16},
                       training={"max_duration": "2ba", "warmup": "0ba", "eval_interval": "2ba", "eval_batches": 1,
                                 "save_interval": "2ba"})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "export checked: transformers' AutoModelForCausalLM loads it as GPTNeoXForCausalLM and gives the same" in out
    run_dir = tmp_path / "runs" / "pythia-debug"
    saved = (run_dir / "config.yaml").read_text()
    assert "parametrization: mup" in saved and "mup_base_width: 16" in saved
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_the_transfer_bench_reports_the_same_from_its_printed_lines(tmp_path, capsys, one_thread):
    """bench/mup_transfer.py runs one parametrisation a process (a core each); --report-from rebuilds the table
    from their printed lines, the same table a single process writes."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import mup_transfer

    tiny = ["--widths", "16,32", "--lrs", "1e-3,4e-3", "--steps", "2", "--eval-batches", "1", "--heads", "2",
            "--layers", "1", "--base-width", "16"]
    assert mup_transfer.main([*tiny, "--out", str(tmp_path / "one.md"), "--plot", str(tmp_path / "one.png")]) == 0
    (tmp_path / "run.log").write_text(capsys.readouterr().out)
    assert mup_transfer.main([*tiny, "--report-from", str(tmp_path / "run.log"), "--out", str(tmp_path / "two.md"),
                              "--plot", str(tmp_path / "two.png")]) == 0
    table = lambda name: (tmp_path / name).read_text().split("\n(")[0].strip()
    assert table("two.md") == table("one.md") and "width 32" in table("one.md")
    with pytest.raises(SystemExit, match="no run of standard width 64, mup width 64 in"):
        mup_transfer.main([*tiny, "--widths", "16,64", "--report-from", str(tmp_path / "run.log")])
    # a grid cut short at one width: its rate not run is said, and its best at the edge of what ran is flagged
    cut = "".join(line + "\n" for line in (tmp_path / "run.log").read_text().splitlines()
                  if not line.startswith("  mup      width   32 lr 0.004"))
    (tmp_path / "cut.log").write_text(cut)
    assert mup_transfer.main([*tiny, "--report-from", str(tmp_path / "cut.log"), "--out", str(tmp_path / "cut.md"),
                              "--plot", str(tmp_path / "cut.png")]) == 0
    text = (tmp_path / "cut.md").read_text()
    assert "| 0.004 | " in text and text.split("**muP**")[1].split("| 0.004 | ")[1].split("\n")[0].endswith("not run |")
    assert "width(s) [32]: the best is at the edge of the rates run there" in text
