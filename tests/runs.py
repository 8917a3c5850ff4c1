"""Small finished runs shared by the session's tests: each launched once, on its first use (the
`finished_runs` fixture of conftest.py), so a test that reads a run costs no launch of its own.

The directories are shared: a test reads them, or copies one (`shutil.copytree`) before it changes anything.
"""

import subprocess
from dataclasses import dataclass
from pathlib import Path

from mpi_helpers import FAST, launch, ok

# The virtual clock (exact, whatever the machine's load), evaluations every 5 versions.
VIRTUAL = [*FAST, "--clock", "virtual", "--seed", "4", "--run.eval_every=5"]

# name -> (ranks, trainer arguments but --out)
RUNS = {
    "fedbuff": (1, [*VIRTUAL, "--algorithm", "fedbuff", "--max-versions", "5"]),
    "fedasync": (1, [*VIRTUAL, "--algorithm", "fedasync", "--max-versions", "5"]),
    # 20 versions, job 2's update non-finite (one rejected arrival), heartbeats in the progress lines
    "one_rejected": (1, [*FAST, "--max-versions", "20", "--fault.kind=nan", "--fault.job=2",
                         "--run.heartbeat_seconds=0.5"]),
}


@dataclass(frozen=True)
class Finished:
    out: Path                              # the run directory
    proc: subprocess.CompletedProcess      # the launch: its stdout and stderr


class FinishedRuns:
    """runs(name) -> the Finished run of RUNS[name], launched on first use."""

    def __init__(self, base: Path):
        self.base = base
        self.done: dict[str, Finished] = {}

    def __call__(self, name: str) -> Finished:
        if name not in self.done:
            ranks, args = RUNS[name]
            out = self.base / name
            proc = launch(ranks, [*args, "--out", str(out)])
            ok(proc)
            self.done[name] = Finished(out, proc)
        return self.done[name]
