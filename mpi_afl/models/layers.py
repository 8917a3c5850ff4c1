"""Normalisation layers the models can use.

`StatTracker` is the FedRevive research code's replacement for BatchNorm
(ALGORITHMS.md §3.3, "Model note"): it passes activations through unchanged
and only records per-channel running mean and variance, which the generator's
feature-statistics loss L_bn matches against.
"""

import torch
from torch import nn


class StatTracker(nn.Module):
    """Identity layer that tracks running per-channel mean/var in training mode.

    Buffers have the same names as BatchNorm's (`running_mean`,
    `running_var`) so the flat-vector helpers, the statistics reset after
    aggregation and the L_bn hooks treat both layers alike.
    """

    def __init__(self, num_features: int, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            with torch.no_grad():
                mean = x.mean(dim=dims)
                var = x.var(dim=dims, unbiased=False)
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
        return x


NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, StatTracker)


def make_norm(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """Build the normalisation layer named by `model.norm`."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "stat":
        return StatTracker(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; allowed: batchnorm, stat, none")


def reset_norm_statistics(model: nn.Module) -> None:
    """Set every normalisation layer's running stats to mean 0, var 1.

    FedRevive resets them after each aggregation (ALGORITHMS.md §3.1 step 5)."""
    for m in model.modules():
        if isinstance(m, NORM_LAYERS) and getattr(m, "running_mean", None) is not None:
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
