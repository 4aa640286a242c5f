"""What a researcher trusts without checking: the seed picks the data order, a config that Composer would refuse
fails up front, gradient accumulation changes nothing but memory, evaluation scores the same thing every time,
and the speed figures count what was trained."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Time, Timestamp
from composer.optim import CosineAnnealingWithWarmupScheduler
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler

import rafale.run.train
from conftest import run_in_process, write_config
from rafale.config import ConfigError, load_config
from rafale.data.causal_lm import CausalLMCollator
from rafale.data.classification import ClassificationCollator
from rafale.data.mlm import MLMCollator
from rafale.errors import IGNORE_INDEX
from rafale.models.composer import ComposerLM, ComposerMLM
from rafale.models.bert import BERT_PRESETS
from rafale.models.pythia import PRESETS as PYTHIA_PRESETS
from rafale.models.decoder import GPTNeoX
from rafale.models.encoder import build_encoder
from rafale.run.resilience import FiniteLossMonitor, TrainingDiverged
from rafale.run.trainer_parts import count_tokens, make_dataloader, make_scheduler


def blocks(n: int, length: int = 8) -> Dataset:
    return Dataset.from_dict({"input_ids": [[i] * length for i in range(n)]}).with_format("torch")


def first_batch(seed: int) -> list[int]:
    loader = make_dataloader(blocks(64), 8, CausalLMCollator(pad_token_id=0), True, True, 0, False, seed=seed)
    return next(iter(loader.dataloader))["input_ids"][:, 0].tolist()


# ----------------------------------------------------------------------------------------------------
# what run() hands Composer's Trainer, without training: the Trainer is replaced by one that records its arguments


class Recorded(Exception):
    pass


@pytest.fixture
def trainer_arguments(tmp_path, cache_dir, capsys, monkeypatch):
    """run(): the keyword arguments it builds the Trainer with, for a config with some keys changed."""

    def record(env=None, **sections):
        recorded = {}

        def fake_trainer(**kwargs):
            recorded.update(kwargs)
            raise Recorded

        monkeypatch.setattr(rafale.run.train, "Trainer", fake_trainer)
        cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), **sections.pop("run", {})},
                           **sections)
        with pytest.raises(Recorded):
            run_in_process(["-c", str(cfg)], capsys, monkeypatch, env=env)
        return recorded

    return record


def test_the_data_order_follows_run_seed(trainer_arguments):
    orders = [first_batch(seed) for seed in (1, 42, 12345)]
    assert len({tuple(o) for o in orders}) == 3  # three seeds, three orders
    assert first_batch(42) == orders[1]  # and one seed, one order
    for seed in (1, 42):  # run() passes run.seed on
        kwargs = trainer_arguments(run={"seed": seed})
        assert kwargs["train_dataloader"].dataloader.sampler.seed == seed


# ----------------------------------------------------------------------------------------------------
# 2. time units that Composer's schedulers refuse are config errors, checked against Composer itself


def composer_accepts(warmup: str, max_duration: str) -> bool:
    cfg = SimpleNamespace(training=SimpleNamespace(warmup=warmup, schedule="cosine", lr_final_ratio=0.1,
                                                   optimizer={"name": "adamw"}))
    scheduler = make_scheduler(cfg, debug=False)
    assert isinstance(scheduler, CosineAnnealingWithWarmupScheduler)
    state = SimpleNamespace(max_duration=Time.from_timestring(max_duration), dataloader_len=Time(10, "ba"),
                            timestamp=Timestamp())
    try:
        scheduler(state)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("warmup,max_duration", [
    ("2ba", "4096tok"), ("100tok", "40ba"), ("1ep", "4096tok"), ("8sp", "40ba"),  # refused
    ("2ba", "40ba"), ("1ep", "40ba"), ("2ba", "3ep"), ("100tok", "4096tok"), ("0.1dur", "4096tok"), ("0ba", "4096tok"),
])
def test_warmup_in_another_unit_than_max_duration_is_a_config_error(tmp_path, warmup, max_duration):
    path = write_config(tmp_path / "cfg.yaml", training={"warmup": warmup, "max_duration": max_duration})
    if composer_accepts(warmup, max_duration):
        load_config(path)
    else:
        with pytest.raises(ConfigError, match=r"training\.warmup.*training\.max_duration"):
            load_config(path)


# ----------------------------------------------------------------------------------------------------
# 4. gradient accumulation: a step's loss is the mean over every labelled token of the batch, however it is split


def uneven_batch(kind: str) -> list[dict]:
    """4 examples of 12 tokens whose labelled positions are very unequal (9, 1, 1, 2)."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for labelled in (9, 1, 1, 2):
        ids = torch.randint(4, 60, (12,), generator=g)
        labels = torch.full((12,), IGNORE_INDEX)
        where = torch.randperm(12, generator=g)[:labelled] if kind == "mlm" else torch.arange(labelled)
        labels[where] = torch.randint(4, 60, (labelled,), generator=g)
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def stack(examples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in examples[0]}


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "mlm":
        cfg = dataclasses.replace(BERT_PRESETS["bert-tiny"], vocab_size=64, hidden_size=32, intermediate_size=64,
                                  hidden_dropout=0.0, attention_dropout=0.0)
        return ComposerMLM(build_encoder(cfg, "mlm"), vocab_size=64)
    cfg = dataclasses.replace(PYTHIA_PRESETS["pythia-debug"], vocab_size=64, hidden_size=32, intermediate_size=64)
    return ComposerLM(GPTNeoX(cfg), vocab_size=64)


