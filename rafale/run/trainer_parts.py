"""What a run's Trainer is built from; rafale.run.train.build_trainer puts them together.

Where it computes (`place`: the device, Composer's precision or the model's own bf16 autocast on a CPU, the batch
sizes), its data loaders (`make_loaders`, and DEBUG=1's one fixed batch), the learning-rate schedule
(`make_scheduler`, applied as each batch starts by `ScheduleAtBatchStart`), when it saves (`save_schedule`), its
callbacks and its loggers.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from composer import DataSpec
from composer.callbacks import MemoryMonitor
from composer.core import Callback, State, Time
from composer.loggers import Logger
from composer.optim import (
    ConstantScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from composer.utils import dist
from torch.utils.data import DataLoader

from rafale.config import Config
from rafale.data.cache import PreparedData
from rafale.errors import IGNORE_INDEX, ConfigError, RafaleError
from rafale.run.loggers import CheckedSpeedMonitor, ConsoleLog, LearningRates, MetricsFile
from rafale.run.optim import WarmupStableDecay, is_schedule_free, schedule_free_switch, whole_time, wsd_batches
from rafale.run.resilience import FiniteLossMonitor, StopOnSignal

DEBUG_EPOCHS = 10
DEBUG_STEPS_PER_EPOCH = 10


# ----------------------------------------------------------------------------------------------------
# where the run computes


@dataclass
class Placement:
    """Where and how the run computes: the device, Composer's precision, the model's own autocast, the batches."""
    device: str
    precision: str
    autocast_dtype: torch.dtype | None
    world: int
    per_rank_batch: int
    microbatch: int | str


def place(cfg: Config, model) -> Placement:
    """Device, precision and batch sizes for `model`, checked before anything is written; sets the wrapper's
    autocast (see pick_precision)."""
    t = cfg.training
    device = pick_device(cfg)
    precision, autocast_dtype = pick_precision(cfg, device, model)
    if hasattr(model, "autocast_dtype"):
        model.autocast_dtype = autocast_dtype
    world = dist.get_world_size()
    if t.batch_size % world:
        raise ConfigError("training.batch_size", f"({t.batch_size}) must be divisible by the number of processes ({world})")
    per_rank_batch = t.batch_size // world
    if t.microbatch_size == "auto" and device != "gpu":
        raise ConfigError("training.microbatch_size", "'auto' needs a GPU and this run is on the CPU; give a number")
    microbatch = t.microbatch_size if t.microbatch_size is not None else per_rank_batch
    if isinstance(microbatch, int):
        microbatch = min(microbatch, per_rank_batch)
    return Placement(device, precision, autocast_dtype, world, per_rank_batch, microbatch)


def pick_device(cfg: Config) -> str:
    if cfg.run.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("run.device", "'gpu' was asked for but torch sees no GPU")
    if cfg.run.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.run.device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and
    slower than fp32."""
    cpu = getattr(torch._C, "_cpu", None)  # torch's own CPU feature probe (private, hence the care)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def pick_precision(cfg: Config, device: str, model=None) -> tuple[str, torch.dtype | None]:
    """(Composer's precision, the dtype the model wrapper autocasts itself to or None).

    Composer refuses amp_bf16 on a CPU, so there a wrapper that can autocast itself (the autocast_dtype of
    ComposerLM and the encoders' wrappers) runs its forward under torch.autocast("cpu", bfloat16) while Composer
    stays fp32, on a CPU with bf16 matmul units; anything else on a CPU runs fp32, said once.
    """
    precision = cfg.training.precision
    if device != "cpu" or precision == "fp32":
        return precision, None
    if precision == "amp_bf16" and cpu_has_fast_bf16() and hasattr(model, "autocast_dtype"):
        return "fp32", torch.bfloat16
    if precision == "amp_bf16" and hasattr(model, "autocast_dtype"):
        why = "needs a GPU or a CPU with bf16 matrix units (AVX512-BF16 or AMX), which this one lacks"
    else:
        why = "needs a GPU for this model" if precision == "amp_bf16" else "needs a GPU"
    print(f"rafale: training.precision {precision} {why}; running fp32 on the CPU")
    return "fp32", None


def precision_label(precision: str, autocast_dtype) -> str:
    return "amp_bf16 (the model's own bf16 autocast on the CPU)" if autocast_dtype is not None else precision


# ----------------------------------------------------------------------------------------------------
# the data loaders


def make_loaders(cfg: Config, data: PreparedData, collator, placement: Placement, debug: bool):
    """(train, validation) DataLoaders; under DEBUG, one fixed batch for both."""
    t = cfg.training
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
    pin, batch, workers, seed = placement.device == "gpu", placement.per_rank_batch, cfg.data.num_workers, cfg.run.seed
    # MLM: evaluation masks are drawn from each example, so every evaluation scores the same masks
    eval_collator = collator.for_evaluation() if hasattr(collator, "for_evaluation") else collator
    return (make_dataloader(train_set, batch, collator, not debug, True, workers, pin, seed=seed),
            make_dataloader(eval_set, batch, eval_collator, False, False, workers, pin, seed=seed))


def make_dataloader(dataset, batch_size: int, collate_fn, shuffle: bool, drop_last: bool, num_workers: int, pin: bool,
                    *, seed: int) -> DataSpec:
    # the sampler gives each rank its own shard when Composer's launcher runs several processes; its order
    # follows run.seed (and the epoch, which Composer sets)
    sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
    )
    return DataSpec(loader, get_num_tokens_in_batch=count_tokens)


