"""Entry point: `mpiexec -n R python -m mpi_afl.train [--config FILE] [overrides]`.

A run, in order: rank 0 parses and validates the config, locks and checks the run directory and broadcasts the
config (an error stops every rank with a non-zero exit; run/startup.py); every rank loads the same data and
partition from the seed and builds the same initial model (run/build.py); then rank 0 runs the server and the
others the worker loop or, with distill.ranks, the distillation group (run/group.py); at the stop rank 0 writes
the run's final files in one order (run/finish.py). With one process the server runs the jobs itself. Any
uncaught exception on any rank aborts the whole MPI job, so no rank is left hanging (run/errors.py).

Stop signals are recorded from the first line of `main()` (signals.py), before torch, MPI and the data load;
importing this module is cheap (torch is imported where it is used) so that nothing slow comes before. Exit
codes: 0 done or stopped by a signal, 1 a crash (traceback), 2 a bad input or environment (one line naming the
key or file), 3 the run diverged (one line; results and a checkpoint of the last finite version are written).
"""

from __future__ import annotations

import sys

from . import console, signals
from .config import ConfigError, from_dict
from .launch import world_mismatch
from .run.build import build, wire_server
from .run.errors import EXIT_CONFIG, collective_or_exit, config_error, fail
from .run.finish import finish
from .run.group import serve_group
from .run.startup import Setup, rank0_setup


def main(argv=None) -> int:
    signals.arm()   # first: importing torch, starting MPI and loading data take seconds
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    mismatch = world_mismatch(comm.Get_size(), MPI.Get_library_version().strip().splitlines()[0])
    if mismatch:   # every task sees it; the launcher's first task says it
        if mismatch[1]:
            console.error(mismatch[0])
        return EXIT_CONFIG
    try:
        return run(comm, argv)
    except SystemExit:
        raise
    except ConfigError as e:   # a plug-in's contract or the device, alike on every rank
        return config_error(comm, e)
    except BaseException as e:
        return fail(comm, e)


def run(comm, argv=None) -> int:
    setup = rank0_setup(argv) if comm.Get_rank() == 0 else Setup()
    try:
        return _run(comm, setup)
    finally:
        setup.release()
        if setup.final_error:
            console.error(setup.final_error)
        console.close_log()


def _run(comm, setup: Setup) -> int:
    import torch

    from .client.loop import run_worker
    from .placement import rank_record

    cfg = from_dict(collective_or_exit(comm, setup.result))
    # The virtual clock promises results independent of the rank count: one thread keeps CPU kernels' order fixed.
    torch.set_num_threads(1 if cfg.run.clock == "virtual" else cfg.run.threads)
    built = build(comm, cfg, setup)   # with a start-up point after each step that can fail

    rank = comm.Get_rank()
    if rank != 0:
        stats = serve_group(built) if built.role == "distil" else run_worker(comm, built.runner, cfg.server.queue_depth)
        comm.gather((stats, rank_record(rank, built.device, built.role)), root=0)
        return 0

    server = wire_server(comm, built, setup)

    def request_stop(signum: int) -> None:
        server.stop_requested = True
        console.server.info(f"signal {signals.name(signum)}: checkpointing and stopping after the update in hand")

    signals.on_stop(request_stop)   # also fires now for a signal that came since the last start-up point
    server.run()
    return finish(comm, server, built.device, setup)


if __name__ == "__main__":
    sys.exit(main())