def one_composer_step(model, examples, microbatch: int):
    dataset = Dataset.from_dict({k: [e[k].tolist() for e in examples] for k in examples[0]})
    loader = make_dataloader(dataset, len(examples), stack, False, True, 0, False, seed=0)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="1ba", device="cpu", progress_bar=False,
                      optimizers=torch.optim.SGD(model.parameters(), lr=1.0), device_train_microbatch_size=microbatch,
                      accumulate_train_batch_on_tokens=True, seed=0, loggers=[], log_to_console=False)
    trainer.fit()
    trainer.close()
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


@pytest.mark.parametrize("kind", ["mlm", "causal_lm"])
def test_microbatching_leaves_the_step_unchanged(trainer_arguments, kind):
    examples = uneven_batch(kind)
    reference = tiny_model(kind)  # plain PyTorch: mean cross-entropy over the labelled tokens of the whole batch
    batch = stack(examples)
    logits = reference.eval_forward(batch)  # (B, T, V): the wrappers' forward returns the loss itself
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= p.grad
    expected = reference.model.state_dict()
    for microbatch in (4, 2, 1):
        got = one_composer_step(tiny_model(kind), examples, microbatch)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=f"{name}, microbatch {microbatch}")
    assert trainer_arguments(training={"microbatch_size": 4})["accumulate_train_batch_on_tokens"] is True


# ----------------------------------------------------------------------------------------------------
# 4. MLM evaluation masks: fixed per example, and no draw from the RNG that training uses


def mlm_collator(**kwargs) -> MLMCollator:
    return MLMCollator(pad_token_id=0, mask_token_id=1, special_ids=(0, 1, 2, 3), vocab_size=100, **kwargs)


def test_mlm_evaluation_masks_are_fixed_per_example_and_training_masks_fresh(trainer_arguments):
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(4, 100, (n,), generator=g).tolist()} for n in (30, 50, 40, 50)]
    evaluation = mlm_collator().for_evaluation()
    rng = torch.get_rng_state()
    first = evaluation(examples)
    again = evaluation(examples)
    assert torch.equal(torch.get_rng_state(), rng)  # evaluation leaves training's random draws alone
    assert all(torch.equal(first[k], again[k]) for k in first)
    # example 2, alone and padded differently, gets the same masks
    alone = evaluation([examples[2]])
    n = len(examples[2]["input_ids"])
    assert torch.equal(alone["labels"][0, :n], first["labels"][2, :n])
    assert torch.equal(alone["input_ids"][0, :n], first["input_ids"][2, :n])
    masked = (first["labels"] != IGNORE_INDEX).sum().item()
    assert 0.05 < masked / sum(len(e["input_ids"]) for e in examples) < 0.3  # about mlm_probability of the tokens
    training = mlm_collator()
    assert not torch.equal(training(examples)["labels"], training(examples)["labels"])
    # run() evaluates with the per-example masks and trains with fresh ones
    kwargs = trainer_arguments(model={"type": "bert", "task": "mlm", "preset": "bert-tiny"})
    assert kwargs["eval_dataloader"].dataloader.collate_fn.per_example
    assert not kwargs["train_dataloader"].dataloader.collate_fn.per_example


