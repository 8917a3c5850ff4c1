"""One client job: local training from a global version.

docs/algorithms.md §1: a fixed number of local iterations (the client's data cycles
when exhausted), cross-entropy, an optimizer created fresh for every job, and a
random stream (batch order, augmentation) that depends only on
(run seed, client id, job index), never on the rank or on global RNG state.
Data are tensors already on the device; batches are index slices (docs/design.md
"Data"), not a DataLoader per job.
"""

import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpi_afl.augment import random_crop_flip
from mpi_afl.models.flat import flatten, load_flat
from mpi_afl.transport.messages import ClientUpdate, JobSpec


def _adam(params: Iterable[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    # Adam keeps its default betas: `momentum` is the SGD setting and unused here.
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _sgd(params: Iterable[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adam": _adam, "sgd": _sgd}


def job_generator(seed: int, client_id: int, job_index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator whose stream is a function of (seed, client, job) only.

    SeedSequence hashes the triple, so nearby triples give unrelated streams;
    the 63-bit mask keeps the value a valid non-negative int64 seed."""
    state = np.random.SeedSequence([seed, client_id, job_index]).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state) & (2**63 - 1))
    return gen


def train_job(model: nn.Module, base: torch.Tensor, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, *,
              iterations: int, batch_size: int, optimizer: str, lr: float, momentum: float, weight_decay: float,
              augment: bool, seed: int, job: JobSpec, trainer=None) -> ClientUpdate:
    """Train `model` from the flat state `base` on the samples `x[indices]`, `y[indices]` for `job`.

    `model`, `base`, `x`, `y` and `indices` must be on the same device. Each
    pass over the client's data is a fresh permutation from the job generator,
    cut into batches of `batch_size` (the last one partial, as a shuffling
    DataLoader gives); a client with fewer samples than `batch_size` uses all
    of them at every step. `trainer` (client/trainer.py, a `client.trainer` plug-in): its `start` runs once
    the base model is loaded and its `loss` replaces the cross-entropy."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    n = len(indices)
    if n == 0:
        raise ValueError(f"client {job.client_id} has no training samples")
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be >= 1, got {iterations} and {batch_size}")
    start = time.perf_counter()
    load_flat(model, base)
    model.train()
    if trainer is not None:
        trainer.start(model, base)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = job_generator(seed, job.client_id, job.job_index, device=x.device)
    # Summed on the device and read once at the end: no host sync per step.
    total_loss = torch.zeros((), device=x.device)
    pos = 0
    for _ in range(iterations):
        if pos == 0:
            perm = torch.randperm(n, generator=gen, device=indices.device)
        batch = indices[perm[pos:pos + batch_size]]
        pos = pos + batch_size if pos + batch_size < n else 0
        xb, yb = x[batch], y[batch]
        if augment:
            xb = random_crop_flip(xb, gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb) if trainer is None else trainer.loss(model, model(xb), yb)
        loss.backward()
        opt.step()
        total_loss += loss.detach()
    delta = flatten(model) - base
    mean_loss = total_loss.item() / iterations
    return ClientUpdate(job_index=job.job_index, client_id=job.client_id, base_version=job.base_version,
                        num_samples=n, loss=mean_loss, compute_seconds=time.perf_counter() - start, delta=delta)
