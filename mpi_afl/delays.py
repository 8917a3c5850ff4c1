"""Delay models: how long a client's job takes, in virtual time units.

Each client's means are drawn once from a mixture and kept for the run; each
job then samples download + train + upload around them (docs/algorithms.md §3.5).
A job's sample depends only on (seed, client, job index), so the virtual
clock is identical whichever rank runs the job and however many there are.
"""

from dataclasses import dataclass

import numpy as np

from .config.schema import DelayConfig

_STREAM = 0xDE1A  # separates the delay stream from other uses of the run seed


@dataclass(frozen=True)
class Schedule:
    train_shape: str
    train_means: tuple[float, ...]
    train_probs: tuple[float, ...]
    download: float
    upload_means: tuple[float, ...]
    upload_spread: float
    pareto_shape: float = 2.5


# docs/algorithms.md §3.5: the papers' default and "shifted" schedules, and "high": longer, heavier-tailed training
# times (a fifth of the clients average 6 units, the paper's means are <= 1.6; a Pareto(1.5) tail, infinite
# variance, gives occasional jobs many times their mean) with the paper's download and upload. By Little's law the
# mean staleness stays about K (the jobs in flight) whatever the delays; what grows is the tail (stragglers return
# hundreds of versions late) and the skew of participation towards fast clients. A job takes 2.6 units on average
# against the paper schedule's 1.6, so a budget of 32.5 units gives as many updates as the paper schedule's 20.
SCHEDULES = {
    "paper": Schedule("exponential", (1.0, 1.3, 1.6), (0.25, 0.5, 0.25), 0.1, (0.15, 0.25), 0.02),
    "shifted": Schedule("exponential", (0.1,), (1.0,), 0.02, (0.05, 0.10), 0.01),
    "high": Schedule("pareto", (1.0, 2.0, 6.0), (0.5, 0.3, 0.2), 0.1, (0.15, 0.25), 0.02, pareto_shape=1.5),
    "none": Schedule("constant", (1.0,), (1.0,), 0.0, (0.0,), 0.0),
}


def schedule_from(cfg: DelayConfig) -> Schedule:
    """The named schedule, or for "custom" the one the delays.* fields describe."""
    if cfg.schedule == "custom":
        return Schedule(cfg.train_shape, tuple(cfg.train_means), tuple(cfg.train_probs), cfg.download,
                        tuple(cfg.upload_means), cfg.upload_spread, cfg.pareto_shape)
    return SCHEDULES[cfg.schedule]


def mean_job_time(schedule: Schedule) -> float:
    """E[download + train + upload] of a job in virtual time units (every train shape keeps its mean)."""
    train = sum(m * p for m, p in zip(schedule.train_means, schedule.train_probs))
    return schedule.download + train + sum(schedule.upload_means) / len(schedule.upload_means)


def sample_train_time(shape: str, mean: float, rng: np.random.Generator, pareto_shape: float) -> float:
    """One training time with the given mean; every shape keeps E[t] = mean."""
    if shape == "exponential":
        return float(rng.exponential(mean))
    if shape == "constant":
        return float(mean)
    if shape == "uniform":
        return float(rng.uniform(0.0, 2.0 * mean))
    if shape == "halfnormal":  # E|N(0, s)| = s sqrt(2/pi)
        return float(abs(rng.normal(0.0, mean * np.sqrt(np.pi / 2.0))))
    if shape == "pareto":  # classic Pareto(x_m, a): mean a x_m / (a - 1)
        x_m = mean * (pareto_shape - 1.0) / pareto_shape
        return float(x_m * (1.0 + rng.pareto(pareto_shape)))
    raise ValueError(f"unknown delay shape {shape!r}; allowed: exponential, constant, uniform, halfnormal, pareto")


@dataclass(frozen=True)
class JobTimes:
    download: float
    train: float
    upload: float

    @property
    def total(self) -> float:
        return self.download + self.train + self.upload


class DelayModel:
    def __init__(self, cfg: DelayConfig, num_clients: int, seed: int):
        self.schedule = schedule_from(cfg)
        self.seed = seed
        s = self.schedule
        rng = np.random.default_rng([seed, _STREAM])
        self.train_mean = rng.choice(np.asarray(s.train_means), size=num_clients, p=np.asarray(s.train_probs))
        self.upload_mean = rng.choice(np.asarray(s.upload_means), size=num_clients)

    def job(self, client_id: int, job_index: int) -> JobTimes:
        s = self.schedule
        rng = np.random.default_rng([self.seed, _STREAM, client_id, job_index])
        train = sample_train_time(s.train_shape, float(self.train_mean[client_id]), rng, s.pareto_shape)
        m = float(self.upload_mean[client_id])
        upload = float(rng.uniform(m - s.upload_spread, m + s.upload_spread)) if s.upload_spread else m
        return JobTimes(s.download, train, upload)
