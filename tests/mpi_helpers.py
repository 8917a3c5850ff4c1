"""Launch real `mpiexec` jobs (and one-process runs) of mpi_afl.train from tests."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
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


def command(ranks: int, args: list[str]) -> list[str]:
    """The trainer on `ranks` processes (1 = plain python, no mpiexec)."""
    cmd = [sys.executable, "-m", "mpi_afl.train", *args]
    return [MPIEXEC, "-n", str(ranks), *cmd] if ranks > 1 else cmd


def launch(ranks: int, args: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """Run the trainer to the end."""
    return subprocess.run(command(ranks, args), capture_output=True, text=True, timeout=timeout, env=env(), **kw)


def start(ranks: int, args: list[str]) -> subprocess.Popen:
    """Start the trainer in the background (stdout and stderr piped, text); the caller signals, waits, kills."""
    return subprocess.Popen(command(ranks, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())


def wait_until(ready: Callable[[], bool], timeout: float = 120, interval: float = 0.2) -> bool:
    """Poll `ready` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())
