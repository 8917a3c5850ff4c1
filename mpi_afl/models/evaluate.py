"""Model evaluation on a split: mean cross-entropy and accuracy, whole or in slices."""

from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch import nn

from mpi_afl.models.flat import load_flat
from mpi_afl.slices import drain


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
