"""rafale/run/optim.py: the optimizer registry, parameter groups, layerwise lr decay, schedule-free's modes; RMSNorm."""

import dataclasses
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_in_process, write_config
from rafale.run import optim
from rafale.config import ConfigError, TrainingConfig, config_from_dict
from rafale.resolve import resolve_model_config
from rafale.run_folder import read_checkpoint_weights
from rafale.models.families import FAMILIES
from rafale.models.decoder import GPTNeoX
from rafale.models.encoder import build_encoder
from rafale.models.hf import WeightsError, from_pretrained, save_pretrained

OPTIMIZERS = {  # name -> training keys that make it overfit the debug batch
    "adamw": {},
    "schedulefree_adamw": {},
    "soap": {},
    "muon": {"optimizer": {"name": "muon", "lr": 0.02}},
    "lion": {"lr": 1.0e-3},
    "torch.optim.SGD": {"lr": 0.3, "optimizer": {"name": "torch.optim.SGD", "momentum": 0.9}},
}


def decoder(**overrides):
    return GPTNeoX(dataclasses.replace(FAMILIES["pythia"].presets["pythia-debug"], vocab_size=128, **overrides))


def encoder():
    return build_encoder(dataclasses.replace(FAMILIES["bert"].presets["bert-tiny"], vocab_size=128), "classification")


