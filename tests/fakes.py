"""Fakes of the server loop for algorithm tests: the ServerContext, snapshots of every version, and what the
loop does with an algorithm's Outcome (`ServerLoop.apply`: the new version, algorithm_stats from its notes); `FakeServer` adds models on 8x8 images and client
jobs (tests/test_algorithms.py has one on hand-computed vectors).

Imported as a plain module (pytest puts tests/ on sys.path, as for mpi_helpers).
"""

from collections.abc import Callable
from dataclasses import replace
from types import GeneratorType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpi_afl.algorithms.base import ServerContext, Update, add_notes
from mpi_afl.config import Config
from mpi_afl.models.flat import flatten, load_flat, param_mask
from mpi_afl.models.layers import make_norm

SHAPE = (1, 8, 8)


class TinyNet(nn.Module):
    """conv3x3(4) -> `norm` -> relu -> 2x2 average pool -> linear, for 8x8 images."""

    def __init__(self, norm: str, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(SHAPE[0], 4, 3, padding=1)
        self.norm = make_norm(norm, 4)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1))


def small_distill(cfg: Config, **overrides) -> Config:
    """Set distillation settings small enough for 8x8 images and millisecond steps, then `overrides`."""
    d = cfg.distill
    d.nz, d.ngf, d.synth_batch, d.synth_steps, d.pool_size, d.probes = 8, 8, 8, 2, 32, 8
    for key, value in overrides.items():
        if not hasattr(d, key):
            raise ValueError(f"DistillConfig has no field {key!r}")
        setattr(d, key, value)
    return cfg


class ServerLoop:
    """The part of the server loop an algorithm sees: x_t, the version and snapshots of every version so far,
    in the ServerContext (`context`: its other fields); `apply` processes an update as the loop does."""

    def __init__(self, cfg: Config, x0: torch.Tensor, make_model: Callable[[], nn.Module], **context):
        self.snapshots = {0: x0}
        self.ctx = ServerContext(cfg=cfg, device=torch.device("cpu"), global_model=x0, version=0,
                                 snapshot=self.snapshots.__getitem__, make_model=make_model, **context)
        self.stats: dict = {}   # algorithm_stats, from the outcomes' notes
        self.last = None        # the last arrival's Outcome (weight, kd_check)

    def apply(self, alg, update: Update) -> tuple[str, torch.Tensor | None, int]:
        """alg.on_update(update) as the server loop runs it: returns (outcome kind, new model or None, slices).

        The kind is "generator" when on_update returned a generator (which is run to the end, counting its
        slices) and "direct" otherwise. The Outcome is kept in `last`, its notes go into `stats`, and a new
        model becomes the next version."""
        before = self.ctx.global_model.clone()
        outcome = alg.on_update(update, self.ctx)
        slices, kind = 0, "generator" if isinstance(outcome, GeneratorType) else "direct"
        if kind == "generator":
            while True:
                try:
                    next(outcome)
                    slices += 1
                except StopIteration as stop:
                    outcome = stop.value
                    break
        assert torch.equal(self.ctx.global_model, before), "an algorithm must not modify x_t in place"
        self.last = outcome
        add_notes(self.stats, outcome.notes)
        if outcome.model is not None:
            self.ctx = replace(self.ctx, version=self.ctx.version + 1, global_model=outcome.model)
            self.snapshots[self.ctx.version] = outcome.model
        return kind, outcome.model, slices


class FakeServer(ServerLoop):
    """The bits of the real server loop an algorithm sees, for models of `make_model` on 8x8 images.

    Client c holds 30 samples of class c and 10 of class c + 3 (mod classes).
    A client job's Delta comes from `stat_batches` batches of noise shifted by
    `input_shift` * c (running statistics) and Gaussian weight noise of scale
    `weight_noise`, all seeded by (client, base version)."""

    def __init__(self, cfg: Config, make_model: Callable[[], nn.Module], *, num_classes: int, num_clients: int,
                 stat_batches: int, input_shift: float, weight_noise: float, kd_data: bool = False):
        self.make_model = make_model
        self.stat_batches, self.input_shift, self.weight_noise = stat_batches, input_shift, weight_noise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            x0 = flatten(make_model())
        hist = np.zeros((num_clients, num_classes), dtype=np.int64)
        for c in range(num_clients):
            hist[c, [c % num_classes, (c + 3) % num_classes]] = [30, 10]
        g = torch.Generator().manual_seed(1)
        super().__init__(
            cfg, x0, make_model, param_mask=param_mask(make_model()), num_classes=num_classes, image_shape=SHAPE,
            data_mean=(0.5,), data_std=(0.25,), client_histograms=hist,
            kd_x=torch.randn(40, *SHAPE, generator=g) if kd_data else None,
            kd_y=torch.arange(40) % num_classes if kd_data else None)

    def client_delta(self, client: int, base: int) -> torch.Tensor:
        """A client job's Delta: running stats of client-specific noise batches and perturbed weights."""
        g = torch.Generator().manual_seed(1000 * client + base)
        model = self.make_model()
        load_flat(model, self.snapshots[base])
        model.train()
        with torch.no_grad():
            for _ in range(self.stat_batches):
                model(torch.randn(8, *SHAPE, generator=g) + client * self.input_shift)
            for p in model.parameters():
                p.add_(self.weight_noise * torch.randn(p.shape, generator=g))
        return flatten(model) - self.snapshots[base]

    def arrive(self, alg, client: int, base: int) -> tuple[str, torch.Tensor | None, int, torch.Tensor]:
        """Client `client`'s job from version `base` arrives: returns apply()'s (kind, new model or None,
        slices) and the job's delta."""
        delta = self.client_delta(client, base)
        update = Update(client_id=client, job_index=0, base_version=base, staleness=self.ctx.version - base,
                        delta=delta, num_samples=40, loss=1.0)
        return *self.apply(alg, update), delta
