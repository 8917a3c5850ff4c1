"""Feature statistics of a batch at every normalisation layer, for L_bn.

docs/algorithms.md §3.3: the synthetic batch's per-channel mean and variance at
each normalisation/stat layer `l` are matched against the teacher's running
statistics with L2 norms (not squared):
    sum_l ||sigma^2_l(teacher) - sigma^2_l(x)||_2 + ||mu_l(teacher) - mu_l(x)||_2.
The research code's models return these statistics from `forward`; here a
forward hook on each BatchNorm/StatTracker reads the layer's input instead
(distill/ensemble.py), so any model built from `models.layers` works
unchanged. Both layers keep running statistics of their *input*, so the input
is the right thing to match; the teacher side is `layers.tracked_statistics`.
"""

import torch


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dimension but the channel (dim 1)."""
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)
