"""The training run: a Composer Trainer built from the config.

`train(cfg, model_cfg)` is what `rafale -c` does once the config is loaded: prepare the data, build the model,
`run` it, report. `run` is a few named steps: check the run folder (restart, the resume guard, a run already
complete), write its files, the Trainer (`build_trainer`: loaders, optimizer, schedule, clipping, callbacks,
loggers, checkpoints and the resume), fit, and the Hugging Face export. The run folder's checks and files are
rafale.run_folder's; what it records of the run (summary.json over every segment, metrics.jsonl, an evaluation's
own folder) is rafale.record's; keep_best and early stopping are rafale.outcomes'.
"""

import signal
import sys
import time
import warnings
from dataclasses import dataclass, fields
from dataclasses import replace as dataclass_replace
from pathlib import Path

import torch
from composer import DataSpec, Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import MemoryMonitor
from composer.optim import (
    ConstantScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from composer.core import Callback, State, Time
from composer.loggers import Logger
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader

from rafale.config import Config, pretrained_folder
from rafale.data import DATAPIPES
from rafale.data.cache import DataPipe, PreparedData, cache_root, describe_vocabulary, print_data_summary
from rafale.errors import IGNORE_INDEX, ConfigError, DataError, RafaleError, WeightsError
from rafale.hardware import confirm_peak, keep_freed_memory, peak_flops
from rafale.resolve import family_of, head_of
from rafale.loggers import CheckedSpeedMonitor, ConsoleLog, LearningRates, MetricsFile, eval_subset_batches
from rafale.models.hf import export_refusal
from rafale.optim import (WarmupStableDecay, batches_in, build_optimizer, is_schedule_free, schedule_free_switch,
                          wsd_batches)
from rafale.outcomes import outcome, outcome_callbacks, resume_outcome
from rafale.run_folder import (BEST_DIR, EXPORT_DIR, ResumeConflict, check_run_folder, eval_folder,
                               evaluation_conflicts, export_model, set_run_folder_aside, write_run_folder)
from rafale.record import (RunClock, RunRecord, compact_metrics, describe, non_embedding_parameters, validation_loss,
                           write_eval_record)
from rafale.resilience import (FiniteLossMonitor, StopOnSignal, check_checkpoint_safe, check_shared_run_folder,
                               decided_on_rank_zero, prune_checkpoints, resume_checkpoint)


DEBUG_EPOCHS = 10
DEBUG_STEPS_PER_EPOCH = 10
DROPOUT_FIELDS = ("hidden_dropout", "attention_dropout", "classifier_dropout")


def without_dropout(model_cfg):
    """The model config for DEBUG=1: no dropout, so the target holds still (as the MLM masks do). With dropout, a
    near-memorized batch sees Adam's steps blow up on a noisy gradient: the loss jumps back to chance or above
    for a step (measured on bert-tiny classification), and a jump in the last steps fails the check."""
    present = {f.name for f in fields(model_cfg)} & set(DROPOUT_FIELDS)
    return dataclass_replace(model_cfg, **{name: 0.0 for name in present})


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


def make_scheduler(cfg: Config, debug: bool, batches_per_epoch: int | None = None, schedule_free: bool | None = None):
    """The learning-rate schedule, a Composer scheduler (ScheduleAtBatchStart applies it). batches_per_epoch: for
    wsd, whose phases are counted in batches; schedule_free: whether the optimizer is (None: ask rafale.optim)."""
    t = cfg.training
    if debug:  # a fixed target and a fixed learning rate: the loss should only fall
        return ConstantWithWarmupScheduler(t_warmup="0ba")
    if is_schedule_free(t) if schedule_free is None else schedule_free:  # it warms up itself and needs no decay: a second schedule would distort it
        return ConstantScheduler()
    # no warmup fits any max_duration unit (Composer would refuse 0ba against a max_duration in tok)
    warmup = "0dur" if Time.from_timestring(t.warmup).value == 0 else t.warmup
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


def run(cfg: Config, data: PreparedData, model, collator, debug: bool = False,
        started: float | None = None) -> tuple[dict, Path]:
    """Train (or with training.eval_only, evaluate) `model` on `data`, as the config says: the run folder, the
    Trainer (loaders, optimizer, callbacks), fit, and the Hugging Face export. Returns (the run's summary, the
    folder it is in). `started`: when the command started (time.perf_counter()), for the start-up time."""
    started = time.perf_counter() if started is None else started
    keep_freed_memory()  # no page faults for each step's activations (rafale.hardware)
    placement = place(cfg, model)
    if cfg.training.eval_only:
        return evaluate_checkpoint(cfg, data, model, collator, placement, started)
    run_name = cfg.run.name + ("-debug" if debug else "")
    save = not debug
    run_dir = Path(cfg.run.output_dir).expanduser() / run_name
    if cfg.run.restart and dist.get_global_rank() == 0:
        set_run_folder_aside(run_dir)
    if dist.get_world_size() > 1:
        check_shared_run_folder(run_dir)
    if cfg.training.branch_from is not None and save:
        from rafale.branch import start_branch

        # rank 0 checks the parent and writes the branch's folder; every process gets its word (or its refusal)
        # only once that is done, so none looks for the branch's checkpoint before rank 0 has copied it
        batches_per_epoch = len(data.splits["train"]) // cfg.training.batch_size
        decided_on_rank_zero(lambda: start_branch(cfg, data, model.model.cfg, run_dir, batches_per_epoch))
    # rank 0 reads the folder and every process acts on what it read: they all resume, or all stop
    changes, complete = decided_on_rank_zero(lambda: check_run_folder(cfg, data, model, run_dir, save))
    if complete is not None:  # a re-run of a finished run: nothing to train, and its record stays as it is
        unapplied = f"; not applied, since nothing is left to train: {', '.join(changes)}" if changes else ""
        print(f"rafale: {run_dir} at batch {complete['batches']}: already complete (training.max_duration "
              f"{cfg.training.max_duration}); nothing was run and its record is unchanged{unapplied}")
        return complete, run_dir
    write_run_folder(cfg, data, model, run_dir)
    clock = RunClock()
    trainer, stopper, peak = build_trainer(cfg, data, model, collator, placement, run_dir, run_name, debug, clock)
    record = RunRecord(run_dir, cfg, sum(p.numel() for p in model.parameters()), clock, started,
                       writes=dist.get_global_rank() == 0, mfu=mfu_of(model, cfg, placement, peak),
                       precision=precision_label(placement.precision, placement.autocast_dtype), changes=changes)
    record.outcome = lambda: outcome(trainer, cfg)
    if save and dist.get_global_rank() == 0:  # the process that saves (and moves the latest symlink) prunes
        clock.on_save.append(lambda *_: prune_checkpoints(run_dir / "checkpoints", cfg.training.checkpoints_to_keep))
    record.non_embedding_params = non_embedding_parameters(model.model)
    flops_per_token = getattr(model, "flops_per_token", None)  # the wrapper's: it knows the rows the loss uses
    record.flops_per_token = flops_per_token(cfg.data.block_size) if flops_per_token is not None else None
    record.begin(trainer.state)
    resume_outcome(trainer, record.previous, run_dir, cfg.training.eval_interval)
    fit(trainer, stopper, cfg, run_dir, record)
    record.export_dir = export_run(model.model, run_dir, data, sharded=cfg.training.fsdp is not None) if save else None
    trainer.close()  # flushes the metrics file
    if dist.get_global_rank() == 0:
        compact_metrics(run_dir)
    summary = record.save(trainer.state, "complete")
    if summary.get("best"):
        best = summary["best"]
        where = f"; exported to {best['export']}" if best["export"] else " (no export: see above)"
        print(f"rafale: best {best['metric']}: {best['value']:.4f} at step {best['step']}{where}")
    if summary.get("early_stopped"):
        stop = summary["early_stopped"]
        print(f"rafale: stopped early at batch {stop['at_batch']}: {stop['metric']} had not improved on its best "
              f"({stop['best']:.4f} at step {stop['best_step']}) for {stop['patience']}")
    return summary, run_dir


def mfu_of(model, cfg: Config, placement: "Placement", peak: float | None):
    """tokens/s over the run -> model FLOPs utilization against the device's peak, or None without a peak or a FLOPs
    count. A run that measures above the cached peak has the CPU probed again (rafale.hardware.confirm_peak): an
    MFU above 100% is a wrong peak, and is never reported."""
    flops_per_token = getattr(model, "flops_per_token", None)
    if not peak or flops_per_token is None:
        return None

    def mfu(tokens_per_s: float) -> float | None:
        achieved = tokens_per_s * flops_per_token(cfg.data.block_size) / placement.world  # per device
        confirmed = confirm_peak(achieved, placement.device, placement.precision, cache_root(cfg.data.cache_dir),
                                 placement.autocast_dtype)
        return achieved / confirmed if confirmed else None

    return mfu


def fit(trainer: Trainer, stopper: StopOnSignal, cfg: Config, run_dir: Path, record: RunRecord) -> None:
    """Train to max_duration, resuming where the checkpoints left off (a fresh run is evaluated first). A SIGINT or
    SIGTERM saves a checkpoint and the record, and exits with the shell's code; a failure is recorded too."""
    state, fresh = trainer.state, record.start_batch == 0
    done = state.timestamp.get(state.max_duration.unit).value >= state.max_duration.value
    if not fresh:
        print(f"rafale: resumed {run_dir} at batch {record.start_batch}"
              + (": already trained to training.max_duration; evaluating only" if done else ""))
        for key, (was, now) in record.changes.items():
            print(f"rafale:   {key}: {was} -> {now}, from batch {record.start_batch}")
    if fresh or done:
        trainer.eval()
    if done:  # Composer's fit refuses a run past its max_duration
        return
    stopper.install()
    try:
        trainer.fit()  # evaluates at each eval_interval and at the end
    except Exception as err:
        record.save(state, "failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        stopper.uninstall()
    if stopper.signum is not None:
        if dist.get_world_size() > 1:  # until this process has exited: Composer's launcher sends SIGTERM to the
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ranks still running once one has exited 143
        name = signal.Signals(stopper.signum).name
        trainer.close()
        if dist.get_global_rank() == 0:
            compact_metrics(run_dir)
        record.save(state, "stopped", stopped_by=name)
        if stopper.saved:
            where = f"checkpoint saved to {stopper.saved}"
        else:
            where = "rank 0 saved the checkpoint" if stopper.save and dist.get_global_rank() else "no checkpoint saved"
        print(f"rafale: stopped by {name} at batch {int(state.timestamp.batch)}; {where}; run the same command "
              "to resume", file=sys.stderr)
        if dist.get_world_size() > 1:
            dist.barrier()  # no rank exits before rank 0 has saved the record
        sys.exit(128 + stopper.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def evaluate_checkpoint(cfg: Config, data: PreparedData, model, collator, placement: "Placement",
                        started: float) -> tuple[dict, Path]:
    """training.eval_only: evaluate training.load_path on the validation split, with a record of its own in
    RUN/evals/<time>/ (config.yaml, summary.json, metrics.jsonl): a training run's own files are never touched.
    The checkpoint is scored with the tokenizer and model it was trained with, or not at all
    (rafale.record.evaluation_conflicts). Rank 0 checks and names the folder, and every process gets its word."""
    if dist.get_world_size() > 1:
        dist.initialize_dist("gpu" if torch.cuda.is_available() else "cpu")
    checkpoint = Path(cfg.training.load_path).expanduser()
    folder = decided_on_rank_zero(lambda: evaluation_folder(cfg, checkpoint, data, model))
    clock = RunClock()
    trainer, _, _ = build_trainer(cfg, data, model, collator, placement, folder, cfg.run.name, clock=clock)
    trainer.eval()
    trainer.close()
    summary = write_eval_record(folder, cfg, trainer.state, clock, started, sum(p.numel() for p in model.parameters()),
                                writes=dist.get_global_rank() == 0)
    print(f"rafale: evaluated {cfg.training.load_path} (batch {summary['batches']}); its record: {folder}")
    return summary, folder


def evaluation_folder(cfg: Config, checkpoint: Path, data: PreparedData, model) -> Path:
    """The new RUN/evals/<time>/ folder of an evaluation of `checkpoint`, once it is checked (a ResumeConflict
    naming what it was not trained with)."""
    conflicts = evaluation_conflicts(checkpoint, cfg, data, model.model.cfg)
    if conflicts:
        raise ResumeConflict(f"training.eval_only: cannot evaluate {checkpoint} with other inputs than it was "
                             f"trained with: {'; '.join(conflicts)}")
    folder = eval_folder(Path(cfg.run.output_dir).expanduser() / cfg.run.name)
    try:
        folder.mkdir(parents=True)
    except OSError as err:
        raise ConfigError("run.output_dir", f"cannot create the evaluation's folder {folder}: {err}") from None
    return folder


def full_weights(module: torch.nn.Module, sharded: bool) -> torch.nn.Module | None:
    """The model to export, on rank 0 (None elsewhere). Under FSDP each rank holds a shard, and gathering the full
    weights is a collective: every rank must call it (rank 0 alone would wait for the others forever). Rank 0 then
    gets an unsharded copy of the same class holding them."""
    if not sharded:
        return module if dist.get_global_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_global_rank() != 0:
        return None
    copy = type(module)(module.cfg)
    copy.load_state_dict(state, strict=True)
    return copy


def export_run(module: torch.nn.Module, run_dir: Path, data: PreparedData, sharded: bool = False,
               folder: str = EXPORT_DIR) -> Path | None:
    """RUN/export in Hugging Face format; after hours of training a failed export must not fail the run: the
    checkpoints are already safe, so say why there is none and where they are."""
    module = full_weights(module, sharded)
    if module is None:
        return None
    try:
        return export_model(module, run_dir / folder, data)
    except WeightsError as err:
        print(f"rafale: no Hugging Face export: {err}; the checkpoints are in {run_dir / 'checkpoints'}")
        return None


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


def build_trainer(cfg: Config, data: PreparedData, model, collator, placement: Placement, run_dir: Path,
                  run_name: str, debug: bool = False,
                  clock: RunClock | None = None) -> tuple[Trainer, StopOnSignal, float | None]:
    """The Trainer `rafale -c` runs (loaders, optimizer, schedule, clipping, callbacks, loggers, checkpoints), its
    signal handler, and the device's peak FLOP/s. bench/ builds its Trainer here too, so it times the real thing.
    `clock` times the run for its record (rafale.record.RunClock); the metrics go to run_dir/metrics.jsonl."""
    t = cfg.training
    train_loader, eval_loader = make_loaders(cfg, data, collator, placement, debug)
    save = not debug and not t.eval_only
    stopper = StopOnSignal(save)
    peak = peak_flops(placement.device, placement.precision, cache_root(cfg.data.cache_dir), placement.autocast_dtype)
    resume_from = resume_checkpoint(cfg, run_dir) if save and cfg.run.autoresume else None
    if t.load_path is not None:  # Composer unpickles it
        check_checkpoint_safe(Path(t.load_path).expanduser(), "training.load_path", t.trust_checkpoint)
    batches_per_epoch, schedule_free = len(train_loader.dataloader), is_schedule_free(t)
    warmup_steps = 0  # schedule-free warms up itself, counting batches
    if schedule_free and not debug:
        warmup_steps = batches_in(t.warmup, t.max_duration, batches_per_epoch, t.batch_size, cfg.data.block_size)
    optimizer = build_optimizer(model, t, placement.device, warmup_steps)
    schedule = ScheduleAtBatchStart(make_scheduler(cfg, debug, batches_per_epoch, schedule_free))
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
            optimizers=optimizer,
            algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=t.clip_norm)] if t.clip_norm else [],
            callbacks=(make_callbacks(placement.device, peak, stopper, schedule, cache_root(cfg.data.cache_dir))
                       + [clock or RunClock()] + getattr(model, "callbacks", [])
                       + ([] if debug or t.eval_only else outcome_callbacks(cfg, model, best_exporter(cfg, model, run_dir, data)))),
            loggers=make_loggers(cfg, run_dir) if dist.get_global_rank() == 0 else [],
            compile_config={} if t.compile else None,
            parallelism_config={"fsdp": t.fsdp} if t.fsdp is not None else None,
            eval_interval="1ep" if debug else t.eval_interval,
            eval_subset_num_batches=eval_subset_batches(t.eval_batches, len(eval_loader.dataloader)),
            device=placement.device,
            precision=placement.precision,
            device_train_microbatch_size=placement.microbatch,
            accumulate_train_batch_on_tokens=True,  # a step's loss is its mean over count_tokens' loss_generating
            seed=cfg.run.seed,
            progress_bar=False,  # rafale.loggers.ConsoleLog draws the bar and prints the lines
            log_to_console=False,
            # a resume loads the whole state (weights, optimizer, schedule, RNG, data position); a fresh run may start
            # from training.load_path's weights; eval_only evaluates that checkpoint as it was saved
            load_path=str(resume_from) if resume_from is not None else t.load_path,
            load_weights_only=resume_from is None and not t.eval_only and t.load_path is not None,
            save_folder=str(run_dir / "checkpoints") if save else None,
            save_filename="ep{epoch}-ba{batch}-rank{rank}.pt",
            save_interval=save_schedule(cfg, batches_per_epoch),
            save_num_checkpoints_to_keep=t.checkpoints_to_keep,
            autoresume=False,  # rafale resumes itself: see resume_checkpoint
            python_log_level=None,
        )
    return trainer, stopper, peak


