"""Launch real `mpiexec` jobs (and one-process runs) of mpi_afl.train from tests, and check how they ended:
`ok` (exit 0), `refused` (a launched process's exit code and its one error line) and `refused_at_start` (the
start-up's checks in process, for tests whose subject is a refusal rather than the process around it)."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mpi_afl.launch import mpiexec_path
from mpi_afl.run.startup import rank0_setup

MPIEXEC = mpiexec_path()
REPO = Path(__file__).resolve().parents[1]   # the checkout: examples/, jobs/, docs/, experiments/

# How long a launched run (or a wait for its progress) may take before the test calls it hung. A hang guard,
# not a speed check: these runs take 2-70 s on an idle 2-core machine and have taken 3-4x that under load, so
# the guard is far above any correct run on a slow machine (timed assertions are for bench/, not tests).
HANG_GUARD = 1800

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


def launch(ranks: int, args: list[str], timeout: float = HANG_GUARD, **kw) -> subprocess.CompletedProcess:
    """Run the trainer to the end."""
    return subprocess.run(command(ranks, args), capture_output=True, text=True, timeout=timeout, env=env(), **kw)


def start(ranks: int, args: list[str]) -> subprocess.Popen:
    """Start the trainer in the background (stdout and stderr piped, text); the caller signals, waits, kills."""
    return subprocess.Popen(command(ranks, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())


def wait_until(ready: Callable[[], bool], timeout: float = HANG_GUARD, interval: float = 0.2) -> bool:
    """Poll `ready` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("mpi_afl: error:")]


def refused(proc: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """Exit `code` with one error line that holds `words`, no traceback and no segfault; returns the line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    errors = _errors(proc.stderr)
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert "Traceback" not in proc.stderr and "Segmentation" not in proc.stderr, proc.stderr
    return errors[0]


def refused_at_start(argv: list[str], capsys, *words: str) -> str:
    """Rank 0's start-up checks in process (parse, validate, lock and check the run directory: what every rank
    of a launched run acts on, exit 2 with the one line it prints). No MPI and no signal handlers in this
    process: `train.main` would start MPI here. Returns the line."""
    setup = rank0_setup(argv)
    try:
        assert setup.result == ("exit", 2), setup.result
    finally:
        setup.release()   # a start that was not refused must not leave its lock behind
    err = capsys.readouterr().err
    errors = _errors(err)
    assert len(errors) == 1 and err == errors[0] + "\n", err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def export_without_torch(args: list[str]) -> subprocess.CompletedProcess:
    """`mpi-afl export ARGS` in a fresh interpreter that fails if anything imported torch."""
    script = (f"import sys; from mpi_afl.export import main; rc = main({args!r}); "
              "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, env=env(), timeout=HANG_GUARD)
