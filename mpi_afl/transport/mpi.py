"""Nonblocking MPI transport on preallocated byte buffers (docs/design.md "Roles and messages").

Server side: a job is two `Isend`s, its header from a pooled buffer and then
the model straight from the version snapshot (no copy: snapshots are never
modified, and the snapshot stays referenced until its send completes). The
copy into a job buffer this replaces cost 0.6 ms per update at P = 1e6, and
dropping it raised bench/server_throughput.py from 303 to 364 updates/s
(medians of 3 on 2 shared cores). It cannot be one send of a derived
datatype: MPICH sends non-contiguous data through its pipelined shared-memory
path, which needs the sleeping sender's progress (~70 ms per 4 MB, against
~0.4 ms for the single-copy CMA path a contiguous buffer gets). Updates are
found with `Improbe` and received with `Mrecv` into pooled buffers, so a
message of the wrong size is received into scratch memory and rejected
instead of truncating or crashing.

Worker side: `queue_depth` slots always have a header and a model `Irecv`
posted, into the two parts of one `Message`, so the next job streams in while
the current one trains. MPI's non-overtaking rule matches a job's two sends
to one slot's two receives.

Shutdown is exact: STOP carries the number of jobs the server sent to that
worker; the worker receives every one of them (so no server `Isend` is left
unmatched), cancels its remaining receives, waits for its own sends, then
answers DONE. Blocking MPI calls busy-poll in MPICH, which starves other
ranks when cores are oversubscribed, so every wait here is `Test` plus a
short sleep that backs off while idle.
"""

import time
from collections import deque

import numpy as np
import torch
from mpi4py import MPI

from .backoff import Backoff
from .messages import (HEADER_BYTES, TAG_DONE, TAG_JOB, TAG_STOP, TAG_UPDATE, Arrival, ClientUpdate, JobSpec, Message,
                       job_header, message_bytes, read_job, read_update, update_header)
from .peer_loss import guard

# The requests of one message (or job), its pooled buffer, and an object to keep alive until they complete.
Sending = tuple[list[MPI.Request], Message, object]


def wait(request: MPI.Request) -> None:
    backoff = Backoff()
    while not request.Test():
        backoff.idle()


def reap(sending: list[Sending], free: list[Message], payload_len: int) -> tuple[list[Sending], list[Message]]:
    """Split in-flight sends into those still pending and the buffers now free (odd-sized ones are dropped)."""
    pending = []
    for entry in sending:
        if MPI.Request.Testall(entry[0]):
            if entry[1].payload.numel() == payload_len:
                free.append(entry[1])
        else:
            pending.append(entry)
    return pending, free


class ServerMPI:
    def __init__(self, comm: MPI.Comm, payload_len: int, queue_depth: int, first_worker: int = 1):
        """`first_worker`: ranks below it are the server and its distillation group (distill.ranks), not workers."""
        self.comm = comm
        self.payload_len = payload_len
        self.queue_depth = queue_depth
        self.workers = list(range(first_worker, comm.Get_size()))
        self.sent = {w: 0 for w in self.workers}
        self.sending: list[Sending] = []
        self.free_send: list[Message] = []   # job headers (payload-less messages)
        self.free_recv: list[Message] = []
        self.status = MPI.Status()

    # The server's MPI calls run under peer_loss.guard(): a dead peer ends this rank with exit code 11 instead
    # of a segmentation fault (peer_loss.py).
    def send_job(self, worker: int, job: JobSpec, model: torch.Tensor) -> None:
        with guard():
            self._send_job(worker, job, model)

    def _send_job(self, worker: int, job: JobSpec, model: torch.Tensor) -> None:
        self._reap()
        head = self.free_send.pop() if self.free_send else Message(0)
        job_header(head.header, job)
        # A no-op for the usual contiguous CPU snapshot; a GPU server model is copied to the host here.
        model = model.detach().to("cpu").contiguous()
        reqs = [self.comm.Isend([head.buf, MPI.BYTE], dest=worker, tag=TAG_JOB),
                self.comm.Isend([model.numpy(), MPI.BYTE], dest=worker, tag=TAG_JOB)]
        self.sending.append((reqs, head, model))
        self.sent[worker] += 1

    def _reap(self) -> None:
        """Recycle job headers whose sends completed."""
        self.sending, self.free_send = reap(self.sending, self.free_send, 0)

    def poll(self) -> list[Arrival]:
        with guard():
            return self._poll()

    def _poll(self) -> list[Arrival]:
        arrivals = []
        expected = message_bytes(self.payload_len)
        while True:
            m = self.comm.Improbe(MPI.ANY_SOURCE, TAG_UPDATE, self.status)
            if m is None:
                break
            nbytes, rank = self.status.Get_count(MPI.BYTE), self.status.Get_source()
            if nbytes != expected:
                scratch = np.empty(max(nbytes, HEADER_BYTES), dtype=np.uint8)
                m.Recv([scratch[:nbytes], MPI.BYTE])
                update = read_update(scratch[:HEADER_BYTES].view(np.float64), None)
                arrivals.append(Arrival(update, rank, max(nbytes - HEADER_BYTES, 0)))
                continue
            msg = self.free_recv.pop() if self.free_recv else Message(self.payload_len)
            m.Recv([msg.buf, MPI.BYTE])
            arrivals.append(Arrival(read_update(msg.header, msg.payload), rank, nbytes - HEADER_BYTES,
                                    release=lambda msg=msg: self.free_recv.append(msg)))
        self._reap()
        return arrivals

    def stop(self) -> None:
        """Tell every worker to stop, discard late updates, wait for every DONE."""
        with guard():
            self._stop()

    def _stop(self) -> None:
        counts = {w: np.array([self.sent[w]], dtype=np.float64) for w in self.workers}
        stops = [self.comm.Isend([counts[w], MPI.DOUBLE], dest=w, tag=TAG_STOP) for w in self.workers]
        done, backoff, empty = set(), Backoff(), np.zeros(1, dtype=np.float64)
        while len(done) < len(self.workers):
            for a in self.poll():
                a.release()
            if self.comm.Iprobe(MPI.ANY_SOURCE, TAG_DONE, self.status):
                src = self.status.Get_source()
                self.comm.Recv([empty, MPI.DOUBLE], source=src, tag=TAG_DONE)
                done.add(src)
                backoff.reset()
            else:
                backoff.idle()
        for req in stops:
            wait(req)
        for reqs, _, _ in self.sending:
            for req in reqs:
                wait(req)
        self.sending.clear()