def save_schedule(cfg: Config, batches_per_epoch: int):
    """training.save_interval, and with training.cooldowns also each batch a cooldown branches at (rafale.branch)."""
    if not cfg.training.cooldowns:
        return cfg.training.save_interval
    from composer.core import Event
    from composer.utils import create_interval_scheduler

    from rafale.branch import branch_points

    every, points = create_interval_scheduler(cfg.training.save_interval), set(branch_points(cfg, batches_per_epoch))

    def save_now(state: State, event) -> bool:
        at_point = event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) in points
        return every(state, event) or at_point

    return save_now


def say_if_no_export(module: torch.nn.Module) -> str | None:
    """Before training: one line (on rank 0) saying why `module` (the nn.Module) will have no Hugging Face export,
    if it will not (a research variant still trains; its checkpoints hold the weights), and the reason; None
    otherwise. The end of the run, which tries the export anyway, says the same."""
    refusal = export_refusal(module)
    if refusal is not None and dist.get_global_rank() == 0:
        print(f"rafale: no Hugging Face export for this run: {refusal}; the checkpoints will hold the weights")
    return refusal


def best_exporter(cfg: Config, model, run_dir: Path, data: PreparedData):
    """training.keep_best's export of the best weights to RUN/export-best/, or None for a model that cannot be
    exported, which the run says here, before it trains (the one check of the export before training)."""
    module, sharded = model.model, cfg.training.fsdp is not None
    if say_if_no_export(module) is not None:
        return None
    return lambda state: export_run(module, run_dir, data, sharded=sharded, folder=BEST_DIR)


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


