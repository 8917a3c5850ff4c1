"""The files a stopping run writes, and one line for the user when any of them could not be written.

Order: checkpoint.h5 first, then summary.json and model.pt. After a stop signal the job may be killed at any
moment (a second Ctrl-C makes mpiexec kill every rank, SLURM sends SIGKILL after KillWait), and of the three
only the checkpoint lets the run continue. Each write is atomic (storage/atomic.py) and is attempted even when
an earlier one failed: a failed write leaves its old file (if any) and no temporary file, so it costs no space
that a later, smaller write needs. A full disk, a directory made read-only or a file name taken by a directory
mid-run is an OSError, recorded here; `error_line` then names what was not written, why, and what the
directory still allows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class FinalWrites:
    """`attempt(name, write)` runs `write(OUT/name)` and records an OSError instead of raising it."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.written: list[str] = []
        self.failed: dict[str, str] = {}   # file name -> why

    def attempt(self, name: str, write: Callable[[Path], None]) -> bool:
        try:
            write(self.out / name)
        except OSError as e:
            self.failed[name] = e.strerror or str(e) or type(e).__name__
            return False
        if name not in self.written:   # run.h5 is written twice at a stop: its rows, then the rank records
            self.written.append(name)
        return True

    def error_line(self, checkpoint_version: int | None) -> str | None:
        """None if everything was written; else one line: what failed and why, what was written, and where
        --resume would continue (`checkpoint_version`: the version of the directory's checkpoint.h5, None
        if it has none)."""
        if not self.failed:
            return None
        failed = ", ".join(f"{name} ({why})" for name, why in self.failed.items())
        kept = f"; written: {', '.join(self.written)}" if self.written else ""
        if "checkpoint.h5" not in self.failed:
            then = f"--resume {self.out} continues from this stop"
        elif checkpoint_version is not None:
            then = (f"its checkpoint.h5 is the one of version {checkpoint_version}: --resume {self.out} continues "
                    f"from there")
        else:
            then = "it has no checkpoint.h5, so the run cannot be continued"
        return f"the run's final files were not all written in {self.out}: not written: {failed}{kept}; {then}"
