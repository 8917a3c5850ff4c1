"""The wire: tags, the fixed header, flat message buffers, and the records a job and an update travel as.

A hot-path message is a fixed header of `HEADER_FIELDS` float64 values
(integers up to 2**53 are exact) plus the flat float32 model payload, laid
out in one contiguous byte buffer (`Message`) and sent as MPI.BYTE with
uppercase calls, so nothing is pickled (docs/design.md "Roles and messages").
An update (worker -> server) is that one buffer, found with `Improbe`. A job
(server -> worker) goes as two sends on TAG_JOB, the header and then the
model straight from the server's version snapshot (no copy); the worker posts
two receives into the two halves of its `Message`, and MPI's non-overtaking
rule pairs them.

Header slots are read and written by name only (`HEADER`), through `job_header`/`update_header` and
`read_job`/`read_update`, so the layout is defined once.

Records: a job is a `JobSpec`; what a worker sends back is a `ClientUpdate` (made by local training,
client/local_train.py, and received as it was sent); the server receives it as an `Arrival`, the update
plus where it came from. The algorithm's view of an accepted one is algorithms/base.py's `Update`.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# Tags. Jobs go server -> worker, updates worker -> server.
TAG_JOB = 11
TAG_UPDATE = 12
TAG_STOP = 13      # server -> worker: finish, send DONE
TAG_DONE = 14      # worker -> server: nothing more will come from me

# Header layout (float64 slots). Jobs and updates share it: a job fills the first three and sleep_seconds.
HEADER_FIELDS = (
    "client_id", "job_index", "base_version", "num_samples", "loss", "compute_seconds", "sleep_seconds",
)
HEADER = {name: i for i, name in enumerate(HEADER_FIELDS)}
HEADER_BYTES = 8 * len(HEADER_FIELDS)


@dataclass
class JobSpec:
    """What a worker needs to know about a job (the header of a job message)."""
    job_index: int
    client_id: int
    base_version: int
    sleep_seconds: float   # injected straggling, slept after the job (wall clock, delays.wall_scale)


@dataclass
class ClientUpdate:
    """What a job sends back (the header and payload of an update): Δ = w_local − x_base over the flat layout
    (running statistics included), the client's sample count, its mean training loss over the job's
    iterations and the wall seconds the training took."""
    job_index: int
    client_id: int
    base_version: int
    num_samples: int
    loss: float
    compute_seconds: float
    delta: torch.Tensor | None   # flat float32; None when a received payload had the wrong size


@dataclass
class Arrival:
    """An update as the server receives it."""
    update: ClientUpdate           # its delta is borrowed: valid until `release()`
    rank: int                      # the MPI rank it came from (0 in one process)
    nbytes: int                    # payload bytes (the header excluded: the same with or without MPI)
    release: Callable[[], None] = lambda: None   # hands the receive buffer back to the pool


def message_bytes(payload_len: int) -> int:
    return HEADER_BYTES + 4 * payload_len


def job_header(header: np.ndarray, job: JobSpec) -> None:
    for name in ("client_id", "job_index", "base_version", "sleep_seconds"):
        header[HEADER[name]] = getattr(job, name)


def read_job(header: np.ndarray) -> JobSpec:
    return JobSpec(job_index=int(header[HEADER["job_index"]]), client_id=int(header[HEADER["client_id"]]),
                   base_version=int(header[HEADER["base_version"]]),
                   sleep_seconds=float(header[HEADER["sleep_seconds"]]))


def update_header(header: np.ndarray, update: ClientUpdate) -> None:
    for name in ("client_id", "job_index", "base_version", "num_samples", "loss", "compute_seconds"):
        header[HEADER[name]] = getattr(update, name)


def read_update(header: np.ndarray, delta: torch.Tensor | None) -> ClientUpdate:
    return ClientUpdate(job_index=int(header[HEADER["job_index"]]), client_id=int(header[HEADER["client_id"]]),
                        base_version=int(header[HEADER["base_version"]]),
                        num_samples=int(header[HEADER["num_samples"]]), loss=float(header[HEADER["loss"]]),
                        compute_seconds=float(header[HEADER["compute_seconds"]]), delta=delta)


class Message:
    """A preallocated message buffer with typed views on header and payload."""

    def __init__(self, payload_len: int):
        self.buf = np.zeros(message_bytes(payload_len), dtype=np.uint8)
        self.header = self.buf[:HEADER_BYTES].view(np.float64)
        # torch view of the payload (zero copy): what the model code reads/writes.
        self.payload = torch.from_numpy(self.buf[HEADER_BYTES:].view(np.float32))