def make_callbacks(device: str, peak: float | None, stopper: StopOnSignal, schedule: ScheduleAtBatchStart,
                   cache_dir: Path | None = None) -> list:
    """The learning-rate schedule, speed (with MFU against `peak`, probed again if the run outruns it; the new peak
    goes to `cache_dir`'s cpu_peak.json), the learning rates each batch applied, NaN losses, signals,
    schedule-free's modes. (The console's time left is rafale.loggers.RecentPace's, from the recent batches.)"""
    callbacks = [schedule, CheckedSpeedMonitor(10, peak, device, cache_dir), LearningRates(),
                 FiniteLossMonitor(), stopper, schedule_free_switch()]
    if device == "gpu":
        callbacks.append(MemoryMonitor())
    return callbacks


# ----------------------------------------------------------------------------------------------------
# the `rafale -c cfg.yaml` command, once the config is loaded and its model section resolved


def datapipe_for(cfg: Config) -> DataPipe:
    """The datapipe of model.task (by default the family's first task), with what the family wants of its data."""
    family = family_of(cfg)
    return DATAPIPES[cfg.model.task or family.heads[0]](cfg.data, **family.data)


def prepare_data(cfg: Config) -> PreparedData:
    """The config's data, from the cache or prepared now."""
    return datapipe_for(cfg).load()


