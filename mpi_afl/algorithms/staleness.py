"""Staleness weights s(tau) and FedRevive's beta(tau), as plain functions.

Every function maps a staleness tau >= 0 (in server versions) to a float.
`discount(name, tau, cfg)` is the s(tau) of FedAsync / FedBuff (docs/algorithms.md
§2); `beta(name, tau, cfg)` is the KD share of FedRevive's blend (§3.2).
"""

import math

from ..config.schema import DistillConfig, ServerConfig


def cosine_beta(tau: float, s_max: float) -> float:
    """Eq. 3: beta = 1 - (1 + cos(pi tau / (2 s_max))) / 2 for tau <= 2 s_max, else 1.

    beta(0) = 0 (a fresh update skips KD), beta(s_max) = 0.5, beta(>= 2 s_max) = 1."""
    if tau >= 2 * s_max:
        return 1.0
    value = 1.0 - 0.5 * (1.0 + math.cos(math.pi * tau / (2.0 * s_max)))
    return min(1.0, max(0.0, value))


def _polynomial(tau: float, a: float) -> float:
    return (tau + 1.0) ** (-a)


def _hinge(tau: float, a: float, b: float) -> float:
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


def discount(name: str, tau: float, cfg: ServerConfig) -> float:
    """s(tau) for FedAsync (Xie et al. 2019) and FedBuff (Nguyen et al. 2022)."""
    if name in ("none", "constant"):
        return 1.0
    if name == "polynomial":
        return _polynomial(tau, cfg.staleness_a)
    if name == "hinge":
        return _hinge(tau, cfg.staleness_a, cfg.staleness_b)
    if name == "sqrt":  # FedBuff's 1 / sqrt(1 + tau)
        return 1.0 / math.sqrt(1.0 + tau)
    if name == "cosine":  # AFL-DW style: keep 1 - beta
        return 1.0 - cosine_beta(tau, cfg.s_max)
    raise ValueError(f"unknown staleness function {name!r}; allowed: none, constant, polynomial, hinge, sqrt, cosine")


def step_beta(tau: float, s_max: float) -> float:
    """The research code's step-wise beta: 0, 0.25, 0.5, 0.75 on the quarters of [0, 2 s_max), then 1.

    Its base threshold is `factor * K / B` (1.5 * 100 / 1 = 150 in the CIFAR
    configs), which is 2 s_max with s_max = 75; expressing it through s_max
    keeps every beta variant on the same staleness scale. Each threshold is
    exclusive: tau = s_max / 2 already gets 0.25."""
    base = 2.0 * s_max
    for quarter, value in ((0.25, 0.0), (0.5, 0.25), (0.75, 0.5), (1.0, 0.75)):
        if tau < quarter * base:
            return value
    return 1.0


def beta(tau: float, distill: DistillConfig, s_max: float) -> float:
    """KD share beta(tau) in [0, 1] (docs/algorithms.md §3.2 and the research code's alternatives)."""
    name = distill.beta
    if name == "cosine":
        return cosine_beta(tau, s_max)
    if name == "exponential":
        return 1.0 - math.exp(-distill.beta_lambda * tau)
    if name == "linear":
        return min(1.0, distill.beta_gamma * tau)
    if name == "step":
        return step_beta(tau, s_max)
    raise ValueError(f"unknown beta function {name!r}; allowed: cosine, exponential, linear, step")
