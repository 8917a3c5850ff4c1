"""The paired t-test of per-seed differences, without scipy: its own regularized incomplete beta function
(Numerical Recipes' continued fraction) and Student's t CDF (tests/test_results.py checks them against
known values). Used by `mpi-afl report` on experiments (experiment/tables.py)."""

from __future__ import annotations

import math

from mpi_afl.results import mean_std


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):   # where the fraction converges fast; the symmetry I_x(a,b) = 1 - I_1-x(b,a)
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with `df` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))   # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def paired_comparison(a: dict, b: dict) -> dict | None:
    """Paired per-seed differences a - b over the seeds both have (`a`, `b`: {seed: value}, None values
    skipped): seeds, per-seed differences, their mean and sample std, how many are > 0 and < 0, and the
    two-sided p value of a paired t-test (None with fewer than 2 pairs; 0 or 1 when every difference is equal).
    None when no seed has both values."""
    seeds = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    if not seeds:
        return None
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    mean, std = mean_std(diffs)
    p = None
    if len(diffs) > 1:
        if std == 0:
            p = 1.0 if mean == 0 else 0.0
        else:
            t, df = mean / (std / math.sqrt(len(diffs))), len(diffs) - 1
            p = regularized_beta(df / 2.0, 0.5, df / (df + t * t))   # P(|T| >= |t|)
    return {"seeds": seeds, "differences": diffs, "mean": mean, "std": std,
            "positive": sum(d > 0 for d in diffs), "negative": sum(d < 0 for d in diffs), "p_value": p}