class WorkerMPI:
    def __init__(self, comm: MPI.Comm, payload_len: int, queue_depth: int):
        self.comm = comm
        self.payload_len = payload_len
        self.slots: deque[Message] = deque(Message(payload_len) for _ in range(queue_depth))
        self.reqs: deque[list[MPI.Request]] = deque(self._post(m) for m in self.slots)
        self.stop_count = np.zeros(1, dtype=np.float64)
        self.stop_req = comm.Irecv([self.stop_count, MPI.DOUBLE], source=0, tag=TAG_STOP)
        self.received = 0
        self.sending: list[Sending] = []
        self.free_send: list[Message] = []
        self.idle_seconds = 0.0

    def _post(self, msg: Message) -> list[MPI.Request]:
        """The header and model receives of one job slot, posted in the order the server sends them."""
        return [self.comm.Irecv([msg.buf[:HEADER_BYTES], MPI.BYTE], source=0, tag=TAG_JOB),
                self.comm.Irecv([msg.buf[HEADER_BYTES:], MPI.BYTE], source=0, tag=TAG_JOB)]

    def next_job(self) -> tuple[JobSpec, Message] | None:
        """The next job and its buffer, or None once the server says stop."""
        backoff, t0 = Backoff(), time.perf_counter()
        try:
            while True:
                if self.stop_req.Test():
                    return None
                if MPI.Request.Testall(self.reqs[0]):
                    self.received += 1
                    msg = self.slots[0]
                    return read_job(msg.header), msg
                backoff.idle()
        finally:
            self.idle_seconds += time.perf_counter() - t0

    def job_done(self) -> None:
        """Re-post the head buffer (its job is finished) at the back of the queue."""
        msg = self.slots.popleft()
        self.reqs.popleft()
        self.slots.append(msg)
        self.reqs.append(self._post(msg))

    def send_update(self, update: ClientUpdate) -> None:
        self.sending, self.free_send = reap(self.sending, self.free_send, self.payload_len)
        n = update.delta.numel()
        msg = self.free_send.pop() if self.free_send and n == self.payload_len else Message(n)
        update_header(msg.header, update)
        msg.payload.copy_(update.delta)
        self.sending.append(([self.comm.Isend([msg.buf, MPI.BYTE], dest=0, tag=TAG_UPDATE)], msg, None))

    def finish(self) -> None:
        """After STOP: take the jobs still on their way, cancel the rest, say DONE."""
        total = int(self.stop_count[0])
        for pair in self.reqs:
            if self.received < total:
                for req in pair:
                    wait(req)
                self.received += 1
            else:
                for req in pair:
                    req.Cancel()
                    wait(req)
        for reqs, _, _ in self.sending:
            for req in reqs:
                wait(req)
        self.comm.Send([np.zeros(1, dtype=np.float64), MPI.DOUBLE], dest=0, tag=TAG_DONE)