# ----------------------------------------------------------------------------------------------------
# 4. speed figures and the finite-loss check


def test_token_counts_leave_out_padding():
    texts = [[2, 5, 6, 3], [2, 7, 3], [2, 8, 9, 10, 11, 3]]
    batch = ClassificationCollator(pad_token_id=0)([{"input_ids": t, "label": i} for i, t in enumerate(texts)])
    assert batch["input_ids"].numel() == 18
    assert count_tokens(batch) == {"total": 13, "loss_generating": 3}  # real tokens; one loss term per example
    lm = CausalLMCollator(pad_token_id=0)([{"input_ids": torch.arange(5, 13)}] * 2)
    assert count_tokens(lm) == {"total": 16, "loss_generating": 14}


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError("the check read a loss tensor (a device sync every microbatch)")


def test_finite_loss_check_reads_the_logged_loss_only():
    monitor = FiniteLossMonitor()
    state = SimpleNamespace(loss=Untouchable(), total_loss_dict={"loss/train/total": 2.5},
                            timestamp=SimpleNamespace(batch=7))
    monitor.batch_end(state, None)
    for bad in (math.nan, math.inf):
        state.total_loss_dict = {"loss/train/total": bad}
        with pytest.raises(TrainingDiverged, match=r"the training loss is (nan|inf) at batch 7;"):
            monitor.batch_end(state, None)


# ----------------------------------------------------------------------------------------------------
# 4. several ranks: the padding DistributedSampler adds to the validation split is scored once


def test_evaluation_on_several_ranks_counts_each_block_once(trainer_arguments):
    for n, world in [(5, 2), (7, 3), (8, 3), (6, 2)]:
        shards = [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
        padding = sum(map(len, shards)) - n
        assert padding == -n % world  # the sampler repeats samples to give every rank as many
        # Composer's evaluation loop (Trainer._eval_loop) drops the last sample of the last batch on the last
        # `padding` ranks, given a DataLoader with a DistributedSampler, drop_last=False and a dataset with a length
        kept = [i for r, shard in enumerate(shards) for i in (shard[:-1] if r >= world - padding else shard)]
        assert sorted(kept) == list(range(n))
    loader = trainer_arguments()["eval_dataloader"].dataloader  # what run() builds meets those conditions
    assert isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler)
    assert loader.drop_last is False and len(loader.sampler.dataset) > 0


# ----------------------------------------------------------------------------------------------------
# 3. DEBUG=1 overfits whatever ran before: no dropout, so the target holds still


def dropout_rates(model) -> list[float]:
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return rates + [m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")]


def test_debug_trains_without_dropout(trainer_arguments):
    encoder = {"type": "bert", "task": "classification", "preset": "bert-tiny"}
    assert max(dropout_rates(trainer_arguments(model=encoder)["model"])) > 0  # a normal run keeps the preset's
    assert set(dropout_rates(trainer_arguments(model=encoder, env={"DEBUG": "1"})["model"])) == {0.0}


# ----------------------------------------------------------------------------------------------------
# 5. the export of a sharded (FSDP) run gathers the full weights on every rank first


def test_export_gathers_full_weights_into_an_unsharded_copy(monkeypatch):
    """FSDP needs GPUs here, so this runs the gather on a plain model: torch's get_model_state_dict returns the full
    weights for both, and rank 0 exports a fresh copy of the same class holding exactly them."""
    from rafale.run import train

    torch.manual_seed(0)
    cfg = dataclasses.replace(PYTHIA_PRESETS["pythia-debug"], vocab_size=64)
    model = GPTNeoX(cfg)
    assert train.full_weights(model, sharded=False) is model
    copy = train.full_weights(model, sharded=True)
    assert type(copy) is GPTNeoX and copy is not model
    for name, tensor in model.state_dict().items():
        assert torch.equal(copy.state_dict()[name], tensor), name
    monkeypatch.setattr(train.dist, "get_global_rank", lambda: 1)
    assert train.full_weights(model, sharded=False) is None and train.full_weights(model, sharded=True) is None
