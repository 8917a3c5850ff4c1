"""The server's MPI calls must not end in a segmentation fault when a peer has died.

With MPICH's ch4:ucx (the `mpich` wheel's default), a send to a rank whose process is gone (its node failed, or
SIGKILL: srun's `--kill-on-bad-exit` kills the remaining ranks a moment later) dereferences UCX's dead endpoint:
the server segfaulted in the Isend of STOP, after it had written its final checkpoint, and the job ended
"FAILED 139" as if the run were damaged. MPICH's fault tolerance (MPIR_CVAR_ENABLE_FT) is no way out: with UCX
it makes MPI_Init fail ("Destination is unreachable").

`guard()` makes SIGSEGV and SIGBUS end the process at once with exit code EXIT_PEER_LOST (11) while the
server is inside an MPI call, instead of a crash and a core: the handler is libc's `_exit` itself (called with
the signal number, 11 for SIGSEGV), which is async-signal-safe and runs no Python. Outside the guarded calls
the previous handlers (none, or faulthandler's) are back in place, so a fault anywhere else still reports as
one. The run's files stay as they were: every checkpoint is written between two updates and atomically, so
OUT/checkpoint.h5 is the last one written (the final one when the stop had begun). mpi_afl.slurm names what
happened.

With ch4:ofi (what mpi_afl.slurm gives a multi-node `srun --mpi=pmi2` launch) MPICH reports the dead peer as
an MPI error itself and aborts the step, with no segfault; the guard then has nothing to catch.

Only where the layout of `struct sigaction` is known (glibc on x86_64 and aarch64: the handler comes first);
elsewhere the guard does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import signal
import sys

EXIT_PEER_LOST = int(signal.SIGSEGV)   # what `_exit(signum)` gives; SIGBUS would give 7
_SIGNALS = (signal.SIGSEGV, signal.SIGBUS)
_SIGACTION_BYTES = 256   # larger than glibc's struct sigaction (152 bytes on x86_64 and aarch64)


def _setup():
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        libc.sigaction.restype = ctypes.c_int
        exit_now = ctypes.cast(libc._exit, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    action = ctypes.create_string_buffer(_SIGACTION_BYTES)   # empty mask, no flags
    ctypes.memmove(action, ctypes.byref(ctypes.c_void_p(exit_now)), ctypes.sizeof(ctypes.c_void_p))
    saved = {sig: ctypes.create_string_buffer(_SIGACTION_BYTES) for sig in _SIGNALS}
    return libc, action, saved


_STATE = _setup()


_depth = 0   # guards nest (stop() polls): only the outermost one swaps the handlers


@contextlib.contextmanager
def guard():
    """Inside: SIGSEGV/SIGBUS end the process with exit code EXIT_PEER_LOST; after: the previous handlers."""
    global _depth
    if _STATE is None or _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    libc, action, saved = _STATE
    for sig in _SIGNALS:
        libc.sigaction(sig, action, saved[sig])
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        for sig in _SIGNALS:
            libc.sigaction(sig, saved[sig], None)