def train(cfg: Config, model_cfg, data_only: bool = False, debug: bool = False, started: float | None = None) -> int:
    """Prepare the data (cached), build the model, train and evaluate it, report. Returns the exit code.
    `started`: when the command started (time.perf_counter()), for the run's start-up time."""
    started = time.perf_counter() if started is None else started
    pipe = datapipe_for(cfg)
    data = pipe.load()
    print_data_summary(data)
    if data_only:  # (main.train_main prepares the data itself, without importing Composer)
        return 0
    reproducibility.seed_all(cfg.run.seed)  # the initial weights too, not only what the Trainer draws
    if debug:
        model_cfg = without_dropout(model_cfg)
    model = build_model(cfg, model_cfg, data)
    collator = pipe.collator(data.meta)
    if debug and hasattr(collator, "fixed_seed"):  # the same masks every step, so the target holds still
        collator.fixed_seed = cfg.run.seed
    summary, folder = run(cfg, data, model, collator, debug=debug, started=started)
    print(describe(summary, folder))
    if not debug and cfg.training.cooldowns and summary.get("status") == "complete":
        train_cooldowns(cfg, model_cfg, data, pipe, folder)
    print(f"rafale: {describe_vocabulary(data)}")
    start, end = summary.get("validation_loss_start"), validation_loss(summary.get("validation", {}))
    if debug and start is not None and end is not None:
        print(f"rafale: DEBUG: loss on the batch went from {start:.4f} to {end:.4f} in {DEBUG_EPOCHS} epochs of "
              f"{DEBUG_STEPS_PER_EPOCH} steps ({end / start:.1%} of the start)")
    return 0