def group_of(optimizer) -> dict:
    """id(parameter) -> its param group."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


# ----------------------------------------------------------------------------------------------------
# parameter groups


def test_default_is_the_old_adamw():
    model, t = decoder(), TrainingConfig()
    opt = optim.build_optimizer(model, t, "cpu")
    # the reference: make_optimizer as it was before the registry
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=t.betas, eps=t.eps, fused=True)  # fused on CPUs and GPUs
    assert type(opt) is torch.optim.AdamW
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in g["params"]] for g in ref.param_groups]
    for mine, theirs in zip(opt.param_groups, ref.param_groups):
        assert {k: v for k, v in mine.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_no_weight_decay_on_biases_norms_and_optionally_embeddings(name, decay_embeddings):
    model = decoder()
    t = TrainingConfig(optimizer={"name": name}, decay_embeddings=decay_embeddings)
    groups = group_of(optim.build_optimizer(model, t, "cpu"))
    for pname, p in model.named_parameters():
        expected = t.weight_decay if p.dim() >= 2 and (decay_embeddings or pname != "embed.weight") else 0.0
        assert groups[id(p)]["weight_decay"] == expected, pname


def test_muon_takes_the_hidden_matrices_only():
    model = decoder()
    opt = optim.build_optimizer(model, TrainingConfig(optimizer={"name": "muon", "lr": 0.05}, lr=1e-3), "cpu")
    groups = group_of(opt)
    for name, p in model.named_parameters():
        hidden = name.startswith("layers.") and p.dim() == 2
        assert groups[id(p)]["use_muon"] is hidden, name
        assert groups[id(p)]["lr"] == (0.05 if hidden else 1e-3), name


# depths 0..L+1, each with a decayed and a not decayed group, but the decoder's depth 0 (embed) has no vector
@pytest.mark.parametrize("build, num_layers, num_groups", [(decoder, 2, 7), (encoder, 2, 8)], ids=["decoder", "encoder"])
def test_layer_decay_groups_and_ratios(build, num_layers, num_groups):
    model, decay = build(), 0.8
    opt = optim.build_optimizer(model, TrainingConfig(lr=1e-3, layer_decay=decay), "cpu")
    assert len(opt.param_groups) == num_groups
    groups = group_of(opt)
    for name, p in model.named_parameters():
        if name.startswith(("embed.", "bert.embeddings.")):
            depth = 0
        elif m := re.match(r"(?:bert\.encoder\.layer|layers)\.(\d+)\.", name):
            depth = int(m.group(1)) + 1
        else:  # final norm, heads, pooler
            depth = num_layers + 1
        assert groups[id(p)]["lr"] == pytest.approx(1e-3 * decay ** (num_layers + 1 - depth)), name


def test_layer_decay_ratios_survive_composer_schedulers():
    from composer.core import State
    from composer.devices import DeviceCPU
    from composer.optim import CosineAnnealingWithWarmupScheduler, compile_composer_scheduler

    from rafale.models.composer import ComposerLM

    model = ComposerLM(decoder())
    opt = optim.build_optimizer(model, TrainingConfig(lr=1e-3, layer_decay=0.5), "cpu")
    initial = [g["lr"] for g in opt.param_groups]
    state = State(model=model, rank_zero_seed=0, run_name="t", device=DeviceCPU(), max_duration="10ba", optimizers=opt)
    scheduler = compile_composer_scheduler(CosineAnnealingWithWarmupScheduler(t_warmup="2ba", alpha_f=0.1), state)
    for _ in range(5):
        opt.step()
        state.timestamp = state.timestamp.to_next_batch(samples=1, tokens=1)
        scheduler.step()
    now = [g["lr"] for g in opt.param_groups]
    assert now[-1] != initial[-1]  # the schedule moved
    factor = now[-1] / initial[-1]
    assert now == pytest.approx([lr * factor for lr in initial], rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# config errors


def config_with(**training):
    return {"model": {"type": "pythia", "preset": "pythia-debug"}, "training": training}


def checked(raw: dict):
    """The config as `rafale -c` checks it before any work: loaded, then its optimizer built on a stand-in."""
    cfg = config_from_dict(raw)
    optim.check_optimizer(cfg.training)
    return cfg


def test_unknown_optimizer_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'training.optimizer.name'.*adamw, schedulefree_adamw, soap, muon, lion"):
        checked(config_with(optimizer={"name": "adamx"}))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_wrong_argument_is_named(name):
    with pytest.raises(ConfigError, match=r"'training.optimizer.betaz'.*no argument 'betaz'"):
        checked(config_with(optimizer={"name": name, "betaz": [0.9, 0.9]}))


def test_arguments_reach_the_optimizer_and_training_lr_is_not_overridden():
    opt = optim.build_optimizer(decoder(), TrainingConfig(optimizer={"name": "lion", "betas": [0.8, 0.9]}), "cpu")
    assert opt.param_groups[0]["betas"] == [0.8, 0.9]
    with pytest.raises(ConfigError, match=r"'training.optimizer.lr'.*training.lr"):
        checked(config_with(optimizer={"name": "adamw", "lr": 0.1}))
    with pytest.raises(ConfigError, match=r"'training.optimizer.name'.*not a torch.optim.Optimizer"):
        checked(config_with(optimizer={"name": "torch.nn.Linear"}))


@pytest.mark.parametrize("argv", [["-c"], ["sweep", "-c"]], ids=["train", "sweep"])
def test_the_cli_refuses_a_wrong_optimizer_before_any_data_work(argv, tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       data={"cache_dir": str(tmp_path / "cache")}, training={"optimizer": {"name": "adamx"}})
    code, out, err = run_in_process([*argv, str(cfg)] + (["training.lr=1e-3,2e-3"] if "sweep" in argv else []),
                                    capsys, monkeypatch)
    assert code == 2 and "'training.optimizer.name'" in err and "adamx" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, package", [("schedulefree_adamw", "schedulefree"), ("muon", "pytorch_optimizer")])
def test_a_missing_package_names_the_extra(name, package, monkeypatch):
    real = optim.importlib.import_module

    def without(module, *args):
        if module.split(".")[0] == package:
            raise ModuleNotFoundError(f"No module named '{package}'")
        return real(module, *args)

    monkeypatch.setattr(optim.importlib, "import_module", without)
    with pytest.raises(ConfigError, match=re.escape(f"needs the package {package}; install it with pip install 'rafale[optim]'")):
        checked(config_with(optimizer={"name": name}))


EPOCH_SIZES = (1, 7, 49, 98, 103, 107, 196, 1000)
FRACTIONS = ("0.01", "0.05", "0.07", "0.1", "0.2", "0.25", "0.29", "0.3", "0.33", "0.57", "0.7", "1")


@pytest.mark.parametrize("batches_per_epoch", EPOCH_SIZES)
def test_time_to_batches_is_exact_and_rounds_up(batches_per_epoch):
    """Against fractions.Fraction by hand: N epochs are N x the epoch's batches (not 50 for an epoch of 49); a share
    of the run that falls inside a batch is rounded up to that batch's end (0.05 x 49 = 2.45 -> 3)."""
    from fractions import Fraction

    for epochs in (1, 2, 3):
        total = epochs * batches_per_epoch
        assert optim.batches_in(f"{epochs}ep", f"{epochs}ep", batches_per_epoch, 8, 64) == total
        for share in FRACTIONS:
            expected = math.ceil(Fraction(share) * total)
            assert optim.batches_in(f"{share}dur", f"{epochs}ep", batches_per_epoch, 8, 64) == expected, (share, total)
            assert optim.batches_in(f"{share}dur", f"{total}ba", batches_per_epoch, 8, 64) == expected, (share, total)
            assert optim.whole_time(f"{share}dur", f"{epochs}ep", batches_per_epoch) == f"{expected}ba", (share, total)
            assert optim.whole_time(f"{share}dur", f"{total}ba", None) == f"{expected}ba", (share, total)
    tokens = 8 * 64 * batches_per_epoch  # one epoch of batches of 8 x 64 tokens, then one token more
    assert optim.batches_in(f"{tokens}tok", "1ep", batches_per_epoch, 8, 64) == batches_per_epoch
    assert optim.batches_in(f"{tokens + 1}tok", "1ep", batches_per_epoch, 8, 64) == batches_per_epoch + 1


