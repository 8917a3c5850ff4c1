"""What the server loop needs of a transport: `ServerMPI` (mpi.py) and `LocalTransport` (local.py) both
provide it, and tests/test_transport.py checks both against the same contract."""

from typing import Protocol, runtime_checkable

import torch

from .messages import Arrival, JobSpec


@runtime_checkable
class Transport(Protocol):
    workers: list[int]   # the worker ranks jobs go to
    queue_depth: int     # jobs a worker may have outstanding (queued or training)

    def send_job(self, worker: int, job: JobSpec, model: torch.Tensor) -> None:
        """Start sending `job` with its base `model` to `worker`; returns at once (`model` must stay unchanged)."""

    def poll(self) -> list[Arrival]:
        """The updates received since the last call (possibly none); never blocks for long."""

    def stop(self) -> None:
        """End the workers: every job sent is accounted for, late updates are dropped, no request is left."""
