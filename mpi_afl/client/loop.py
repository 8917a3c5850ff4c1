"""The worker loop (ranks 1..R-1): take a job, train, send the update, repeat."""

import time

from ..transport.mpi import WorkerMPI
from .runner import JobRunner


def run_worker(comm, runner: JobRunner, queue_depth: int) -> dict:
    """Serve jobs until the server says stop; returns this worker's timing stats."""
    transport = WorkerMPI(comm, runner.size, queue_depth)
    t0 = time.perf_counter()
    jobs = 0
    while (got := transport.next_job()) is not None:
        job, msg = got
        transport.send_update(runner.run(job, msg.payload.to(runner.train_x.device)))
        transport.job_done()         # only now: the base payload was needed to form the delta
        jobs += 1
    wall = time.perf_counter() - t0
    transport.finish()
    return {"rank": comm.Get_rank(), "jobs": jobs, "wall_seconds": wall, "idle_seconds": transport.idle_seconds}
