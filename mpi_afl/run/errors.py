"""How a run ends early on every rank: start-up collectives that stop all ranks alike, the exit codes, and the
traceback-then-Abort of a crash (no rank is left hanging)."""

from __future__ import annotations

import sys
import time
import traceback

from .. import console, signals

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
ABORT_GRACE_SECONDS = 1.0   # before MPI_Abort, so that mpiexec passes on what the failing rank printed


def stopped_at_start(signum: int) -> None:
    console.tool.info(f"{signals.name(signum)} during start-up: stopped before any work (nothing to resume; "
                      "a resumed run is left as it was)")


def collective_or_exit(comm, result) -> object:
    """Broadcast rank 0's ('ok', value) / ('exit', code) and act on it on every rank."""
    status, value = comm.bcast(result, root=0)
    if status == "exit":
        sys.exit(value)
    return value


def startup_point(comm, failure: str | None = None) -> None:
    """A collective point of the start-up. If any rank failed (`failure`: its one-line message), rank 0
    prints the first failure and every rank exits 2; if rank 0 received a stop signal, every rank exits 0."""
    statuses = comm.allgather((failure, signals.received()))
    failures = [f for f, _ in statuses if f]
    if failures:
        if comm.Get_rank() == 0:
            console.error(failures[0])
        sys.exit(EXIT_CONFIG)
    if statuses[0][1] is not None:
        if comm.Get_rank() == 0:
            stopped_at_start(statuses[0][1])
        sys.exit(0)


def config_error(comm, e: Exception) -> int:
    """A plug-in that breaks its contract (or no GPU for run.device=cuda) fails alike on every rank;
    rank 0 says why, then the job ends (Abort: a rank that did not fail must not wait forever)."""
    if comm.Get_rank() == 0:
        console.error(str(e))
    else:
        time.sleep(2)   # let rank 0 print first; if only this rank failed, still say why
        console.tool.error(f"error on rank {comm.Get_rank()}: {e}")
    if comm.Get_size() > 1:
        abort(comm, EXIT_CONFIG)
    return EXIT_CONFIG


def fail(comm, e: BaseException) -> int:
    """Print this rank's traceback in full, naming the rank and its role, then end the whole job."""
    rank, size = comm.Get_rank(), comm.Get_size()
    role = "server" if rank == 0 else "worker"
    what = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    console.tool.error(f"rank {rank} ({role}) failed: {what}" + ("; aborting all ranks" if size > 1 else ""),
                       extra={"traceback": traceback.format_exc()})
    if size > 1:
        abort(comm, EXIT_FAILED)
    return EXIT_FAILED


def abort(comm, code: int) -> None:
    """End every rank of the job, after giving mpiexec time to pass on what this rank just printed.

    MPI_Abort makes mpiexec kill every process at once, and text still in its forwarding pipes was lost: about
    one traceback in ten before this wait, and once a plug-in's contract error (a CI run with empty stderr).
    """
    time.sleep(ABORT_GRACE_SECONDS)
    comm.Abort(code)
