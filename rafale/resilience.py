"""Runs that survive interruptions: stopping cleanly on a signal, refusing diverged losses, and checking the
checkpoint that autoresume is about to load.

Composer's autoresume restores model, optimizer, scheduler, RNG and data position from the run folder's latest
checkpoint; what it lacks is here: SIGINT/SIGTERM save a checkpoint at the end of the current batch, a NaN or
infinite loss stops the run with a hint, and a truncated latest checkpoint is an error naming the file (or,
with run.resume_fallback, set aside for the one before). Composer unpickles what it loads, so a checkpoint is
first read with torch.load(weights_only=True) and refused if it holds anything a Composer checkpoint does not.
"""

import datetime
import math
import os
import re
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from composer import Callback
from composer.callbacks import CheckpointSaver
from composer.utils import dist

from rafale.errors import CheckpointError, RafaleError

LATEST_CHECKPOINT = "latest-rank0.pt"  # the symlink Composer's autoresume reads in the checkpoints folder
# what a Composer checkpoint holds besides tensors and plain containers: timings, the torch version, numpy RNG
# states (the same for every family, resumed or not; optimizer, scheduler and timestamp states are plain data)
CHECKPOINT_SAFE_GLOBALS = [
    datetime.timedelta,
    torch.torch_version.TorchVersion,
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
]
DIVERGED_HINT = ("lower training.lr, keep gradient clipping on (training.clip_norm), "
                 "or use precision amp_bf16 instead of amp_fp16")


class TrainingDiverged(RafaleError):
    pass


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


def checkpoint_readable(path: Path) -> str | None:
    """None when `path` is a whole checkpoint, else what is wrong with it.

    torch.save writes a zip archive with a CRC per entry: a file cut short loses its central directory, and
    damaged bytes fail their CRC, so this finds both without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return f"the entry {bad} is damaged" if bad else None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return str(err) or type(err).__name__


def batch_number(checkpoint: Path) -> int:
    """The batch of a checkpoint named by rafale's save_filename, ep{epoch}-ba{batch}-rank{rank}.pt."""
    return int(checkpoint.name.split("-ba")[1].split("-")[0])


def check_resume_checkpoint(folder: Path, fallback: bool, trust: bool = False) -> Path | None:
    """The checkpoint a run resumes from (None: there is none): the latest one, checked first. An unreadable one is
    a clear error, or with run.resume_fallback set aside for the newest readable one before it. A whole checkpoint
    that holds more than Composer stores is refused (check_checkpoint_safe)."""
    latest = folder / LATEST_CHECKPOINT
    if not latest.is_symlink() and not latest.exists():
        return None
    target = latest.resolve()
    # a checkpoint newer than the symlink was being written when the run was killed; Composer refuses to train
    # into a folder that holds one (FileExistsError), so set it aside
    for newer in folder.glob("ep*-ba*-rank0.pt"):
        if batch_number(newer) > batch_number(target):
            newer.rename(newer.with_name(newer.name + ".unfinished"))
            print(f"rafale: {newer} is newer than {LATEST_CHECKPOINT} (a save cut short); set aside as {newer.name}.unfinished")
    problem = checkpoint_readable(target) if target.exists() else "it does not exist"
    if problem is None:
        check_checkpoint_safe(target, "autoresume", trust)
        return target
    if not fallback:
        raise CheckpointError(
            f"cannot resume: the latest checkpoint {target} is unreadable ({problem}), probably cut short by a crash; "
            "set run.resume_fallback: true to resume from the previous checkpoint, or delete it to start over"
        )
    if target.exists():
        target.rename(target.with_name(target.name + ".corrupt"))
    print(f"rafale: the latest checkpoint {target} is unreadable ({problem}); set aside as {target.name}.corrupt")
    latest.unlink()
    for candidate in sorted(folder.glob("ep*-ba*-rank0.pt"), key=batch_number, reverse=True):
        if checkpoint_readable(candidate) is None:
            check_checkpoint_safe(candidate, "autoresume", trust)
            os.symlink(candidate.name, latest)
            print(f"rafale: resuming from the previous checkpoint {candidate}")
            return candidate
        print(f"rafale: {candidate} is unreadable too; skipping it")
    print(f"rafale: no readable checkpoint left in {folder}; starting from the beginning")
    return None


def read_checkpoint(path: Path) -> dict:
    """A Composer checkpoint read with torch.load(weights_only=True), allowing only CHECKPOINT_SAFE_GLOBALS.

    A file holding anything else (an object whose unpickling would run code) or no checkpoint at all is a
    CheckpointError naming it; nothing in the file is executed."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises one of several types for a wrong, truncated or unsafe file
        raise CheckpointError(f"{path} is not a Composer checkpoint that can be read safely: {_load_problem(err)}") from None
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict) and isinstance(state["state"].get("model"), dict)):
        raise CheckpointError(f"{path} is not a Composer checkpoint: it has no model state")
    return state


def _load_problem(err: Exception) -> str:
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if unsafe:
        return f"it holds {unsafe.group(1)}, which Composer's checkpoints never do (unpickling it could run code)"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def check_checkpoint_safe(path: Path, key: str, trust: bool) -> None:
    """Composer unpickles training.load_path and the autoresume checkpoint without weights_only, which runs
    whatever code a crafted file holds: read `path` safely first and refuse it if that fails, unless the user
    trusts it (training.trust_checkpoint)."""
    if trust:
        return
    try:
        read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{key}: {err}; if you trust this file, set training.trust_checkpoint: true") from None