def train_cooldowns(cfg: Config, model_cfg, data: PreparedData, pipe: DataPipe, run_dir: Path) -> None:
    """training.cooldowns: once the run is complete, one branch per budget (rafale.branch), one after another; a
    branch complete before is left as it is, an interrupted one resumes."""
    from rafale.branch import cooldown_config

    for budget in cfg.training.cooldowns:
        branch = cooldown_config(cfg, run_dir, budget)
        print(f"rafale: cooldown to {budget}: {branch.run.name}", flush=True)
        reproducibility.seed_all(cfg.run.seed)
        summary, folder = run(branch, data, build_model(branch, model_cfg, data), pipe.collator(data.meta))
        print(describe(summary, folder))


def build_model(cfg: Config, model_cfg, data: PreparedData):
    """The Composer model of model.type (its family's build), with model.pretrained's weights."""
    check_fits_data(cfg, model_cfg, data.meta)
    model = family_of(cfg).build(model_cfg, head_of(cfg), data.meta, data.tokenizer)
    if head_of(cfg) == "causal_lm" and "BitsPerByte" not in getattr(model, "val_metrics", {}):
        print("rafale: validation reports no BitsPerByte: the tokenizer is not a byte-level BPE, so a token's bytes "
              "depend on the text around it (rafale.metrics); `rafale score RUN --file FILE` counts them in the text")
    if cfg.model.pretrained is not None:
        from rafale.models.hf import copy_pretrained, from_pretrained

        spec = cfg.model.pretrained
        source = spec if spec.startswith("hf:") else pretrained_folder(spec)
        copy_pretrained(from_pretrained(source, dtype=torch.float32), model.model)  # in place
    if cfg.training.activation_checkpointing:
        enable_activation_checkpointing(model.model, cfg.model.type)
    if hasattr(model, "attach_splits"):  # a wrapper that evaluates on more than the validation split (CLIP's zero-shot)
        model.attach_splits(data.splits)
    return model


