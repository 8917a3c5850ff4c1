"""Launch real `mpiexec` jobs (and one-process runs) of mpi_afl.train from tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mpi_afl.launch import mpiexec_path

MPIEXEC = mpiexec_path()

# Small, fast defaults: digits, a few clients, short local training.
FAST = ["--dataset", "digits", "--data.num_clients=12", "--server.concurrency=4", "--client.iterations=5",
        "--run.eval_every=10"]


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def launch(ranks: int, args: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """Run the trainer on `ranks` processes (1 = plain python, no mpiexec)."""
    cmd = [sys.executable, "-m", "mpi_afl.train", *args]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), **kw)


def summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())
