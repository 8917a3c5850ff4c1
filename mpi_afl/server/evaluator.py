"""Evaluations of the global model, their timing rows, and the progress lines.

A version is evaluated every `run.eval_every` versions, or on the virtual-time grid of
`run.eval_every_time`. An evaluation is queued and runs in slices (one batch each) between loop turns, so
the server keeps aggregating and creating jobs meanwhile (a full pass is seconds of CPU); with each finished
one the server writes its evals row, the timing rows of the interval since the previous one and a progress
line (docs/design.md "Progress"). The progress lines' versions never decrease: while an evaluation is pending,
the heartbeat reports the version (and virtual time) of the earliest one pending, whose line comes next.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .. import console
from ..config import Config
from ..models.evaluate import evaluate_slices
from ..storage.runlog import RunLog
from . import progress

EVAL_BATCH = 256        # images per evaluation slice: ~0.1 s of CPU for the 28x28 CNN, so arrivals wait little


@dataclass
class EvalPoint:
    version: int
    wall_time: float
    virtual_time: float
    test_loss: float
    test_accuracy: float
    val_loss: float
    val_accuracy: float


class Evaluator:
    def __init__(self, cfg: Config, model: torch.nn.Module, splits, log: RunLog, wall: Callable[[], float],
                 rate: Callable[[], float | None], stats: dict):
        """`model`: scratch module; `wall`: the run's wall clock; `rate`: the run's updates/s so far; `stats`:
        the run's algorithm_stats (its distill_seconds splits the server's busy time in the timing rows)."""
        self.cfg = cfg
        self.model = model
        self.splits = splits
        self.log = log
        self.wall, self.rate, self.stats = wall, rate, stats
        self.evals: list[EvalPoint] = []
        self.queue: deque[tuple[int, torch.Tensor, float, float]] = deque()   # (version, model, wall, virtual)
        self.task = None                                                      # the evaluation in progress
        self.active: tuple[int, float] | None = None                         # its (version, virtual time)
        self.interval = {"busy": 0.0, "idle": 0.0, "eval": 0.0, "distill": 0.0}   # timing-row sums since the last eval
        self.next_eval_time = cfg.run.eval_every_time   # the next grid time of run.eval_every_time
        self.last_line = 0.0          # wall time of the last progress line (heartbeat)

    @property
    def pending(self) -> bool:
        return self.task is not None or bool(self.queue)

    def due(self, version: int) -> bool:
        """Whether reaching `version` calls for an evaluation (run.eval_every; never with a time grid)."""
        return not self.cfg.run.eval_every_time and version % self.cfg.run.eval_every == 0

    def add(self, version: int, x: torch.Tensor, at: float) -> None:
        """Queue the evaluation of `x`, the model of `version`, recorded at virtual time `at`."""
        self.queue.append((version, x, self.wall(), at))

    def grid_times(self, before: float) -> list[float]:
        """run.eval_every_time: the grid times earlier than `before` (the virtual time of the arrival about to be
        processed) not evaluated yet, now counted as evaluated (the caller evaluates the current model at each)."""
        every, times = self.cfg.run.eval_every_time, []
        while every and self.next_eval_time < before:
            times.append(self.next_eval_time)
            self.next_eval_time = every * (round(self.next_eval_time / every) + 1)   # k * T: no drift
        return times

    def step(self) -> None:
        """Advance the pending evaluations by one slice (one batch)."""
        t0 = time.perf_counter()
        if self.task is None and self.queue:
            version, x, wall, at = self.queue.popleft()
            self.task, self.active = self._evaluation(version, x, wall, at), (version, at)
        if self.task is not None:
            try:
                next(self.task)
            except StopIteration:
                self.task = None
            self.interval["eval"] += time.perf_counter() - t0

    def finish(self, between: Callable[[], None]) -> None:
        """Run every pending evaluation to its end, calling `between` after each slice."""
        while self.pending:
            self.step()
            between()

    def _evaluation(self, version: int, x: torch.Tensor, wall: float, now: float):
        """Evaluate snapshot `x` of `version` (reached at `wall`/`now`) batch by batch, then record it."""
        s = self.splits
        test_loss, test_acc = yield from evaluate_slices(self.model, x, s.test_x, s.test_y, EVAL_BATCH)
        val_loss, val_acc = ((yield from evaluate_slices(self.model, x, s.val_x, s.val_y, EVAL_BATCH))
                             if len(s.val_y) else (math.nan, math.nan))
        point = EvalPoint(version, wall, now, test_loss, test_acc, val_loss, val_acc)
        self.evals.append(point)
        self.log.eval(**asdict(point))
        distill_total = self.stats.get("distill_seconds", 0.0)
        busy = self.interval["busy"] - (distill_total - self.interval["distill"])
        for phase, seconds in (("aggregate", busy), ("distill", distill_total - self.interval["distill"]),
                               ("idle", self.interval["idle"]), ("eval", self.interval["eval"])):
            self.log.timing(version=version, wall_time=self.wall(), phase=phase, seconds=seconds)
        self.interval.update(busy=0.0, idle=0.0, eval=0.0, distill=distill_total)
        self.progress_line(f"  test acc {test_acc:.4f}  loss {test_loss:.4f}", version, now, wall)

    def heartbeat(self, in_flight: int, version: int, now: float) -> None:
        """A progress line when none was printed for `run.heartbeat_seconds` (also before the first evaluation):
        for `version` at virtual time `now`, or for the earliest evaluation pending, whose line is still to come."""
        if self.wall() - self.last_line < self.cfg.run.heartbeat_seconds:
            return
        tail = f"{in_flight} jobs in flight, heartbeat"
        if self.pending:
            tail += f"; at version {version}, evaluating"
            version, now = self.active if self.task is not None else (self.queue[0][0], self.queue[0][3])
        self.progress_line(f"  ({tail})", version, now, self.wall())

    def progress_line(self, tail: str, version: int, now: float, wall: float) -> None:
        """Print a progress line (stop-rule progress and ETA, docs/design.md "Progress") for `version`."""
        console.server.info(f"{progress.line(self.cfg.run, version, now, wall, self.rate())}{tail}")
        self.last_line = self.wall()
