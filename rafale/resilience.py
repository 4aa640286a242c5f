"""Runs that survive interruptions: stopping cleanly on a signal, refusing diverged losses, and checking the
checkpoint that autoresume is about to load.

Composer's autoresume restores model, optimizer, scheduler, RNG and data position from the run folder's latest
checkpoint; what it lacks is here: SIGINT/SIGTERM save a checkpoint at the end of the current batch, and a NaN or
infinite loss stops the run with a hint. Checking the checkpoint first (a truncated one is an error naming the
file, or with run.resume_fallback set aside for the one before; one that holds more than Composer stores is
refused) is in rafale/checkpoints.py, which needs no Composer; its names are importable from here too.
"""

import math
import pickle
import signal
import sys

import torch
from composer import Callback
from composer.callbacks import CheckpointSaver
from composer.utils import dist

# re-exported: the checkpoint checks moved to rafale.checkpoints, which `rafale generate`/`export` use without Composer
from rafale.checkpoints import (CHECKPOINT_SAFE_GLOBALS, LATEST_CHECKPOINT, batch_number,  # noqa: F401
                                check_checkpoint_safe, check_resume_checkpoint, checkpoint_readable, prune_checkpoints,
                                read_checkpoint)
from rafale.errors import RafaleError

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
    """Whether the other ranks can unpickle `error` (an exception whose __init__ takes other arguments than its
    message, like ConfigError's, cannot be rebuilt from its args)."""
    try:
        pickle.loads(pickle.dumps(error))
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
