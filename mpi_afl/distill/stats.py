"""Feature statistics of a batch at every normalisation layer, for L_bn.

ALGORITHMS.md §3.3: the synthetic batch's per-channel mean and variance at
each normalisation/stat layer `l` are matched against the teacher's running
statistics with L2 norms (not squared):
    sum_l ||sigma^2_l(teacher) - sigma^2_l(x)||_2 + ||mu_l(teacher) - mu_l(x)||_2.
The research code's models return these statistics from `forward`; here a
forward hook on each BatchNorm/StatTracker reads the layer's input instead, so
any model built from `models.layers` works unchanged. Both layers keep
running statistics of their *input*, so the input is the right thing to match.
"""

import itertools

import torch
from torch import nn

from mpi_afl.models.layers import NORM_LAYERS


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dimension but the channel (dim 1)."""
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


class FeatureHooks:
    """Records the batch moments at every normalisation layer of `model` on each forward.

    Use `clear()` before a forward, `loss()` after it, and `remove()` when
    done (the hooks stay on the model until then). Layers without running
    statistics (BatchNorm with track_running_stats=False) are skipped."""

    def __init__(self, model: nn.Module):
        self.records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._device = next(itertools.chain(model.parameters(), model.buffers())).device
        self._handles = [m.register_forward_hook(self._record) for m in model.modules()
                         if isinstance(m, NORM_LAYERS) and getattr(m, "running_mean", None) is not None]

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        mean, var = batch_moments(inputs[0])
        self.records.append((module, mean, var))

    def clear(self) -> None:
        self.records = []

    def loss(self) -> torch.Tensor:
        """Sum over the recorded layers of the two L2 distances to the running statistics."""
        if not self.records:
            return torch.zeros((), device=self._device)
        return sum((m.running_var - var).norm(2) + (m.running_mean - mean).norm(2)
                   for m, mean, var in self.records)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.records = []