def test_composer_converted_times_are_whole_batches():
    """What Composer turns into batches itself, with floats (a cosine warmup, the eval and save intervals), gets
    whole counts: 0.29 x 100 is 28.999999999999996 (Composer's warmup: 28), 0.07 x 100 is 7.000000000000001 (its
    intervals: 8)."""
    from rafale.config import Config
    from rafale.run.trainer_parts import make_scheduler, save_schedule

    assert optim.whole_time("0.07dur", "100ba", None) == "7ba"
    assert optim.whole_time("0.1dur", "20480tok", None) == "2048tok"
    assert optim.whole_time("0.25dur", "1ep", None) == "0.25dur"  # batches unknown: Composer's own
    assert optim.whole_time("2ep", "4ep", 49) == "2ep" and optim.whole_time("0dur", "1ep", 49) == "0dur"
    cfg = Config(training=TrainingConfig(warmup="0.29dur", max_duration="100ba", save_interval="0.07dur"))
    assert make_scheduler(cfg, debug=False, batches_per_epoch=1000).t_warmup == "29ba"
    assert save_schedule(cfg, batches_per_epoch=1000) == "7ba"


def test_schedule_free_warmup_in_batches_and_a_constant_schedule():
    from composer.optim import ConstantScheduler

    from rafale.config import Config
    from rafale.run.trainer_parts import make_scheduler

    assert optim.batches_in("5ba", "40ba", 10, 8, 64) == 5
    assert optim.batches_in("0.05dur", "40ba", 10, 8, 64) == 2
    assert optim.batches_in("0.1dur", "2ep", 10, 8, 64) == 2
    assert optim.batches_in("1ep", "2ep", 10, 8, 64) == 10
    assert optim.batches_in("1024tok", "2ep", 10, 8, 64) == 2
    cfg = Config(training=TrainingConfig(optimizer={"name": "schedulefree_adamw"}, warmup="10ba"))
    scheduler = make_scheduler(cfg, debug=False)
    assert isinstance(scheduler, ConstantScheduler) and scheduler.alpha == 1.0
    opt = optim.build_optimizer(decoder(), cfg.training, "cpu", warmup_steps=7)
    assert {g["warmup_steps"] for g in opt.param_groups} == {7}


# ----------------------------------------------------------------------------------------------------
# every optimizer trains: it overfits one batch (DEBUG's check, in a plain loop to stay fast), and a short run
# through the CLI trains, saves and exports


OVERFIT_STEPS = 20  # the slowest to overfit (lion, SGD) end near 0.6 of the start; 30 steps cost 1.5x as much


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_overfits_one_batch(name):
    torch.manual_seed(0)
    model = decoder()
    opt = optim.build_optimizer(model, TrainingConfig(**{"lr": 3e-3, "optimizer": {"name": name}} | OPTIMIZERS[name]), "cpu")
    switch = callable(getattr(opt, "train", None))  # schedule-free: train mode for the steps, eval mode to measure
    batch = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(0))
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def loss():
        return torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())

    start = float(loss())
    for _ in range(OVERFIT_STEPS):
        if switch:
            opt.train()
        opt.zero_grad()
        loss().backward()
        opt.step()
        if switch:
            opt.eval()
    end = float(loss())
    # a broken optimizer (no step, wrong sign, a frozen group) does not get near this
    assert end < 0.7 * start, (start, end)


def losses(out: str):
    start = float(re.search(r"validation loss at start: ([\d.]+)", out).group(1))
    end = float(re.search(r"validation loss at end: ([\d.]+)", out).group(1))
    return start, end


