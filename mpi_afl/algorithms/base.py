"""The contract between the server loop and an aggregation algorithm.

An algorithm is tensor math on flat model vectors (docs/design.md "Algorithms as
plug-ins"). The server calls `on_update(update, ctx)` once per accepted
arrival, in processing order, with `ctx` the run as the server stands at that
arrival (a frozen `ServerContext`: `version`, `global_model` and `snapshot`
are the current ones). It returns one of:

- an `Outcome`: the new global model (the server bumps the version) or `None`
  (the update was only buffered, the global model is unchanged), together with
  what the server logs of the update: its weight (run.h5 arrivals), a KD
  diagnostic row (run.h5 kd_checks) and notes for summary.json's
  `algorithm_stats` (running means, kept by the server: `add_notes`);
- a generator: server-side work in resumable slices (FedRevive, FedEcho).
  The loop calls `next()` on it, polling MPI and dispatching jobs between
  slices, until it returns (StopIteration.value), which is again an `Outcome`.
  The loop times the slices (distill_seconds in algorithm_stats). No other
  update is processed while a generator is running, so the algorithm sees
  arrivals strictly one at a time.

Ownership: `Update.delta` is borrowed (it may live in a receive buffer that
is reused after the call): copy what you keep. A returned model tensor is the
server's from then on (it becomes a version snapshot that jobs are sent from
without a copy): never modify it afterwards.

Everything an algorithm keeps between calls is in `state_dict()`, so a
checkpoint covers it and a resumed run continues bit-identically.

Config rules: `check_config(cfg)` (a classmethod) refuses a config the
algorithm cannot run with, raising ConfigError with one line that names the
key. Config validation calls it for the selected algorithm, built-in or
plug-in, after the rules that hold for every algorithm, on every parse.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..distill.group import Solo


@dataclass
class Update:
    """One accepted client result, as the algorithm sees it."""
    client_id: int
    job_index: int
    base_version: int
    staleness: int            # server version at processing time - base_version
    delta: torch.Tensor       # flat float32 on the server device: w_local - x_base (borrowed)
    num_samples: int
    loss: float


@dataclass(frozen=True)
class ServerContext:
    """What the server exposes to an algorithm: the run, and the server's state at the current arrival."""
    cfg: Config
    device: torch.device
    global_model: torch.Tensor                  # flat x_t, the current global model
    version: int
    snapshot: Callable[[int], torch.Tensor]     # version v -> flat x_v (kept while a job references v)
    make_model: Callable[[], nn.Module]         # a fresh module of the run's architecture on `device`
    param_mask: torch.Tensor                    # bool, True where the flat entry is a trainable parameter
    num_classes: int
    image_shape: tuple[int, int, int]           # (channels, height, width)
    data_mean: tuple[float, ...]
    data_std: tuple[float, ...]
    client_histograms: np.ndarray               # (num_clients, num_classes) true label counts (ablations only)
    kd_x: torch.Tensor | None = None            # real KD split (DD-FedRevive / proxy inputs), on device
    kd_y: torch.Tensor | None = None
    check_x: torch.Tensor | None = None         # fixed held-out images for the KD diagnostic (kd.loss_change)
    check_y: torch.Tensor | None = None
    group: object = field(default_factory=lambda: Solo())   # the distillation group (distill/group.py)


Note = tuple[str, dict[str, float]]   # (counter, {key: value}): one observation for algorithm_stats


@dataclass
class Outcome:
    """What an algorithm returns for one update."""
    model: torch.Tensor | None = None   # the new global model; None: buffered, the global model is unchanged
    weight: float = math.nan            # the aggregation weight (or beta) applied to the update (run.h5 arrivals)
    kd_check: dict | None = None        # a kd_checks row (runlog.KD_CHECK_FIELDS but virtual_time) of this update
    notes: list[Note] = field(default_factory=list)   # diagnostics for summary.json's algorithm_stats


Reply = Union[Outcome, Generator[object, None, Outcome]]


def add_notes(stats: dict, notes: Iterable[Note]) -> None:
    """Add each note (counter, values) to `stats`: increment stats[counter] and update the running mean
    stats[key] of every `values` entry over the observations counted there."""
    for count, values in notes:
        n = stats.get(count, 0) + 1
        stats[count] = n
        for key, value in values.items():
            mean = stats.get(key, 0.0)
            stats[key] = mean + (value - mean) / n


class Algorithm:
    """Base class: a name, the sync flag, and empty state by default."""

    name = "base"
    #: True for synchronous FedAvg: the server dispatches K jobs from one
    #: version and waits for all of them before dispatching more.
    synchronous = False
    #: methods that run on every rank of a distillation group (`distill.ranks` > 0, distill/group.py):
    #: sliced work `method(ctx, start, **extra)` whose teacher computations use the group's sums; what it
    #: returns on rank 0 is the algorithm's (the members' results are dropped). Empty: the algorithm cannot
    #: use a group.
    group_methods: frozenset[str] = frozenset()

    def __init__(self, cfg: Config, ctx: ServerContext):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for a config this algorithm cannot run with (none by default)."""

    def on_update(self, update: Update, ctx: ServerContext) -> Reply:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
