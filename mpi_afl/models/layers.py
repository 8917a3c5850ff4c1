"""Normalisation layers the models can use.

`StatTracker` is the FedRevive research code's replacement for BatchNorm
(docs/algorithms.md §3.3, "Model note"): it passes activations through unchanged
and only records per-channel running mean and variance, which the generator's
feature-statistics loss L_bn matches against.
"""

import torch
from torch import nn


class StatTracker(nn.Module):
    """Identity layer that tracks running per-channel mean/var in training mode.

    Buffers have the same names as BatchNorm's (`running_mean`,
    `running_var`) so the flat-vector helpers, the statistics reset after
    aggregation and the L_bn hooks treat both layers alike. `tracked` counts
    the updates since the last reset (a float, so it travels in the flat
    vector): `tracked_statistics` uses it to remove the reset value's share
    from the running statistics.
    """

    def __init__(self, num_features: int, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("tracked", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            with torch.no_grad():
                mean = x.mean(dim=dims)
                var = x.var(dim=dims, unbiased=False)
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
                self.tracked.add_(1.0)
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


def tracked_statistics(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (mean, variance) that layer `m`'s running statistics estimate.

    BatchNorm: its running statistics as they are. StatTracker: bias-corrected
    for the reset. After a reset to (0, 1) and n updates with momentum m the
    buffers hold d * (0, 1) + (1 - d) * EMA with d = (1 - m)^n, so
    EMA = (mean / (1 - d), (var - d) / (1 - d)), as Adam corrects its moments.
    Without the correction, a client's 10 local iterations after FedRevive's
    reset leave 0.9^10 = 35% of each statistic at the reset value (relative
    error of the L_bn targets 0.38-0.76, measured in the issue that added this).
    With n = 0 (never updated) the buffers are returned as they are."""
    tracked = getattr(m, "tracked", None)
    if tracked is None:
        return m.running_mean, m.running_var
    d = (1.0 - m.momentum) ** tracked
    keep = 1.0 - d
    safe = torch.where(tracked > 0, keep, torch.ones_like(keep))
    mean = torch.where(tracked > 0, m.running_mean / safe, m.running_mean)
    var = torch.where(tracked > 0, ((m.running_var - d) / safe).clamp_min(0.0), m.running_var)
    return mean, var


def reset_norm_statistics(model: nn.Module) -> None:
    """Set every StatTracker's running stats to mean 0, var 1 (and its update count to 0).

    FedRevive resets them after each aggregation (docs/algorithms.md §3.1 step 5);
    the research code resets its stat trackers only. BatchNorm layers keep the
    aggregated statistics, which they need for evaluation (a reset would make
    the global model normalise with mean 0 / variance 1)."""
    for m in model.modules():
        if isinstance(m, StatTracker):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.tracked.zero_()
