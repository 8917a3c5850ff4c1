"""A run directory's identity: the run id, and the resume checks that its files belong to one run.

A fresh run gets a random run id (`new_run_id`), written into run.h5 (root
attribute `run_id`), checkpoint.h5 (`run_id` in the server state) and
summary.json. `check_resume` runs on rank 0 before a resume writes anything: a
checkpoint.h5, run.h5 or summary.json of another run, a run log that is
missing, damaged or shorter than the checkpoint says, is refused with one line
that names the file and says how to continue. Nothing in the directory is
changed by a refused resume.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from .runlog import RunLogError
from .runlog.reader import check_resumable

RUN_FILES = ("summary.json", "run.h5", "checkpoint.h5")   # a directory holding any of these holds a run
# Every file a run writes into its directory (all regular files).
WRITTEN_FILES = (*RUN_FILES, "model.pt", "config.toml", "command.txt", "server.log", "clients.txt")


class RunDirError(Exception):
    """The run directory cannot be resumed as asked; the message is one line for the user."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def check_resume(directory: str | Path, state: dict, new_log: bool) -> str:
    """The run id of the checkpoint `state` read from `directory`, after checking that the directory's
    summary.json and (unless `new_log`) run.h5 belong to the same run and that run.h5 is intact."""
    directory = Path(directory)
    checkpoint = directory / "checkpoint.h5"
    run_id = state.get("run_id")
    if not run_id:
        raise RunDirError(f"{checkpoint} has no run id (written by an mpi_afl from before run ids), so it "
                          "cannot be checked against the run's other files; it is not resumed")
    summary = directory / "summary.json"
    if summary.exists():
        try:
            other = json.loads(summary.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError) as e:
            raise RunDirError(f"{summary} is unreadable ({e}); move it away to resume (the resumed run "
                              "writes a new one)") from None
        if other != run_id:
            raise RunDirError(f"{summary} belongs to run {other!r} but {checkpoint} to run {run_id!r}: the "
                              "directory mixes two runs; not resumed")
    if new_log:
        return run_id
    log = directory / "run.h5"
    fresh = f"to continue from {checkpoint.name} with a fresh run log (the old one, if any, is kept aside): " \
            f"--resume {directory} --new-log"
    if not log.exists():
        raise RunDirError(f"run log {log} is missing; {fresh}")
    try:
        check_resumable(log, state["log_counts"], run_id)
    except RunLogError as e:
        raise RunDirError(f"cannot resume: {e}; {fresh}") from None
    return run_id


def check_run_files(directory: Path) -> None:
    """Refuse a directory where one of the run's file names is taken by a directory or another non-file:
    the run would fail writing it, at the start or only at the end."""
    for name in WRITTEN_FILES:
        path = directory / name
        if path.exists() and not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise RunDirError(f"{path} is {kind}, but the run writes a file of that name there; move it away "
                              "or choose another --out")


def holds_a_run(directory: Path) -> bool:
    return any((directory / f).exists() for f in RUN_FILES)


def no_checkpoint_advice(directory: Path) -> str:
    """What to do with a directory whose run left no checkpoint.h5: the same words for a fresh start and for
    --resume, so neither points at the other."""
    return (f"{directory} holds a run that stopped before it wrote a checkpoint (no checkpoint.h5), so it cannot "
            f"be continued; start it again with --out {directory} --run.overwrite=true, or choose another --out")


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete the temporary files (storage/atomic.py's `.NAME.PID.HEX.tmp`) that a run killed mid-write left
    beside its files; call only while holding the directory's lock. Returns what was removed."""
    removed = []
    for name in WRITTEN_FILES:
        for tmp in directory.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def set_aside_log(directory: str | Path) -> Path | None:
    """Rename run.h5 (resumed with --new-log) to run.h5.replaced-TIME; the new name, or None if absent."""
    log = Path(directory) / "run.h5"
    if not log.exists():
        return None
    aside = log.with_name(f"run.h5.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    log.rename(aside)
    return aside
