"""Runs that survive interruptions: stopping cleanly on a signal, refusing diverged losses, and checking the
checkpoint that autoresume is about to load.

Composer's autoresume restores model, optimizer, scheduler, RNG and data position from the run folder's latest
checkpoint; what it lacks is here: SIGINT/SIGTERM save a checkpoint at the end of the current batch, and a NaN or
infinite loss stops the run with a hint. Checking the checkpoint first (a truncated one is an error naming the
file, or with run.resume_fallback set aside for the one before; one that holds more than Composer stores is
refused) is in rafale/run_folder/checkpoints.py, which needs no Composer; its names are importable from here too. Several
processes resume one run from the same checkpoint, in a run folder they all see (check_shared_run_folder,
resume_checkpoint).
"""

import math
import os
import signal
import sys
from pathlib import Path

import torch
from composer import Callback
from composer.callbacks import CheckpointSaver
from composer.utils import dist

# re-exported: the checkpoint checks moved to rafale.run_folder.checkpoints, which `rafale generate`/`export` use without Composer
from rafale.run_folder.checkpoints import (CHECKPOINT_SAFE_GLOBALS, LATEST_CHECKPOINT, batch_number,  # noqa: F401
                                check_checkpoint_safe, check_resume_checkpoint, checkpoint_readable, prune_checkpoints,
                                read_checkpoint)
from rafale.config import Config
from rafale.errors import ConfigError, RafaleError

DIVERGED_HINT = ("lower training.lr, keep gradient clipping on (training.clip_norm), "
                 "or use precision amp_bf16 instead of amp_fp16")


class TrainingDiverged(RafaleError):
    pass


def decided_on_rank_zero(decide):
    """What `decide()` returns (or raises) on rank 0, on every process: rank 0 alone reads the run folder and every
    rank acts on what it read. Processes that each read a shared file reach different decisions when the file
    changes between their reads or a network disk serves one of them a stale copy, and a decision one rank takes
    alone (stop, skip a collective) leaves the others waiting forever. Rank 0's error is raised on every rank (as
    a RafaleError with its message where it cannot be rebuilt from a pickle), so they all stop with it. `decide`'s
    result must pickle."""
    result = error = None
    if dist.get_global_rank() == 0:
        try:
            result = decide()
        except Exception as err:  # handed to the other ranks, which would otherwise wait for rank 0 forever
            error = err
    if dist.get_world_size() > 1:
        shared = [(result, error if error is None or _survives_pickling(error) else RafaleError(str(error)))]
        dist.broadcast_object_list(shared, src=0)
        if dist.get_global_rank() != 0:
            result, error = shared[0]
    if error is not None:
        raise error
    return result


def _survives_pickling(error: Exception) -> bool:
    """Whether the other ranks can rebuild `error` from its pickle: an exception is unpickled as
    type(error)(*error.args), which fails for one whose __init__ takes other arguments than its message, like
    ConfigError's (checked by calling that, so nothing is unpickled here)."""
    try:
        type(error)(*error.args)
        return True
    except Exception:
        return False


class FiniteLossMonitor(Callback):
    """Stop at the first NaN or infinite loss, naming the batch: later steps would only train on garbage.

    It reads the step's loss that Composer has already copied to the host and averaged over ranks (for its
    logs), so it costs no device sync of its own, and every rank stops at the same batch. A NaN in any
    microbatch makes that sum NaN."""

    def batch_end(self, state, logger):
        for value in state.total_loss_dict.values():
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"the training loss is {value} at batch {int(state.timestamp.batch)}; {DIVERGED_HINT}"
                )


