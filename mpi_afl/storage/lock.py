"""An exclusive lock on a run directory, held by rank 0 for the whole run.

Two runs writing into the same directory mix their files (one overwrites the
other's clients.txt, run.h5 and checkpoint.h5). The lock is the file
`OUT/run.lock`, created atomically (written under a temporary name, then
hard-linked to `run.lock`, which fails if it exists) and holding the owner's host,
process id and SLURM job id. It is removed when the run ends, whatever the exit
(exception, signal, config error); only a process killed outright (kill -9, a
node failure, MPI_Abort from another rank) leaves it behind. Such a lock is stale
and is taken over when

- it names this host and a process that no longer exists, or
- it names the SLURM job we run in (a requeued job resuming itself after a node
  failure: the same job cannot run twice at once).

Any other existing lock refuses the run with a message naming the owner; a lock
left by a crash on another host has to be deleted by hand (the message says so).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .. import console
from .atomic import temp_path

LOCK_FILE = "run.lock"


class LockError(Exception):
    """The run directory is in use (or its lock cannot be created); the message is for the user."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def _stale(holder: dict) -> bool:
    me = _owner()
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return holder.get("pid") != me["pid"] or holder.get("host") != me["host"]
    return holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])


class RunLock:
    """`RunLock(directory)` takes the lock (LockError if another run holds it); `release()` gives it back."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self.held = False
        for _ in range(3):   # tries again after removing a stale lock, or when the holder released it meanwhile
            if self._try_create():
                self.held = True
                return
            holder = self._holder()
            if holder == {}:
                continue
            if holder is None or not _stale(holder):
                raise LockError(self._in_use(holder))
            self.path.unlink(missing_ok=True)
        raise LockError(self._in_use(self._holder() or None))

    def _try_create(self) -> bool:
        tmp = temp_path(self.path)
        try:
            tmp.write_text(json.dumps(_owner()) + "\n")
            os.link(tmp, self.path)   # atomic, and fails if the lock exists: no half-written lock is ever seen
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}   # released meanwhile
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _in_use(self, holder: dict | None) -> str:
        who = (f"process {holder.get('pid')} on host {holder.get('host')}"
               + (f" (SLURM job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else "")
               if holder else "an unreadable lock")
        return (f"run directory {self.path.parent} is in use by another run ({who}: {self.path}); "
                f"wait for it to end or choose another --out; if no run uses it any more "
                f"(it crashed on another host), delete {self.path}")

    def release(self) -> None:
        """Remove the lock; calling it again does nothing."""
        if self.held:
            self.held = False
            try:
                self.path.unlink(missing_ok=True)
            except OSError as e:   # a directory made read-only: the run's own error says more than this
                console.tool.warning(f"warning: could not remove {self.path} ({e.strerror or e}); it names a "
                                     "process that has ended, so the next run in this directory takes it over")
