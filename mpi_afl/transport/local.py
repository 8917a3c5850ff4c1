"""One process, no mpiexec: the server runs each job itself when it polls.

With a queue depth of one the server hands over the job it wants next (the
earliest virtual finish time), so the one-process path computes exactly the
jobs, and in the order, that the virtual clock needs.
"""

import time

import torch

from ..client.runner import JobRunner, JobSpec
from .arrival import Arrival


class LocalTransport:
    workers = [0]
    queue_depth = 1

    def __init__(self, runner: JobRunner):
        self.runner = runner
        self.queue: list[tuple[JobSpec, torch.Tensor]] = []

    def send_job(self, worker: int, job: JobSpec, model: torch.Tensor) -> None:
        self.queue.append((job, model))

    def poll(self) -> list[Arrival]:
        if not self.queue:
            return []
        job, model = self.queue.pop(0)
        out = self.runner.run(job, model)
        if job.sleep_seconds > 0:
            time.sleep(job.sleep_seconds)
        delta = out.delta
        return [Arrival(out.job_index, out.client_id, out.base_version, out.num_samples, out.loss,
                        out.compute_seconds, delta, delta.numel() == self.runner.size, 0, 4 * delta.numel())]

    def stop(self) -> None:
        self.queue.clear()
