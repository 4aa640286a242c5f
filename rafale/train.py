"""The training run: a Composer Trainer built from the config.

`run(cfg, ...)` prepares the data, builds the model, then trains (or only evaluates) with Composer: AdamW, a
warmup + cosine/linear/constant schedule, gradient clipping, gradient accumulation, mixed precision on a GPU,
evaluation, checkpoints and autoresume, and the callbacks that report speed, learning rate and time left.
"""

import json
import math
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from composer.utils import dist
from torch.utils.data import DataLoader

from rafale.config import Config, ConfigError, RafaleError, save_config
from rafale.datapipes import PreparedData, cache_root
from rafale.hardware import peak_flops
from rafale.loggers import ConsoleLog, MetricsFile
from rafale.plots import SUMMARY_FILE, best_validation
from rafale.export import EXPORT_DIR, export_model
from rafale.resilience import FiniteLossMonitor, StopOnSignal, check_resume_checkpoint


DEBUG_EPOCHS = 10
DEBUG_STEPS_PER_EPOCH = 10


@dataclass
class RunResult:
    run_dir: Path
    trainer: Trainer
    eval_loss_start: float | None
    eval_loss_end: float | None
    wall_time_s: float
    tokens: int
    export_dir: Path | None = None
    mfu: float | None = None  # model FLOPs utilization over the whole run, against the device's peak


def pick_device(cfg: Config) -> str:
    if cfg.run.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("run.device", "'gpu' was asked for but torch sees no GPU")
    if cfg.run.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.run.device


def pick_precision(cfg: Config, device: str) -> str:
    if device == "cpu" and cfg.training.precision != "fp32":
        print(f"rafale: training.precision {cfg.training.precision} needs a GPU; running fp32 on the CPU")
        return "fp32"
    return cfg.training.precision


def make_dataloader(dataset, batch_size: int, collate_fn, shuffle: bool, drop_last: bool, num_workers: int, pin: bool):
    # the sampler gives each rank its own shard when Composer's launcher runs several processes
    sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
    )


