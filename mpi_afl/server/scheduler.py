"""Jobs from creation to processing: the job heap, dispatch to workers, and the virtual clock.

Every job gets a virtual start and finish time from the delay model when it is created, whatever the clock.
Jobs not yet handed to a worker wait in a heap ordered by virtual finish time and go to the worker with the
fewest outstanding jobs, up to the transport's `queue_depth` each, so a worker always has its next job
queued while the server aggregates or distils. Which received result is processed next:

- **virtual**: strictly in `(finish_time, job_index)` order; the loop waits for the head job if it has not
  arrived yet, while workers keep computing the jobs behind it, so a run's result is the same for any
  number of ranks;
- **wall**: in the order the results really arrived.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..delays import DelayModel
from ..transport.messages import Arrival, JobSpec
from ..transport.protocol import Transport
from .versions import VersionStore

_CLIENT_STREAM = 0x5E7  # separates client sampling from other uses of the run seed


@dataclass
class Job:
    index: int
    client_id: int
    base_version: int
    start_time: float
    finish_time: float
    sleep_seconds: float
    worker: int = -1

    def spec(self) -> JobSpec:
        return JobSpec(self.index, self.client_id, self.base_version, self.sleep_seconds)


class Scheduler:
    def __init__(self, cfg: Config, transport: Transport, versions: VersionStore):
        self.cfg = cfg
        self.transport = transport
        self.versions = versions      # the server's snapshots: a job holds a reference to its base version
        self.delays = DelayModel(cfg.delays, cfg.data.num_clients, cfg.run.seed)
        self.rng = np.random.default_rng([cfg.run.seed, _CLIENT_STREAM])
        self.virtual = cfg.run.clock == "virtual"
        self.in_flight: dict[int, Job] = {}
        self.schedule: list[tuple[float, int]] = []     # virtual: (finish_time, job) of jobs in flight
        self.pending: list[tuple[float, int]] = []      # created, not yet sent to a worker
        self.outstanding = {w: 0 for w in transport.workers}
        self.arrived: dict[int, Arrival] = {}
        self.arrival_order: deque[int] = deque()        # wall: processing order
        self.busy = np.zeros(cfg.data.num_clients, dtype=bool)
        self.now = 0.0                                   # virtual time of the last processed result
        self.next_job = 0

    def new_job(self, base_version: int, client: int | None = None) -> None:
        """Create a job for `client` (default: a random idle client) from `base_version`."""
        if client is None:
            client = int(self.rng.choice(np.flatnonzero(~self.busy)))
        times = self.delays.job(client, self.next_job)
        sleep = times.train * self.cfg.delays.wall_scale if not self.virtual else 0.0
        job = Job(self.next_job, client, base_version, self.now, self.now + times.total, sleep)
        self.next_job += 1
        self.busy[client] = True
        self._add(job)

    def _add(self, job: Job) -> None:
        self.versions.acquire(job.base_version)
        self.in_flight[job.index] = job
        heapq.heappush(self.pending, (job.finish_time, job.index))
        if self.virtual:
            heapq.heappush(self.schedule, (job.finish_time, job.index))

    def refill(self, version: int, synchronous: bool) -> None:
        """Keep K jobs in flight; synchronous algorithms start a round only when the last one is done."""
        k = self.cfg.server.concurrency
        if synchronous and self.in_flight:
            return
        while len(self.in_flight) < k:
            self.new_job(version)

    def dispatch(self) -> None:
        depth = self.transport.queue_depth
        while self.pending:
            worker = min(self.outstanding, key=lambda w: (self.outstanding[w], w))
            if self.outstanding[worker] >= depth:
                return
            _, index = heapq.heappop(self.pending)
            job = self.in_flight[index]
            job.worker = worker
            self.transport.send_job(worker, job.spec(), self.versions.get(job.base_version))
            self.outstanding[worker] += 1

    def receive(self) -> tuple[int, list[Arrival]]:
        """Take in whatever has arrived: (how many arrived, those that match no job in flight: unknown,
        duplicate or from the wrong rank)."""
        arrivals = self.transport.poll()
        strays = []
        for a in arrivals:
            self.outstanding[a.rank] -= 1
            index = a.update.job_index
            job = self.in_flight.get(index)
            if job is None or index in self.arrived or job.worker != a.rank:
                strays.append(a)
                continue
            self.arrived[index] = a
            self.arrival_order.append(index)
        return len(arrivals), strays

    def next_ready(self) -> tuple[Job, Arrival] | None:
        """The next result to process, with its job, or None while it has not arrived."""
        if self.virtual:
            if not self.schedule or self.schedule[0][1] not in self.arrived:
                return None
            _, index = heapq.heappop(self.schedule)
        else:
            if not self.arrival_order:
                return None
            index = self.arrival_order.popleft()
        return self.in_flight.pop(index), self.arrived.pop(index)

    def advance(self, job: Job) -> None:
        """The clock moves to `job`'s finish time (wall: never backwards), and its client is free again."""
        self.busy[job.client_id] = False
        self.now = job.finish_time if self.virtual else max(self.now, job.finish_time)

    def next_time(self) -> float:
        """Virtual time of the next result to process (the head job; `now` in wall mode)."""
        return self.schedule[0][0] if self.virtual and self.schedule else self.now

    def resend(self, jobs: list[dict]) -> None:
        """After a restore: the jobs that were in flight (rows of `Job`), to be sent again (workers lost them)."""
        for row in jobs:
            self._add(Job(**{**row, "worker": -1}))
