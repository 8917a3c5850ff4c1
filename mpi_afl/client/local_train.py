"""One client job: local training from a global version, and model evaluation.

docs/algorithms.md §1: a fixed number of local iterations (the client's data cycles
when exhausted), cross-entropy, an optimizer created fresh for every job, and a
random stream (batch order, augmentation) that depends only on
(run seed, client id, job index), never on the rank or on global RNG state.
Data are tensors already on the device; batches are index slices (docs/design.md
"Data"), not a DataLoader per job.
"""

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpi_afl.augment import random_crop_flip
from mpi_afl.models.flat import flatten, load_flat
from mpi_afl.slices import drain


@dataclass
class JobResult:
    """What a job sends back: Δ = w_local − x_v over the flat layout (running
    statistics included), the client's sample count, its mean training loss
    over the job's iterations and the wall seconds the job took."""
    delta: torch.Tensor
    num_samples: int
    loss: float
    seconds: float


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
              augment: bool, seed: int, client_id: int, job_index: int, trainer=None) -> JobResult:
    """Train `model` from the flat state `base` on the samples `x[indices]`, `y[indices]`.

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
        raise ValueError(f"client {client_id} has no training samples")
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be >= 1, got {iterations} and {batch_size}")
    start = time.perf_counter()
    load_flat(model, base)
    model.train()
    if trainer is not None:
        trainer.start(model, base)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = job_generator(seed, client_id, job_index, device=x.device)
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
    return JobResult(delta=delta, num_samples=n, loss=mean_loss, seconds=time.perf_counter() - start)


def evaluate(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the flat state `flat` on (x, y).

    Loads `flat` into `model` (overwriting its state) and runs in eval mode, so
    BatchNorm uses its running statistics and StatTracker records nothing."""
    return drain(evaluate_slices(model, flat, x, y, batch_size))


def evaluate_slices(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 1024) -> Generator[None, None, tuple[float, float]]:
    """`evaluate` as a generator that yields after every batch, so the server
    can keep receiving and dispatching while it evaluates (a full Fashion-MNIST
    test + validation pass takes seconds on one CPU core)."""
    n = len(x)
    if n == 0:
        raise ValueError("cannot evaluate on an empty set")
    load_flat(model, flat)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, n, batch_size):
        with torch.no_grad():   # entered per batch: grad mode must not leak to the caller between slices
            logits = model(x[i:i + batch_size])
            yb = y[i:i + batch_size]
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(dim=1) == yb).sum()
        yield
    return loss_sum.item() / n, correct.item() / n