def count_tokens(batch: dict) -> dict[str, int]:
    """Composer's token counts of a batch. 'total' leaves out padding (tokens/s, max_duration in tok);
    'loss_generating' is what the loss is a mean over (labelled tokens for LM and MLM, examples for classification,
    image-text pairs for CLIP and SigLIP), so that gradient accumulation and DDP weigh each of them equally
    (accumulate_train_batch_on_tokens)."""
    input_ids, labels = batch["input_ids"], batch.get("labels")
    mask = batch.get("attention_mask")
    total = int(mask.sum()) if mask is not None else input_ids.numel()
    if labels is None:  # contrastive pairs (a caption each)
        return {"total": total, "loss_generating": len(input_ids)}
    per_token = labels.shape == input_ids.shape
    return {"total": total, "loss_generating": int((labels != IGNORE_INDEX).sum()) if per_token else len(labels)}


# ----------------------------------------------------------------------------------------------------
# the schedule: the learning rate's and the checkpoints'


def make_scheduler(cfg: Config, debug: bool, batches_per_epoch: int | None = None, schedule_free: bool | None = None):
    """The learning-rate schedule, a Composer scheduler (ScheduleAtBatchStart applies it). batches_per_epoch: for
    wsd, whose phases are counted in batches; schedule_free: whether the optimizer is (None: ask rafale.run.optim)."""
    t = cfg.training
    if debug:  # a fixed target and a fixed learning rate: the loss should only fall
        return ConstantWithWarmupScheduler(t_warmup="0ba")
    if is_schedule_free(t) if schedule_free is None else schedule_free:  # it warms up itself and needs no decay: a second schedule would distort it
        return ConstantScheduler()
    # no warmup fits any max_duration unit (Composer would refuse 0ba against a max_duration in tok); in a run (which
    # knows batches_per_epoch) a fraction of it becomes whole batches here, exactly (Composer's int() of a float
    # product floors 28.999...)
    warmup = "0dur" if Time.from_timestring(t.warmup).value == 0 else t.warmup
    if warmup != "0dur" and batches_per_epoch is not None:
        warmup = whole_time(warmup, t.max_duration, batches_per_epoch)
    if t.schedule == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=warmup, alpha_f=t.lr_final_ratio)
    if t.schedule == "linear":
        return LinearWithWarmupScheduler(t_warmup=warmup, alpha_f=t.lr_final_ratio)
    if t.schedule == "wsd":
        return WarmupStableDecay(*wsd_batches(t, batches_per_epoch, cfg.data.block_size), shape=t.decay_shape)
    return ConstantWithWarmupScheduler(t_warmup=warmup)


class ScheduleAtBatchStart(Callback):
    """Sets each batch's learning rate when the batch starts: group lr = its initial lr x schedule(this batch).

    Composer steps its schedulers after a batch but before its clock moves past that batch, so handed the schedule
    itself it would run batch i at the value for batch i - 1 (two batches at lr 0 after a warmup from 0, and the
    last batch one step short of the end). Evaluated here, batch i gets schedule(i), as the formula, Hugging Face's
    schedulers and a plain PyTorch loop give it. The scheduler is Composer's own and stateless; each group's
    `initial_lr` (torch's name for it) is saved with the optimizer, so a resumed run continues the same curve."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def fit_start(self, state: State, logger: Logger) -> None:
        for optimizer in state.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])

    def batch_start(self, state: State, logger: Logger) -> None:
        factor = self.scheduler(state)
        for optimizer in state.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor


def save_schedule(cfg: Config, batches_per_epoch: int):
    """training.save_interval, and with training.cooldowns also each batch a cooldown branches at (rafale.run.branch)."""
    interval = whole_time(cfg.training.save_interval, cfg.training.max_duration, batches_per_epoch)
    if not cfg.training.cooldowns:
        return interval
    from composer.core import Event
    from composer.utils import create_interval_scheduler

    from rafale.run.branch import branch_points

    every, points = create_interval_scheduler(interval), set(branch_points(cfg, batches_per_epoch))

    def save_now(state: State, event) -> bool:
        at_point = event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) in points
        return every(state, event) or at_point

    return save_now


# ----------------------------------------------------------------------------------------------------
# callbacks and loggers


def make_callbacks(device: str, peak: float | None, stopper: StopOnSignal, schedule: ScheduleAtBatchStart,
                   cache_dir: Path | None = None) -> list:
    """The learning-rate schedule, speed (with MFU against `peak`, probed again if the run outruns it; the new peak
    goes to `cache_dir`'s cpu_peak.json), the learning rates each batch applied, NaN losses, signals,
    schedule-free's modes. (The console's time left is rafale.run.loggers.RecentPace's, from the recent batches.)"""
    callbacks = [schedule, CheckedSpeedMonitor(10, peak, device, cache_dir), LearningRates(),
                 FiniteLossMonitor(), stopper, schedule_free_switch()]
    if device == "gpu":
        callbacks.append(MemoryMonitor())
    return callbacks


def make_loggers(cfg: Config, run_dir: Path) -> list:
    """The console lines and RUN/metrics.jsonl (and its plots) always; TensorBoard and Weights & Biases when
    run.loggers asks."""
    loggers = [ConsoleLog(cfg.training.log_interval), MetricsFile(run_dir)]
    if "tensorboard" in cfg.run.loggers:
        from composer.loggers import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(run_dir / "tensorboard"), flush_interval=10))
    if "wandb" in cfg.run.loggers:
        from composer.loggers import WandBLogger

        loggers.append(WandBLogger(project=cfg.run.wandb_project, name=run_dir.name, init_kwargs={"dir": str(run_dir)}))
    return loggers