class StopOnSignal(Callback):
    """On SIGINT or SIGTERM, finish the current batch, save a checkpoint and stop (without the end-of-training
    evaluation), so the run can be resumed.

    The handlers only set a flag (nothing is saved from inside a signal handler); a second SIGINT interrupts at once.
    With several processes the flag is shared after each batch (a MAX all-reduce of one number): a scheduler's
    SIGTERM reaches the processes of a job at slightly different times, and a process that stopped a batch before
    the others would leave them waiting in that batch's collectives.
    """

    def __init__(self, save: bool):
        self.save = save
        self.signum = None
        self.saved = None
        self._previous = {}

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"rafale: {signal.Signals(signum).name} received; stopping after this batch "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def batch_checkpoint(self, state, logger):
        if dist.get_world_size() > 1:  # every process stops after the same batch, whichever ones got the signal
            signum = state.device.tensor_to_device(torch.tensor([self.signum or 0]))
            dist.all_reduce(signum, reduce_operation="MAX")
            self.signum = int(signum.item()) or None
        if self.signum is None:
            return
        if self.save:
            saver = next(c for c in state.callbacks if isinstance(c, CheckpointSaver))
            if saver.last_checkpoint_batch != state.timestamp.batch:  # not just saved by save_interval
                saver._save_checkpoint(state, logger)
            self.saved = saver.saved_checkpoints[-1] if saver.saved_checkpoints else None
        # no end-of-training evaluation on the way out: a preempted job has seconds left, and the resumed run
        # evaluates at the run's own intervals (so its record matches a run never stopped)
        for evaluator in state.evaluators:
            evaluator.eval_interval = lambda state, event: False
        state.stop_training()


# ----------------------------------------------------------------------------------------------------
# several processes, one run folder, one checkpoint to resume from


def check_shared_run_folder(run_dir: Path) -> None:
    """Several processes train one run: they must all see one run folder. Rank 0 writes a marker file there and
    every process looks for it; one that cannot see it is on a node with a disk of its own, where a resume would
    find no checkpoint (they are on node 0's disk) and silently start over. Every process then stops with the
    same error. (Also the first collective of the run: the process group starts here, before the Trainer.)"""
    import secrets

    dist.initialize_dist("gpu" if torch.cuda.is_available() else "cpu")
    token = [secrets.token_hex(8) if dist.get_global_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = run_dir / f".shared-by-every-node-{token[0]}"
    if dist.get_global_rank() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(token[0])
        except OSError:
            pass  # the run folder's own error comes from rafale.run_folder.write_run_folder, on every process
    dist.barrier()
    seen = dist.all_gather_object((marker.is_file(), os.environ.get("NODE_RANK", "0"), dist.get_global_rank()))
    dist.barrier()
    if dist.get_global_rank() == 0:
        marker.unlink(missing_ok=True)
    blind = sorted({f"node {node} (rank {rank})" for sees, node, rank in seen if not sees})
    if blind:
        raise ConfigError("run.output_dir", f"{run_dir} is not shared by every node: {', '.join(blind)} cannot see "
                          "what rank 0 writes there (a disk of its own?). Resuming needs a run.output_dir on a disk "
                          "every node shares (a cluster's /scratch or /project), where node 0's checkpoints are")


def resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint of run_dir/checkpoints this run resumes from (None: a fresh start), the same on every process.

    Rank 0 picks the latest one and checks it (check_resume_checkpoint: readable, nothing to
    unpickle but Composer's plain types, run.resume_fallback), then hands its path to every process, which load it
    as Composer's load_path. Composer's own autoresume is not used: on a run folder that several nodes share it
    crashes, because it names the signal file each node's first process writes and removes after node 0 on every
    node (llm-foundry issues 417 and 1736, Composer PR 2363 still open), so the nodes remove each other's file.
    Loading the same checkpoint through load_path restores exactly what autoresume would."""
    chosen = None
    if dist.get_global_rank() == 0:
        chosen = check_resume_checkpoint(run_dir / "checkpoints", cfg.run.resume_fallback, cfg.training.trust_checkpoint)
    if dist.get_world_size() > 1:
        shared = [str(chosen) if chosen is not None else None]
        dist.broadcast_object_list(shared, src=0)
        chosen = Path(shared[0]) if shared[0] is not None else None
    return chosen