SHORT = {"max_duration": "4ba", "save_interval": "2ba", "eval_interval": "2ba", "eval_batches": 1, "warmup": "2ba",
         "checkpoints_to_keep": -1}


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "schedulefree_adamw"])  # it has its own run below
def test_each_optimizer_trains_saves_and_exports_a_short_run(name, tmp_path, cache_dir, capsys, monkeypatch):
    training = {"optimizer": {"name": name}} | OPTIMIZERS[name] | SHORT | {"max_duration": "2ba", "warmup": "0ba"}
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")}, training=training)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    start, end = losses(out)
    assert end < start, out[-2000:]
    run_dir = tmp_path / "runs" / "pythia-debug"
    assert (run_dir / "checkpoints" / "ep0-ba2-rank0.pt").is_file()
    assert (run_dir / "export" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------
# schedule-free: validation, checkpoints and the export hold the averaged weights; resuming is exact


def schedule_free_config(tmp_path: Path, **training) -> Path:
    return write_config(tmp_path / "sf.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "sf"},
                        training={"optimizer": {"name": "schedulefree_adamw"}} | SHORT | training)


def read_checkpoint(path: Path) -> dict:
    from rafale.run.resilience import CHECKPOINT_SAFE_GLOBALS

    with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)["state"]


def test_schedule_free_keeps_the_averaged_weights_and_resumes_exactly(tmp_path, cache_dir, capsys, monkeypatch):
    cfg = schedule_free_config(tmp_path)
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "runs" / "sf"
    checkpoints = run_dir / "checkpoints"
    (opt_state,) = read_checkpoint(checkpoints / "ep0-ba4-rank0.pt")["optimizers"].values()
    groups = opt_state["param_groups"]
    # saved in eval mode, after its own warmup of training.warmup (2ba) with a constant Composer schedule
    assert [g["train_mode"] for g in groups] == [False] * len(groups)
    assert {g["warmup_steps"] for g in groups} == {2} and {g["lr"] for g in groups} == {3.0e-3}
    # the export holds the checkpoint's weights: x (eval mode), not the training sequence y
    exported = from_pretrained(run_dir / "export").state_dict()
    expected = read_checkpoint_weights(checkpoints / "ep0-ba4-rank0.pt")
    for name, tensor in exported.items():
        assert torch.equal(tensor, expected[name][: tensor.shape[0]]), name
    # and y = (1 - beta1) z + beta1 x differs from x, so a train-mode export or checkpoint would not pass
    assert any(not torch.equal(s["z"], x) for s, x in zip(opt_state["state"].values(), expected.values())
               if s["z"].shape == x.shape)

    # what a run killed after its batch-2 checkpoint leaves behind, run again: the same weights, bit for bit
    (checkpoints / "ep0-ba4-rank0.pt").unlink()
    (checkpoints / "latest-rank0.pt").unlink()
    os.symlink("ep0-ba2-rank0.pt", checkpoints / "latest-rank0.pt")
    shutil.rmtree(run_dir / "export")
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert re.search(r"rafale: resumed .* at batch 2\b", out), out[-2000:]
    resumed = read_checkpoint_weights(checkpoints / "ep0-ba4-rank0.pt")
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


# ----------------------------------------------------------------------------------------------------
# RMSNorm (model.norm: rmsnorm)


def test_rmsnorm_init_and_formula():
    model = decoder(norm="rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    for norm in norms:
        nn.init.normal_(norm.weight)
    model.reset_parameters()
    for norm in norms:
        assert norm.bias is None if hasattr(norm, "bias") else True
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    norm = model.norm
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    norm = norm.double()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight  # Zhang & Sennrich 2019, eq. 4
    torch.testing.assert_close(norm(x), expected)


def test_rmsnorm_is_a_model_option_checked_by_the_config():
    with pytest.raises(ConfigError, match=r"'model.norm'.*'layernorm' or 'rmsnorm'"):
        resolve_model_config(config_from_dict({"model": {"type": "pythia", "preset": "pythia-debug", "norm": "batchnorm"}}))


def test_rmsnorm_has_no_hf_export_and_the_run_keeps_its_checkpoints(tmp_path, cache_dir, capsys, monkeypatch):
    with pytest.raises(WeightsError, match="GPTNeoXForCausalLM has no rmsnorm"):
        save_pretrained(decoder(norm="rmsnorm"), tmp_path / "export")
    assert not (tmp_path / "export").exists()
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")}, model={"norm": "rmsnorm"},
                       training=SHORT | {"max_duration": "2ba"})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "no Hugging Face export" in out and "has no rmsnorm" in out, out[-2000:]
    run_dir = tmp_path / "runs" / "pythia-debug"
    assert (run_dir / "checkpoints" / "ep0-ba2-rank0.pt").is_file() and not (run_dir / "export").exists()
