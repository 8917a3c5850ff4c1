"""Stop signals (SIGTERM, SIGUSR1, SIGINT), recorded from the first moment of a run.

`arm()` is the first thing the trainer does, before the slow start-up (importing
torch, MPI initialisation, loading data: seconds to a minute on a cluster).
Without it a signal in that window is fatal (USR1's default action kills the
process, under SLURM on every rank) or, once a do-nothing handler is in place,
silently lost. Armed, a signal is only recorded: the start-up checks `received()`
at its collective points and stops every rank with exit 0 before any work, and
the server, once it runs, turns it into "checkpoint and stop" through
`on_stop()`, which also fires at once for a signal that came before it.

SLURM's `--signal` and `scancel` send USR1/TERM; MPICH's mpiexec forwards INT,
TERM and USR1 to every rank. Workers only record the signal: they stop when the
server tells them to.
"""

from __future__ import annotations

import atexit
import signal
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_received: int | None = None
_callback: Callable[[int], None] | None = None


def arm() -> None:
    """Record stop signals from now on (call once, first thing, in the main thread), and ignore them once the
    process is exiting."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    atexit.register(_ignore)


def _ignore() -> None:
    """At exit, after the run's work: Python's finalisation puts the default action (terminate) back for every
    signal with a Python handler, so a USR1 arriving then (SLURM's time-limit signal as a finished job exits)
    killed ranks that had finished cleanly (exit 138, seen under SLURM). It leaves ignored signals alone."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _record(signum: int, frame) -> None:
    global _received
    _received = signum
    if _callback is not None:
        _callback(signum)


def received() -> int | None:
    """The last stop signal received since `arm()`, or None."""
    return _received


def on_stop(callback: Callable[[int], None]) -> None:
    """Call `callback(signum)` for every stop signal from now on, and at once if one already came."""
    global _callback
    _callback = callback
    if _received is not None:
        callback(_received)


def name(signum: int) -> str:
    return signal.Signals(signum).name