def make_optimizer(model: torch.nn.Module, cfg: Config, device: str):
    """AdamW, whose weight decay is decoupled from the gradient (Loshchilov & Hutter); none on biases and norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    t = cfg.training
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=device == "gpu")


def make_scheduler(cfg: Config, debug: bool):
    t = cfg.training
    if debug:  # a fixed target and a fixed learning rate: the loss should only fall
        return ConstantWithWarmupScheduler(t_warmup="0ba")
    if t.schedule == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=t.warmup, alpha_f=t.lr_final_ratio)
    if t.schedule == "linear":
        return LinearWithWarmupScheduler(t_warmup=t.warmup, alpha_f=t.lr_final_ratio)
    return ConstantWithWarmupScheduler(t_warmup=t.warmup)


def eval_metrics(trainer: Trainer) -> dict[str, float]:
    return {name: float(m.compute()) for name, m in trainer.state.eval_metrics.get("eval", {}).items()}


def eval_loss(trainer: Trainer) -> float | None:
    metrics = eval_metrics(trainer)
    return metrics.get("LanguageCrossEntropy", metrics.get("CrossEntropy", metrics.get("ContrastiveLoss")))


def make_loggers(cfg: Config, run_dir: Path) -> list:
    """The console lines and RUN/metrics.jsonl (and its plots) always; TensorBoard and Weights & Biases when
    run.loggers asks."""
    loggers = [ConsoleLog(cfg.training.log_interval), MetricsFile(run_dir)]
    if "tensorboard" in cfg.run.loggers:
        from composer.loggers import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(run_dir / "tensorboard"), flush_interval=10))
    if "wandb" in cfg.run.loggers:
        from composer.loggers import WandBLogger

        class MetricsOnlyWandBLogger(WandBLogger):
            """Checkpoints live in the run folder: autoresume must not ask W&B for one (that fails offline)."""

            def download_file(self, *args, **kwargs):
                raise FileNotFoundError("rafale keeps checkpoints in the run folder")

        loggers.append(MetricsOnlyWandBLogger(project=cfg.run.wandb_project, name=run_dir.name,
                                              init_kwargs={"dir": str(run_dir)}))
    return loggers


def run(cfg: Config, data: PreparedData, model, collator, debug: bool = False) -> RunResult:
    """Train (or with training.eval_only, evaluate) `model` on `data`, as the config says."""
    t = cfg.training
    device = pick_device(cfg)
    precision = pick_precision(cfg, device)
    world = dist.get_world_size()
    if t.batch_size % world:
        raise ConfigError("training.batch_size", f"({t.batch_size}) must be divisible by the number of processes ({world})")
    per_rank_batch = t.batch_size // world
    if t.microbatch_size == "auto" and device != "gpu":
        raise ConfigError("training.microbatch_size", "'auto' needs a GPU and this run is on the CPU; give a number")
    microbatch = t.microbatch_size if t.microbatch_size is not None else per_rank_batch
    if isinstance(microbatch, int):
        microbatch = min(microbatch, per_rank_batch)

    run_name = cfg.run.name + ("-debug" if debug else "")
    run_dir = Path(cfg.run.output_dir).expanduser() / run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("run.output_dir", f"cannot create the run folder {run_dir}: {err}") from None
    if dist.get_global_rank() == 0:
        save_config(cfg, run_dir / "config.yaml")
        shutil.copyfile(data.path / "tokenizer.json", run_dir / "tokenizer.json")
        (run_dir / "data.json").write_text(json.dumps(data.meta, indent=2))  # to rebuild the model without the data
        if "label_names" in data.meta:  # class id -> name, for whoever reads the predictions
            (run_dir / "labels.json").write_text(json.dumps(data.meta["label_names"]))

    train_set, eval_set = data.splits["train"], data.splits["validation"]
    if len(train_set) < t.batch_size:
        raise RafaleError(
            f"training.batch_size ({t.batch_size}) is larger than the training split ({len(train_set)} blocks "
            f"of data.block_size {cfg.data.block_size}); use a smaller batch or more data"
        )
    if debug:
        # One fixed batch, evaluated on itself. An epoch shows it DEBUG_STEPS_PER_EPOCH times (no shuffling, so
        # every step sees exactly that batch): 10 epochs are enough steps for a healthy model to overfit it.
        eval_set = train_set.select(range(t.batch_size))
        train_set = train_set.select(list(range(t.batch_size)) * DEBUG_STEPS_PER_EPOCH)
    pin = device == "gpu"
    train_loader = make_dataloader(train_set, per_rank_batch, collator, not debug, True, cfg.data.num_workers, pin)
    eval_loader = make_dataloader(eval_set, per_rank_batch, collator, False, False, cfg.data.num_workers, pin)

    save = not debug and not t.eval_only
    stopper = StopOnSignal(save)
    peak = peak_flops(device, precision, cache_root(cfg.data.cache_dir))
    callbacks = [SpeedMonitor(window_size=10, gpu_flops_available=peak), LRMonitor(), RuntimeEstimator(),
                 FiniteLossMonitor(), stopper]
    if device == "gpu":
        callbacks.append(MemoryMonitor())
    callbacks += getattr(model, "callbacks", [])  # the model's own (CLIP: clamp the logit scale after each step)
    loggers = make_loggers(cfg, run_dir) if dist.get_global_rank() == 0 else []
    algorithms = [GradientClipping(clipping_type="norm", clipping_threshold=t.clip_norm)] if t.clip_norm else []
    autoresume = save and cfg.run.autoresume
    if autoresume and dist.get_global_rank() == 0:
        check_resume_checkpoint(run_dir / "checkpoints", cfg.run.resume_fallback)
    # the last evaluation batch is usually short; Composer says so on every evaluation
    warnings.filterwarnings("ignore", message="Cannot split tensor of length")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(No optimizer|is deprecated|`device_train_microbatch_size='auto'`).*")
        trainer = Trainer(
            model=model,
            run_name=run_name,
            train_dataloader=None if t.eval_only else train_loader,
            eval_dataloader=eval_loader,
            max_duration=f"{DEBUG_EPOCHS}ep" if debug else t.max_duration,
            optimizers=make_optimizer(model, cfg, device),
            schedulers=make_scheduler(cfg, debug),
            step_schedulers_every_batch=True,
            algorithms=algorithms,
            callbacks=callbacks,
            loggers=loggers,
            compile_config={} if t.compile else None,
            parallelism_config={"fsdp": t.fsdp} if t.fsdp is not None else None,
            eval_interval="1ep" if debug else t.eval_interval,
            eval_subset_num_batches=-1 if t.eval_batches is None else t.eval_batches,
            device=device,
            precision=precision,
            device_train_microbatch_size=microbatch,
            seed=cfg.run.seed,
            progress_bar=False,  # rafale.loggers.ConsoleLog draws the bar and prints the lines
            log_to_console=False,
            load_path=t.load_path,
            load_weights_only=not t.eval_only and t.load_path is not None,
            save_folder=str(run_dir / "checkpoints") if save else None,
            save_filename="ep{epoch}-ba{batch}-rank{rank}.pt",
            save_interval=t.save_interval,
            save_num_checkpoints_to_keep=t.checkpoints_to_keep,
            autoresume=autoresume,
            python_log_level=None,
        )

    start = time.perf_counter()
    tokens_before = int(trainer.state.timestamp.token)
    loss_start = loss_end = None
    fresh = int(trainer.state.timestamp.batch) == 0
    done = False
    if not fresh and not t.eval_only:
        limit = trainer.state.max_duration
        done = trainer.state.timestamp.get(limit.unit).value >= limit.value
        print(f"rafale: resumed {run_dir} at batch {int(trainer.state.timestamp.batch)}"
              + (f": already complete (training.max_duration {t.max_duration}); evaluating only" if done else ""))
    if t.eval_only or fresh:
        trainer.eval()
        loss_start = eval_loss(trainer)
    if done:  # Composer's fit refuses a run past its max_duration
        trainer.eval()
        loss_end = eval_loss(trainer)
    elif not t.eval_only:
        stopper.install()
        try:
            trainer.fit()  # evaluates at each eval_interval and at the end
        finally:
            stopper.uninstall()
        if stopper.signum is not None:
            where = f"checkpoint saved to {stopper.saved}" if stopper.saved else "no checkpoint saved"
            print(f"rafale: stopped by {signal.Signals(stopper.signum).name} at batch "
                  f"{int(trainer.state.timestamp.batch)}; {where}; run the same command to resume", file=sys.stderr)
            trainer.close()
            sys.exit(128 + stopper.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        loss_end = eval_loss(trainer)
    wall = time.perf_counter() - start
    tokens = int(trainer.state.timestamp.token) - tokens_before
    export_dir = None
    if save and dist.get_global_rank() == 0:
        export_dir = export_model(model.model, run_dir / EXPORT_DIR, data)
    mfu = None
    if tokens and peak and hasattr(model.model, "flops_per_token"):
        mfu = tokens / wall * model.model.flops_per_token(cfg.data.block_size) / (peak * world)
    return RunResult(run_dir, trainer, loss_start, loss_end, wall, tokens, export_dir, mfu)


def describe(result: RunResult, num_params: int) -> str:
    """The end-of-run summary."""
    lines = [f"run folder: {result.run_dir}", f"parameters: {num_params:,}"]
    if result.tokens:
        mfu = f", MFU {result.mfu:.1%}" if result.mfu is not None else ""
        lines.append(f"tokens trained: {result.tokens:,} in {result.wall_time_s:.1f} s "
                     f"({result.tokens / result.wall_time_s:,.0f} tokens/s including evaluation{mfu})")
    if result.export_dir is not None:
        lines.append(f"checkpoints: {result.run_dir / 'checkpoints'}; Hugging Face export: {result.export_dir}")
    metrics = eval_metrics(result.trainer)
    for label, loss in (("start", result.eval_loss_start), ("end", result.eval_loss_end)):
        if loss is not None:
            perplexity = f" (perplexity {math.exp(min(loss, 50)):.2f})" if "LanguagePerplexity" in metrics else ""
            lines.append(f"validation loss at {label}: {loss:.4f}{perplexity}")
    others = {k: v for k, v in metrics.items() if "CrossEntropy" not in k and "Perplexity" not in k}
    if others:
        lines.append("validation " + ", ".join(f"{k}: {v:.4f}" for k, v in others.items()))
    best = best_validation(result.run_dir)
    if best is not None:
        name, value, step = best
        lines.append(f"best validation {name}: {value:.4f} at step {step}; curves: {result.run_dir / 'metrics.png'}")
    return "\n".join("rafale: " + line for line in lines)



def write_summary(result: RunResult, cfg: Config, num_params: int) -> Path:
    """RUN/summary.json: what `rafale runs` tabulates (model, size, tokens, time, final validation metrics)."""
    summary = {
        "name": result.run_dir.name,
        "model": cfg.model.type + (f" {cfg.model.preset}" if cfg.model.preset else ""),
        "task": cfg.model.task,
        "parameters": num_params,
        "tokens": result.tokens,
        "wall_time_s": round(result.wall_time_s, 2),
        "tokens_per_s": round(result.tokens / result.wall_time_s, 1) if result.tokens else None,
        "mfu": result.mfu,
        "validation": eval_metrics(result.trainer),
        "validation_loss_start": result.eval_loss_start,
    }
    path = result.run_dir / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return path