def enable_activation_checkpointing(module: torch.nn.Module, model_type: str) -> None:
    """Turn on the block-wise recomputation of every part of `module` that offers it (an `activation_checkpointing`
    attribute: the decoder, the encoders' layer stacks); a model with none refuses the key rather than ignore it."""
    parts = [m for m in module.modules() if hasattr(m, "activation_checkpointing")]
    if not parts:
        raise ConfigError("training.activation_checkpointing", f"model.type {model_type} does not support it")
    for part in parts:
        part.activation_checkpointing = True


def check_fits_data(cfg: Config, model_cfg, meta: dict) -> None:
    """What the config asked for that the data contradicts: a pretrained encoder's padding id, model.num_labels, a
    pretrained CLIP's image size and end-of-text id."""
    pad = meta.get("pad_token_id")
    if cfg.model.pretrained is not None and getattr(model_cfg, "pad_token_id", pad) != pad:
        raise DataError(
            f"data.tokenizer: its padding id {pad} differs from the pretrained model's "
            f"pad_token_id {model_cfg.pad_token_id}; use the checkpoint's tokenizer"
        )
    if "num_labels" in cfg.model.overrides and "label_names" in meta and model_cfg.num_labels != len(meta["label_names"]):
        raise DataError(f"model.num_labels ({model_cfg.num_labels}) differs from the data's {len(meta['label_names'])} classes")
    if cfg.model.pretrained is not None and hasattr(model_cfg, "vision"):
        check_fits_images(model_cfg, meta)


def check_fits_images(model_cfg, meta: dict) -> None:
    """A pretrained CLIP or SigLIP keeps its image size, and CLIP the token it pools its text at (the builder takes
    both from the data)."""
    size = meta.get("image_size")
    if model_cfg.vision.image_size != size:
        raise DataError(f"data.image_size ({size}) differs from the pretrained model's image size "
                        f"({model_cfg.vision.image_size}); set data.image_size: {model_cfg.vision.image_size}")
    text = model_cfg.text
    pooled = text.vocab_size - 1 if text.eos_token_id is None else text.eos_token_id  # None: at the highest id
    if text.pooling == "eos" and pooled != meta["eos_token_id"]:  # (SigLIP pools the last position)
        raise DataError(f"data.tokenizer: its end-of-text id {meta['eos_token_id']} differs from the id the pretrained "
                        f"CLIP pools its text at ({pooled}); use the checkpoint's tokenizer")
