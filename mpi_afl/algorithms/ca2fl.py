"""CA2FL: cache-aided asynchronous FL (Wang et al., ICLR 2024; docs/algorithms.md §2).

The server caches the latest update h_i of every client (zeros at start) and
their mean h̄. Over a buffer S of M = `server.buffer_size` arrivals

    v_t     = h̄_t + (1/M) Σ_{i∈S} (Δ_i − h_i)
    x_{t+1} = x_t + η v_t                              (η = `server.lr`)

then h_i ← Δ_i for i ∈ S and h̄ is recomputed. The cached updates calibrate
the buffered step: clients that were not heard from recently still contribute
their last update through h̄, which counters the bias toward fast clients.

Choices this file makes (the paper leaves them open):

- **When the cache is written.** h_i ← Δ_i as soon as Δ_i arrives, and the
  correction Δ_i − h_i uses the cache as it stands at that moment; h̄_t is the
  mean at the start of the buffer. So a client that appears twice in one
  buffer contributes (Δ' − h_i) + (Δ'' − Δ') = Δ'' − h_i: its first buffered
  update counts as its cache entry for the second, and the latest update
  stays cached. With distinct clients this is exactly the formula above. In
  general Σ_S corrections = N (h̄_{t+1} − h̄_t), which the tests check.
- **h̄ without drift.** The cache keeps the running *sum* Σ_i h_i in float64
  and h̄ = sum / N. Each arrival adds (Δ_i − h_i), formed in float64 from
  float32 values, so after n arrivals the sum is off by about n · 1e-16
  relative — far below float32 resolution (6e-8) for any feasible run —
  whereas a float32 running mean would gather up to ~6e-8 relative rounding
  error per update, unbounded over a long run. The sum is checkpointed as is (not recomputed on load) so a resumed run is
  bit-identical.
- **Memory.** The cache is one model per client (N x D float32), kept in host
  memory, never on the GPU. Above `MEMMAP_THRESHOLD_BYTES` it lives in an
  anonymous (already unlinked) temporary file mapped with numpy.memmap, in
  `run.out` when that directory exists (HPC scratch, next to the run), else
  the system temp directory; the OS pages it in and out as needed.
- The logged weight is η/M, the factor each buffered correction Δ_i − h_i gets in
  x_{t+1}.
- CA2FL uses no staleness discount (the cache calibration replaces it).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from .base import Algorithm, Outcome, ServerContext, Update

#: A cache larger than this (N x D x 4 bytes) goes to a memory-mapped file.
MEMMAP_THRESHOLD_BYTES = 1 << 30


class UpdateCache:
    """The latest update h_i of each of N clients (rows of an N x D float32
    host array, zeros at start) and their running float64 sum."""

    def __init__(self, num_clients: int, dim: int, cache_dir: str | None = None,
                 memmap_threshold: int | None = None):
        self.num_clients = num_clients
        self.dim = dim
        threshold = MEMMAP_THRESHOLD_BYTES if memmap_threshold is None else memmap_threshold
        if num_clients * dim * 4 > threshold:
            # TemporaryFile is unlinked on creation: the space is freed when
            # the process ends, even after a crash. mode "w+" zero-fills it.
            handle = tempfile.TemporaryFile(prefix="ca2fl-cache-", dir=cache_dir)
            self.array: np.ndarray = np.memmap(handle, dtype=np.float32, mode="w+", shape=(num_clients, dim))
            handle.close()  # the mapping keeps the file alive
        else:
            self.array = np.zeros((num_clients, dim), dtype=np.float32)
        self.rows = torch.from_numpy(self.array)  # shares memory with the (memmapped) array
        self.total = torch.zeros(dim, dtype=torch.float64)

    @property
    def memmapped(self) -> bool:
        return isinstance(self.array, np.memmap)

    def mean(self) -> torch.Tensor:
        """h̄ = (Σ_i h_i) / N, float64 on the host."""
        return self.total / self.num_clients

    def replace(self, client_id: int, delta: torch.Tensor) -> torch.Tensor:
        """Set h_i ← delta; return the change delta − h_i_old (float64, host)."""
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client_id {client_id} is out of range; allowed: 0..{self.num_clients - 1}")
        if delta.shape != (self.dim,):
            raise ValueError(f"update has shape {tuple(delta.shape)}, the cache holds ({self.dim},) per client")
        new = delta.detach().to("cpu", torch.float32)
        row = self.rows[client_id]
        change = new.double() - row.double()
        self.total += change
        row.copy_(new)
        return change

    def state_dict(self) -> dict:
        """`rows` is a live view of the cache (no copy, which could double a
        multi-GiB footprint): write it out before the next update."""
        return {"rows": self.rows, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        rows = torch.as_tensor(state["rows"])
        if rows.shape != self.rows.shape:
            raise ValueError(f"checkpointed cache has shape {tuple(rows.shape)}, "
                             f"expected {tuple(self.rows.shape)} (num_clients x model size)")
        self.rows.copy_(rows)  # into the memmap too, when there is one
        self.total.copy_(torch.as_tensor(state["total"]))


class CachedAggregator:
    """CA2FL's calibrated buffer: `add` returns v_t once M updates are in."""

    def __init__(self, num_clients: int, dim: int, buffer_size: int, cache_dir: str | None = None,
                 memmap_threshold: int | None = None):
        self.buffer_size = buffer_size
        self.cache = UpdateCache(num_clients, dim, cache_dir, memmap_threshold)
        self.start_mean = torch.zeros(dim, dtype=torch.float64)  # h̄_t, taken at the buffer's first arrival
        self.correction = torch.zeros(dim, dtype=torch.float64)  # Σ_S (Δ_i − h_i)
        self.count = 0

    def add(self, client_id: int, delta: torch.Tensor) -> torch.Tensor | None:
        """Buffer one update; return v_t (float32, on `delta`'s device) when the buffer is full, else None."""
        if self.count == 0:
            self.start_mean.copy_(self.cache.mean())
        self.correction += self.cache.replace(client_id, delta)
        self.count += 1
        if self.count < self.buffer_size:
            return None
        v = self.start_mean + self.correction / self.buffer_size
        self.correction.zero_()
        self.count = 0
        return v.to(delta.device, torch.float32)

    def state_dict(self) -> dict:
        cache = self.cache.state_dict()
        return {"cache_rows": cache["rows"], "cache_total": cache["total"], "start_mean": self.start_mean,
                "correction": self.correction, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.cache.load_state_dict({"rows": state["cache_rows"], "total": state["cache_total"]})
        self.start_mean.copy_(torch.as_tensor(state["start_mean"]))
        self.correction.copy_(torch.as_tensor(state["correction"]))
        self.count = int(state["count"])


def cache_dir_for(out: str) -> str | None:
    """The run directory when it exists (the memmap file sits on the run's
    file system), else None for the system temp directory."""
    return out if os.path.isdir(out) else None


class CA2FL(Algorithm):
    name = "ca2fl"

    def __init__(self, cfg, ctx: ServerContext):
        super().__init__(cfg, ctx)
        self.aggregator = CachedAggregator(cfg.data.num_clients, ctx.global_model.numel(), cfg.server.buffer_size,
                                           cache_dir=cache_dir_for(cfg.run.out))
        self.weight = cfg.server.lr / cfg.server.buffer_size

    def on_update(self, update: Update, ctx: ServerContext) -> Outcome:
        v = self.aggregator.add(update.client_id, update.delta)
        if v is None:
            return Outcome(None, weight=self.weight)
        return Outcome(ctx.global_model + self.cfg.server.lr * v, weight=self.weight)

    def state_dict(self) -> dict:
        return self.aggregator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state)
