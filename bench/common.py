"""Shared helpers for bench/bench.py and bench/gpu_bench.py: models with the same weights on both sides,
random token batches, a Composer step timer, the Trainer `rafale -c` builds, a plain PyTorch training loop, the
matmul peak probe."""

import copy
import os
import shutil
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from composer.core import Callback

from rafale.data.cache import cache_root
from rafale.run.hardware import cached_cpu_peaks, cpu_model, cpu_peak_flops, cpu_peak_key, measure_cpu_peak  # noqa: F401
from rafale.models.pythia import PRESETS as PYTHIA_PRESETS
from rafale.errors import IGNORE_INDEX
from rafale.models.composer import ComposerLM
from rafale.models.decoder import GPTNeoX
from rafale.models.pythia import config_to_hf as decoder_config_to_hf

warnings.filterwarnings("ignore")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def seconds(fn) -> float:
    """Wall seconds of one call of fn()."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decoder_cfg(preset: str, vocab_size=None, max_len=None):
    cfg = copy.deepcopy(PYTHIA_PRESETS[preset])
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    if max_len is not None:
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, max_len)
    return cfg


def make_rafale(cfg, seed=0, init_std=None):
    torch.manual_seed(seed)
    cfg = copy.deepcopy(cfg)
    if init_std is not None:
        cfg.init_std = init_std
    return GPTNeoX(cfg)


def hf_from_rafale(model: GPTNeoX, attn_implementation="sdpa"):
    """transformers.GPTNeoXForCausalLM with the same config and weights (a state-dict copy)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_cfg = GPTNeoXConfig(**decoder_config_to_hf(model.cfg, vocab_size=model.cfg.vocab_size))
    hf = GPTNeoXForCausalLM._from_config(hf_cfg, attn_implementation=attn_implementation)
    from rafale.models.pythia import PYTHIA

    # the export's own name map (the file calls the head embed_out, transformers' module lm_head)
    tensors = PYTHIA.hf.tensors(model, "GPTNeoXForCausalLM", model.cfg.vocab_size)
    state = {"lm_head.weight" if name == "embed_out.weight" else name: t for name, t in tensors.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def random_blocks(n, T, vocab, seed=0):
    """A list of dicts shaped like rafale.data.causal_lm.CausalLMCollator's output rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, T), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def loader(blocks, batch_size):
    return torch.utils.data.DataLoader(blocks, batch_size=batch_size, shuffle=False, drop_last=True)


class StepTimer(Callback):
    """Time of each Trainer batch, batch_start to the next batch_start (dataloader, step, events, callbacks)."""

    def __init__(self):
        self.starts, self.last_end = [], None

    def batch_start(self, state, logger):
        self.starts.append(time.perf_counter())

    def batch_end(self, state, logger):
        self.last_end = time.perf_counter()

    def step_times(self):
        times = [b - a for a, b in zip(self.starts, self.starts[1:])]
        if self.last_end is not None and self.starts:
            times.append(self.last_end - self.starts[-1])
        return times


def adamw(model, device_is_gpu=False, fused=None):
    """The plain loops' AdamW: torch's default (fused on a GPU only), or fused as rafale's own when fused=True."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device_is_gpu if fused is None else fused)


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "test" / "pythia_tinystories.yaml"


def train_rafale(lm: ComposerLM, blocks, batch_size, steps, workdir, precision=None):
    """What `rafale -c` runs: the default config (test/pythia_tinystories.yaml) with this batch, block length and
    number of steps, and the Trainer rafale.run.train builds for it (loaders, collator, optimizer, schedule, clipping,
    callbacks, metrics file, final checkpoint). precision None keeps the config's (amp_bf16: on a CPU, the
    model's own bf16 autocast where the CPU has bf16 units). The optimizer is rafale's AdamW (the default job's
    Muon is a recipe choice, measured by bench/time_to_target.py; step times compare like with like). Returns
    (step times, what precision ran)."""
    from datasets import Dataset

    from rafale.config import load_config
    from rafale.data.causal_lm import CausalLMCollator
    from rafale.run.train import build_trainer
    from rafale.run.trainer_parts import place, precision_label

    T = len(blocks[0]["input_ids"])
    cfg = load_config(DEFAULT_CONFIG)
    cfg.run.output_dir, cfg.run.autoresume = str(workdir), False
    cfg.data.block_size = T
    cfg.training.batch_size, cfg.training.max_duration = batch_size, f"{steps}ba"
    cfg.training.eval_interval = cfg.training.save_interval = f"{steps}ba"  # both after the timed steps
    cfg.training.eval_batches = 1
    cfg.training.optimizer = {"name": "adamw"}
    if precision is not None:
        cfg.training.precision = precision
    split = Dataset.from_dict({"input_ids": [b["input_ids"].tolist() for b in blocks]}).with_format("torch")
    data = SimpleNamespace(splits={"train": split, "validation": split.select(range(batch_size))})
    placement = place(cfg, lm)
    run_dir = Path(workdir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer, _, _ = build_trainer(cfg, data, lm, CausalLMCollator(pad_token_id=0), placement, run_dir, cfg.run.name)
    timer = StepTimer()
    trainer.state.callbacks.append(timer)
    trainer.fit()
    trainer.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return timer.step_times(), precision_label(placement.precision, placement.autocast_dtype)


def train_plain(model, blocks, batch_size, steps, kind="rafale", device="cpu", autocast_dtype=None, step_ctx=None,
                clip_norm=None):
    """A plain PyTorch AdamW loop. kind 'rafale': ComposerLM forward + loss; 'hf': HF forward, same loss.
    autocast_dtype: bf16 autocast on the CPU; rafale's wrapper is given it, as `rafale -c` gives it (an outer
    autocast would not reach inside: the wrapper's own torch.autocast(enabled=False) switches it off there).
    clip_norm: clip the gradient norm before each step, as `rafale -c` does at training.clip_norm."""
    lm = ComposerLM(model, autocast_dtype=autocast_dtype if device == "cpu" else None) if kind == "rafale" else model
    lm.to(device).train()
    opt = adamw(lm, device == "cuda", fused=True if kind == "rafale" else None)  # rafale's plain loop: its optimizer
    times = []
    it = iter(loader(blocks, batch_size))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        ctx = torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype else _null()
        with ctx, (step_ctx() if step_ctx else _null()):
            if kind == "rafale":
                loss = lm.loss(lm(batch), batch)
            else:
                logits = lm(input_ids=batch["input_ids"]).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(lm.parameters(), clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def nproc():
    try:
        return int(subprocess.check_output(["nproc", "--all"]).strip())
    except Exception:
        return os.cpu_count()


def matmul_peak(threads, n=2048, repeats=10, cache=True, reprobe=False, dtype=torch.float32):
    """(`dtype` matmul FLOP/s at `threads`, whether it came from the cache): rafale's own probe (rafale.run.hardware),
    cached in the rafale cache folder's cpu_peak.json, or measured afresh with cache=False."""
    torch.set_num_threads(threads)
    if not cache:
        return measure_cpu_peak(n, repeats, dtype=dtype), False
    known = not reprobe and isinstance(cached_cpu_peaks(cache_root()).get(cpu_peak_key(dtype)), float)
    return cpu_peak_flops(cache_root(), reprobe=reprobe, dtype=dtype), known
