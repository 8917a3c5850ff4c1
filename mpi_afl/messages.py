"""Message vocabulary: tags, the fixed header, and flat-buffer helpers.

A hot-path message is a fixed header of `HEADER_FIELDS` float64 values
(integers up to 2**53 are exact) plus the flat float32 model payload, laid
out in one contiguous byte buffer (`Message`) and sent as MPI.BYTE with
uppercase calls, so nothing is pickled (docs/design.md "Roles and messages").
An update (worker -> server) is that one buffer, found with `Improbe`. A job
(server -> worker) goes as two sends on TAG_JOB, the header and then the
model straight from the server's version snapshot (no copy); the worker posts
two receives into the two halves of its `Message`, and MPI's non-overtaking
rule pairs them.
"""

import numpy as np
import torch

# Tags. Jobs go server -> worker, updates worker -> server.
TAG_JOB = 11
TAG_UPDATE = 12
TAG_STOP = 13      # server -> worker: finish, send DONE
TAG_DONE = 14      # worker -> server: nothing more will come from me

# Header layout (float64 slots). Jobs and updates share it.
HEADER_FIELDS = (
    "client_id", "job_index", "base_version", "num_samples", "loss",
    "compute_seconds", "sleep_seconds", "payload_len",
)
HEADER = {name: i for i, name in enumerate(HEADER_FIELDS)}
HEADER_BYTES = 8 * len(HEADER_FIELDS)


def message_bytes(payload_len: int) -> int:
    return HEADER_BYTES + 4 * payload_len


class Message:
    """A preallocated message buffer with typed views on header and payload."""

    def __init__(self, payload_len: int):
        self.buf = np.zeros(message_bytes(payload_len), dtype=np.uint8)
        self.header = self.buf[:HEADER_BYTES].view(np.float64)
        # torch view of the payload (zero copy): what the model code reads/writes.
        self.payload = torch.from_numpy(self.buf[HEADER_BYTES:].view(np.float32))

    def set(self, **fields) -> None:
        for name, value in fields.items():
            self.header[HEADER[name]] = value

    def get(self, name: str) -> float:
        return float(self.header[HEADER[name]])

    def geti(self, name: str) -> int:
        return int(self.header[HEADER[name]])
