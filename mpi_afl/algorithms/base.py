"""The contract between the server loop and an aggregation algorithm.

An algorithm is tensor math on flat model vectors (docs/design.md "Algorithms as
plug-ins"). The server calls `on_update(update, ctx)` once per accepted
arrival, in processing order, and it returns one of:

- a tensor: the new global model (the server bumps the version);
- `None`: the update was only buffered, the global model is unchanged;
- a generator: server-side work in resumable slices (FedRevive, FedEcho).
  The loop calls `next()` on it, polling MPI and dispatching jobs between
  slices, until it returns (StopIteration.value), which is again a tensor or
  `None`. No other update is processed while a generator is running, so the
  algorithm sees arrivals strictly one at a time.

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

from dataclasses import dataclass, field
from typing import Callable, Generator, Union

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


@dataclass
class ServerContext:
    """What the server exposes to an algorithm (read-only except where noted)."""
    cfg: Config
    device: torch.device
    global_model: torch.Tensor                  # flat x_t (the server replaces it after each new version)
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
    stats: dict = field(default_factory=dict)   # counters and diagnostics an algorithm reports (summary.json)
    group: object = field(default_factory=lambda: Solo())   # the distillation group (distill/group.py)


Result = Union[torch.Tensor, None]
Outcome = Union[Result, Generator[None, None, Result]]


class Algorithm:
    """Base class: a name, the sync flag, and empty state by default."""

    name = "base"
    #: True for synchronous FedAvg: the server dispatches K jobs from one
    #: version and waits for all of them before dispatching more.
    synchronous = False
    #: methods that run on every rank of a distillation group (`distill.ranks` > 0, distill/group.py):
    #: sliced work `method(ctx, start, **extra)` whose teacher computations use the group's sums. Empty:
    #: the algorithm cannot use a group.
    group_methods: frozenset[str] = frozenset()

    def __init__(self, cfg: Config, ctx: ServerContext):
        self.cfg = cfg
        #: the aggregation weight (or beta) applied to the last update, for the run log
        self.last_weight = float("nan")
        #: a distilling algorithm's kd_checks row (runlog.schema.KD_CHECK_FIELDS but virtual_time) for the update
        #: just processed; the server logs it and sets it back to None
        self.kd_check: dict | None = None

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for a config this algorithm cannot run with (none by default)."""

    def on_update(self, update: Update, ctx: ServerContext) -> Outcome:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
