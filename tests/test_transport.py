"""The transport contract (transport/protocol.py), one check run against both transports: LocalTransport in
this process, ServerMPI under `mpiexec -n 2` (this file as the script: rank 0 checks, rank 1 is a worker)."""

import subprocess
import sys

import pytest
import torch

from mpi_afl.transport.backoff import Backoff
from mpi_afl.transport.messages import ClientUpdate, JobSpec
from mpi_afl.transport.protocol import Transport

SIZE = 6   # floats per model


class EchoRunner:
    """A `JobRunner` stand-in: the update of job j from base x is x + j, with the job's header fields."""

    size = SIZE
    train_x = torch.empty(0)   # run_worker moves job payloads to train_x.device

    def run(self, job: JobSpec, base: torch.Tensor) -> ClientUpdate:
        return ClientUpdate(job.job_index, job.client_id, job.base_version, num_samples=10 + job.job_index,
                            loss=0.5, compute_seconds=0.25, delta=base + job.job_index)


def check_contract(transport) -> None:
    """Send every worker `queue_depth` jobs, receive each update once, with its header and payload intact."""
    assert isinstance(transport, Transport)
    assert transport.workers and transport.queue_depth >= 1
    models, sent = {}, {}
    for worker in transport.workers:
        for _ in range(transport.queue_depth):
            index = len(sent)
            models[index] = torch.arange(SIZE, dtype=torch.float32) * (index + 1)
            sent[index] = worker
            transport.send_job(worker, JobSpec(index, client_id=index % 3, base_version=index // 2,
                                               sleep_seconds=0.0), models[index])
    received, backoff = {}, Backoff()
    for _ in range(100_000):
        if len(received) == len(sent):
            break
        arrivals = transport.poll()
        for a in arrivals:
            u = a.update
            assert u.job_index not in received and a.rank == sent[u.job_index]
            assert (u.client_id, u.base_version) == (u.job_index % 3, u.job_index // 2)
            assert (u.num_samples, u.loss, u.compute_seconds) == (10 + u.job_index, 0.5, 0.25)
            assert a.nbytes == 4 * SIZE and torch.equal(u.delta.cpu(), models[u.job_index] + u.job_index)
            received[u.job_index] = a
            a.release()
        if arrivals:
            backoff.reset()
        else:
            backoff.idle()
    assert sorted(received) == sorted(sent)
    assert transport.poll() == []
    transport.stop()


@pytest.mark.parametrize("kind", ["LocalTransport", "ServerMPI"])
def test_transport_contract(kind):
    if kind == "LocalTransport":
        from mpi_afl.transport.local import LocalTransport
        check_contract(LocalTransport(EchoRunner().run))
        return
    from mpi_helpers import HANG_GUARD, MPIEXEC, env
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, __file__], capture_output=True, text=True,
                          timeout=HANG_GUARD, env=env())
    assert done.returncode == 0 and "contract ok" in done.stdout, done.stdout + done.stderr


if __name__ == "__main__":   # under mpiexec -n 2
    from mpi4py import MPI

    from mpi_afl.client.loop import run_worker
    from mpi_afl.transport.mpi import ServerMPI
    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 0:
        check_contract(ServerMPI(comm, SIZE, queue_depth=2))
        print("contract ok", flush=True)
    else:
        run_worker(comm, EchoRunner(), queue_depth=2)
