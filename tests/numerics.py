"""Rounding bounds for tests that compare two float32 computations of the same quantity.

Two paths that add the same terms in different orders (a batched kernel against a loop, another CPU's
vector width, another torch release) give sums that differ by at most 2 * gamma_n * sum(|terms|) for a sum
of n terms, where gamma_n = n u / (1 - n u) and u = 2^-24 is float32's unit roundoff (Higham, "Accuracy
and Stability of Numerical Algorithms", 2nd ed., §3.1-3.5; fused multiply-adds only make it smaller). That
worst case assumes every rounding error has the same sign; rounding errors are independent and centred, and
then |error| <= lambda * sqrt(n) * u * sum(|terms|) except with probability 2 exp(-lambda^2 / 2)
(Higham and Mary, "A new approach to probabilistic rounding error analysis", SISC 2019). `reduction_bound`
uses that bound with lambda = 6.5 (a failure probability of 1e-9 per reduction) for each of the two paths,
summed to first order over the reductions one forward and backward pass of a model makes on a given input,
so a test's tolerance follows from the computation it checks, not from the machine it was first run on.
Compared norm-wise (`rel_diff`): a wrong teacher, temperature or batch changes the result by O(1), far above
these bounds (1e-4 to 1e-3 here).
"""

import torch
from torch import nn

from mpi_afl.models.layers import NORM_LAYERS

U = 2.0 ** -24
LAMBDA = 6.5   # 2 exp(-LAMBDA^2 / 2) ~ 1e-9: the chance that one reduction exceeds its bound


def gamma(n: int) -> float:
    """The probabilistic relative error bound of a sum of n float32 terms (module docstring)."""
    return LAMBDA * n ** 0.5 * U


def reduction_lengths(model: nn.Module, x: torch.Tensor) -> list[int]:
    """The length of every sum one forward and backward pass of `model` on `x` computes: per conv or linear
    layer its fan-in (forward), fan-out (input gradient) and batch x positions (weight gradient); per
    normalisation layer in train mode its batch x positions (the batch moments)."""
    lengths, hooks = [], []

    def record(module, inputs, output):
        inp = inputs[0]
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            positions = output.numel() // (output.shape[0] * output.shape[1])
            lengths.extend([module.in_channels // module.groups * kernel, module.out_channels * kernel,
                            inp.shape[0] * positions])
        elif isinstance(module, nn.Linear):
            lengths.extend([module.in_features, module.out_features, inp.numel() // module.in_features])
        elif isinstance(module, NORM_LAYERS) and module.training:
            lengths.append(inp.numel() // inp.shape[1])

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, *NORM_LAYERS)):
            hooks.append(m.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return lengths


def reduction_bound(model: nn.Module, x: torch.Tensor) -> float:
    """Sum of 2 * gamma(n) over `reduction_lengths(model, x)`: the first-order bound of the relative difference
    between two evaluations of the model's outputs and gradients that sum in different orders."""
    return sum(2 * gamma(n) for n in reduction_lengths(model, x))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
