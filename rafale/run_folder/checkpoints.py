"""Reading and checking Composer checkpoint files without Composer (torch and the standard library only), so that
`rafale generate`, `export` and the other commands that load a run's weights start without importing it.

Composer unpickles what it loads, so a checkpoint is first read with torch.load(weights_only=True) and refused if it
holds anything a Composer checkpoint does not; a truncated latest checkpoint is an error naming the file (or, with
run.resume_fallback, set aside for the one before). The callbacks that stop a run cleanly are in rafale/run/resilience.py.
"""

import datetime
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from rafale.errors import CheckpointError

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


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` checkpoints of the run folder (-1: all) and the one LATEST_CHECKPOINT points to (the one
    a resume loads); remove the others and return them. Composer's num_checkpoints_to_keep removes only what its own
    process saved, so without this every preemption would leave its checkpoints behind for good. A checkpoint is
    every rank's file of one batch; files set aside (.unfinished, .corrupt) are left for the user to look at."""
    if keep < 0:
        return []
    by_batch: dict[int, list[Path]] = {}
    for path in folder.glob("ep*-ba*-rank*.pt"):
        if not path.is_symlink():
            by_batch.setdefault(batch_number(path), []).append(path)
    latest = folder / LATEST_CHECKPOINT
    needed = {batch_number(latest.resolve())} if latest.is_symlink() and latest.exists() else set()
    kept = set(sorted(by_batch, reverse=True)[:keep]) | needed
    removed = [path for batch in sorted(by_batch) if batch not in kept for path in by_batch[batch]]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


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
