"""One process, no mpiexec: the server runs each job itself when it polls.

With a queue depth of one the server hands over the job it wants next (the
earliest virtual finish time), so the one-process path computes exactly the
jobs, and in the order, that the virtual clock needs.
"""

from typing import Callable

import torch

from .messages import Arrival, ClientUpdate, JobSpec


class LocalTransport:
    workers = [0]
    queue_depth = 1

    def __init__(self, run_job: Callable[[JobSpec, torch.Tensor], ClientUpdate]):
        """`run_job`: a worker's computation of one job (client/runner.py `JobRunner.run`)."""
        self.run_job = run_job
        self.queue: list[tuple[JobSpec, torch.Tensor]] = []

    def send_job(self, worker: int, job: JobSpec, model: torch.Tensor) -> None:
        self.queue.append((job, model))

    def poll(self) -> list[Arrival]:
        if not self.queue:
            return []
        job, model = self.queue.pop(0)
        update = self.run_job(job, model)
        return [Arrival(update, 0, 4 * update.delta.numel())]

    def stop(self) -> None:
        self.queue.clear()
