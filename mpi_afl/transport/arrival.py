"""What the server receives for one job: header fields plus the payload."""

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Arrival:
    job_index: int
    client_id: int
    base_version: int
    num_samples: int
    loss: float
    compute_seconds: float
    payload: torch.Tensor | None   # flat float32 delta (borrowed: valid until `release()`); None if unreadable
    size_ok: bool                  # False: the payload length did not match the model
    rank: int                      # the MPI rank it came from (0 in one process)
    nbytes: int                    # payload bytes (the header excluded: the same with or without MPI)
    release: Callable[[], None] = lambda: None   # hands the receive buffer back to the pool
