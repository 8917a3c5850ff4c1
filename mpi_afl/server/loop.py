"""The server loop (rank 0): keep K jobs in flight, aggregate what arrives.

One loop serves both clocks (docs/design.md "Two clocks, one server loop"): the scheduler
(server/scheduler.py) creates the jobs, dispatches them and says which result is processed next; this
loop validates it, hands it to the algorithm and makes the new version. Algorithm work that comes as a
generator runs in slices with a receive + dispatch between slices (see algorithms/base.py), and so do
the evaluations (server/evaluator.py). Checkpoint state: server/state.py.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import console
from ..algorithms import algorithm_class
from ..algorithms.base import Update, add_notes
from ..config import Config
from ..distill.group import WAIT, Solo, share_state
from ..models import flat
from ..storage.checkpoint import save_checkpoint
from ..storage.runlog import RunLog
from ..storage.runlog.schema import updates_per_second
from ..transport.backoff import Backoff
from ..transport.messages import Arrival
from ..transport.protocol import Transport
from . import state
from .context import algorithm_context, check_images
from .evaluator import Evaluator
from .scheduler import Job, Scheduler
from .versions import VersionStore


@dataclass
class ServerSetup:
    """What the server works with besides the config, the transport and the run log."""
    model: torch.nn.Module                     # a module of the run's architecture: x_0, scratch for evaluation
    make_model: Callable[[], torch.nn.Module]  # fresh modules for the algorithm (algorithms/base.py)
    splits: object                             # the data splits (test, validation, KD: data/datasets.py)
    histograms: np.ndarray                     # (clients, classes) label counts of the partition
    device: torch.device
    out_dir: Path                              # the run directory (checkpoint.h5, the stop's final writes)
    world_size: int
    run_id: str = ""                           # storage/rundir.py: written into checkpoint.h5 and summary.json
    group: Solo | None = None                  # ranks 0..distill.ranks (distill/group.py); None: the server alone


class Server:
    def __init__(self, cfg: Config, transport: Transport, log: RunLog, setup: ServerSetup):
        self.cfg = cfg
        self.transport = transport
        self.log = log
        self.device = setup.device
        self.model = setup.model
        self.out_dir = setup.out_dir
        self.world_size = setup.world_size
        self.run_id = setup.run_id
        self.group = Solo() if setup.group is None else setup.group
        self.x = flat.flatten(setup.model).to(self.device)
        self.variances = flat.variance_mask(setup.model).nonzero().squeeze(1).to(self.device)   # a few hundred indices
        self.version = 0
        self.versions = VersionStore()
        self.versions.put(0, self.x)
        self.ctx = algorithm_context(cfg, self.device, self.x, setup.model, setup.make_model, setup.splits,
                                     setup.histograms, self.group, snapshot=self.versions.get,
                                     **check_images(setup.splits, cfg.distill.kd_check_images, self.device))
        self.algorithm = algorithm_class(cfg.server.algorithm)(cfg, self.ctx)
        self.stats: dict = {}   # summary.json's algorithm_stats: the algorithm's notes, distill_seconds
        self.jobs = Scheduler(cfg, transport, self.versions)
        self.evaluator = Evaluator(cfg, setup.model, setup.splits, log, self.wall, self.rate, self.stats)
        self.received = self.accepted = self.rejected = 0
        self.busy_seconds = 0.0
        self.t0 = time.perf_counter()
        self.last_arrival_wall = 0.0  # wall time of the last logged arrival: the updates/s denominator
        self.stop_reason = ""
        self.stop_requested = False   # set by the SIGTERM/SIGUSR1 handler (train.py)
        self.stopped = False          # the run has stopped: nothing more is received or dispatched
        self.nonfinite_streak = 0     # consecutive updates rejected as non-finite (run.diverged_after)
        self.diverged = ""            # why the run diverged, when it did
        self.checkpoint_version: int | None = None   # version of OUT/checkpoint.h5 (None: none written yet)
        self.log_flush_failed = False   # said once: run.h5 rows wait in memory for room on the disk

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float | None:
        return updates_per_second(self.accepted, self.last_arrival_wall)

    # ----------------------------------------------------------- receiving
    def pump(self) -> bool:
        """Receive whatever has arrived; True if anything did."""
        count, strays = self.jobs.receive()
        self.received += count
        for a in strays:
            self._reject(a, "job")  # unknown, duplicate or from the wrong rank
            self._log_arrival(a, None, "job", 0.0)
        return count > 0

    def dispatch(self) -> None:
        self.jobs.dispatch()

    def refill(self) -> None:
        self.jobs.refill(self.version, self.algorithm.synchronous)

    # ----------------------------------------------------------- processing
    def validate(self, a: Arrival, job: Job) -> str:
        u = a.update
        if u.delta is None or u.delta.numel() != self.x.numel():
            return "size"
        if u.client_id != job.client_id or not 0 <= u.client_id < self.cfg.data.num_clients:
            return "client"
        if u.base_version != job.base_version or u.base_version > self.version:
            return "version"
        # One reduction finds NaN/inf anywhere (they propagate through the sum).
        if not math.isfinite(u.loss) or not torch.isfinite(u.delta.sum()):
            return "nonfinite"
        return ""

    def process(self, job: Job, a: Arrival) -> None:
        t0 = time.perf_counter()
        self.jobs.advance(job)
        self._evaluate_grid(before=self.jobs.now)   # the model of every grid time passed is the one before this update
        if self.cfg.fault.kind == "server_raise" and job.index == self.cfg.fault.job:
            raise RuntimeError(f"injected fault: the server raises processing job {job.index} (fault.kind = server_raise)")
        reason = self.validate(a, job)
        staleness = self.version - job.base_version
        self.nonfinite_streak = self.nonfinite_streak + 1 if reason == "nonfinite" else 0
        limit = self.cfg.run.diverged_after
        if limit and self.nonfinite_streak >= limit:
            self.diverged = f"{limit} consecutive updates were non-finite (run.diverged_after = {limit})"
        weight = math.nan   # what the algorithm gave the update (NaN when rejected)
        if reason:
            self._reject(a, reason)
            if self.algorithm.synchronous:   # a round needs all K results: retry the client from the same base
                self.jobs.new_job(job.base_version, job.client_id)
        else:
            self.accepted += 1
            update = Update(job.client_id, job.index, job.base_version, staleness,
                            a.update.delta.to(self.device), a.update.num_samples, a.update.loss)
            ctx = replace(self.ctx, global_model=self.x, version=self.version, snapshot=self.versions.get)
            outcome = self.algorithm.on_update(update, ctx)
            if inspect.isgenerator(outcome):
                outcome = self._drive(outcome)
            a.release()
            add_notes(self.stats, outcome.notes)
            if outcome.model is not None:
                self._new_version(outcome.model)
            if outcome.kd_check is not None:
                self.log.kd_check(virtual_time=job.finish_time, **outcome.kd_check)
            weight = outcome.weight
        self.versions.release(job.base_version)
        seconds = time.perf_counter() - t0
        self.busy_seconds += seconds
        self.evaluator.interval["busy"] += seconds
        self._log_arrival(a, job, reason, seconds, staleness, weight)

    def _log_arrival(self, a: Arrival, job: Job | None, reason: str, seconds: float, staleness: int = -1,
                     weight: float = math.nan) -> None:
        self.last_arrival_wall = self.wall()
        u = a.update
        if console.server.isEnabledFor(logging.DEBUG):   # --verbose: one line per arrival
            console.server.debug(f"arrival: job {u.job_index} from rank {a.rank} (client {u.client_id}), base "
                                 f"version {u.base_version}, staleness {staleness}, weight {weight:.4g}, loss "
                                 f"{u.loss:.4g}, {seconds * 1e3:.1f} ms: {'accepted' if not reason else reason}")
        self.log.arrival(
            wall_time=self.last_arrival_wall, virtual_time=job.finish_time if job else math.nan, client=u.client_id,
            rank=a.rank, job=u.job_index, base_version=u.base_version, version=self.version, staleness=staleness,
            weight=weight, loss=u.loss, samples=u.num_samples, bytes=a.nbytes, server_seconds=seconds,
            compute_seconds=u.compute_seconds, accepted=not reason, reason=reason or "none")

    def _reject(self, a: Arrival, reason: str) -> None:
        self.rejected += 1
        a.release()
        where = f"job {a.update.job_index} from rank {a.rank} (client {a.update.client_id})"
        console.server.info(f"rejected update: {where}: {reason}")

    def _drive(self, work):
        """Run an algorithm's sliced work, receiving and dispatching between slices. Its wall time, less the
        receiving and dispatching between slices, is the run's distill_seconds, for every algorithm that slices
        its work (FedRevive's and FedEcho's distillation, a plug-in's own); waiting for the distillation group's
        sums counts as distillation (with nothing to receive, the server sleeps with back-off meanwhile)."""
        start, between, backoff = time.perf_counter(), 0.0, Backoff()
        try:
            while True:
                try:
                    signal = next(work)
                except StopIteration as done:
                    return done.value
                t0 = time.perf_counter()
                self.heartbeat()   # a long distillation must not silence the log
                arrived = False
                if not self.stopped:
                    arrived = self.pump()
                    self.dispatch()
                between += time.perf_counter() - t0
                if signal == WAIT and not arrived:
                    backoff.idle()
                else:
                    backoff.reset()
        finally:
            work.close()   # a no-op once it returned; after an exception it lets the slices clean up
            spent = time.perf_counter() - start - between
            self.stats["distill_seconds"] = self.stats.get("distill_seconds", 0.0) + spent

    def _new_version(self, model: torch.Tensor) -> None:
        # One reduction finds NaN/inf anywhere: a non-finite model is never made a version, so the run
        # stops (diverged) with the last finite one, and no job trains from it.
        if not torch.isfinite(model.sum()):
            self.diverged = f"the global model turned non-finite at version {self.version + 1}"
            return
        self.version += 1
        self.x = model.contiguous()
        # Running variances are aggregated like any entry, so stale deltas can make them negative:
        # keep them >= 0 (BatchNorm adds its eps), or evaluation and the next jobs turn NaN.
        self.x[self.variances] = self.x[self.variances].clamp_(min=0.0)
        self.versions.put(self.version, self.x)
        if self.evaluator.due(self.version):
            self.evaluate()

    # ----------------------------------------------------------- evaluation
    def _evaluate_grid(self, before: float) -> None:
        """run.eval_every_time: evaluate the current model at every grid time earlier than `before` (the
        virtual time of the arrival about to be processed), recorded at the grid time."""
        for at in self.evaluator.grid_times(before):
            self.evaluate(at=at)

    def evaluate(self, at: float | None = None) -> None:
        """Evaluate the current version (recorded at virtual time `at`, default now): queued and run in slices
        between loop turns, or at once where the result decides when to stop (virtual clock with a target
        accuracy: stopping must not depend on timing)."""
        self.evaluator.add(self.version, self.x, self.jobs.now if at is None else at)
        if self.jobs.virtual and self.cfg.run.target_accuracy:
            self.finish_evaluations()

    def finish_evaluations(self) -> None:
        self.evaluator.finish(between=self._between_slices)

    def _between_slices(self) -> None:
        if not self.stopped:
            self.pump()
            self.dispatch()

    def heartbeat(self) -> None:
        self.evaluator.heartbeat(len(self.jobs.in_flight), self.version, self.jobs.now)

    # ----------------------------------------------------------- main loop
    def should_stop(self) -> bool:
        r, evals = self.cfg.run, self.evaluator.evals
        if self.diverged:
            self.stop_reason = "diverged"
        elif self.stop_requested:
            self.stop_reason = "signal"
        elif r.max_versions and self.version >= r.max_versions:
            self.stop_reason = "max_versions"
        elif r.max_updates and self.accepted >= r.max_updates:
            self.stop_reason = "max_updates"
        elif r.max_wall_seconds and self.wall() >= r.max_wall_seconds:
            self.stop_reason = "max_wall_seconds"
        elif r.target_accuracy and evals and evals[-1].test_accuracy >= r.target_accuracy:
            self.stop_reason = "target_accuracy"
        elif r.max_virtual_time and self.jobs.next_time() > r.max_virtual_time:
            self.stop_reason = "max_virtual_time"
        return bool(self.stop_reason)

    def run(self) -> None:
        """Serve until a stop rule fires. What follows the stop (the final checkpoint, stopping the workers,
        the final evaluation and the run's files) is run/finish.py's, in one place and order."""
        share_state(self.algorithm, self.group)   # a distillation group starts from the server's state (also on resume)
        self.refill()
        self.dispatch()
        backoff = Backoff()
        every = self.cfg.run.checkpoint_every
        while not self.should_stop():
            self._maybe_flush_log()
            self.heartbeat()
            self.pump()
            ready = self.jobs.next_ready()
            if ready is None:
                self.dispatch()
                if self.evaluator.pending:
                    self.evaluator.step()   # idle time is evaluation time
                    continue
                t0 = time.perf_counter()
                backoff.idle()
                self.evaluator.interval["idle"] += time.perf_counter() - t0
                continue
            backoff.reset()
            version = self.version
            self.process(*ready)
            self.refill()
            self.dispatch()
            if len(self.evaluator.queue) > 1:   # evaluations mostly use idle time, but must not pile up
                self.evaluator.step()
            if every and self.version != version and self.version % every == 0:
                self.checkpoint()

    def _maybe_flush_log(self) -> None:
        """The periodic run.h5 flush; on a full disk the rows stay buffered and the next flush tries again."""
        try:
            self.log.maybe_flush()
        except OSError as e:
            self.log.postpone_flush()
            if not self.log_flush_failed:
                console.server.warning(f"warning: run.h5 rows could not be written ({e.strerror or e}); they are "
                                       f"kept in memory and written when there is room")
            self.log_flush_failed = True

    # ----------------------------------------------------------- checkpoints and results
    def checkpoint(self) -> None:
        """Write OUT/checkpoint.h5 atomically; only ever called between two updates."""
        t0 = time.perf_counter()
        try:
            save_checkpoint(self.out_dir / "checkpoint.h5", self.checkpoint_state())
        except OSError as e:   # a full disk may clear; the run goes on, and says which checkpoint it has
            kept = f"version {self.checkpoint_version}" if self.checkpoint_version is not None else "none"
            console.server.warning(f"warning: the checkpoint of version {self.version} was not written "
                                   f"({e.strerror or e}); the run goes on; checkpoint.h5 kept: {kept}")
            return
        self.checkpoint_version = self.version
        console.server.debug(f"checkpoint of version {self.version} written")
        self.log.timing(version=self.version, wall_time=self.wall(), phase="checkpoint",
                        seconds=time.perf_counter() - t0)

    def checkpoint_state(self) -> dict:
        self.finish_evaluations()   # a checkpoint covers every evaluation of the versions before it
        self.log.flush()   # the checkpoint must never count rows that only lived in memory
        return self.state_dict()

    def state_dict(self) -> dict:
        return state.state_dict(self)

    def load_state_dict(self, saved: dict) -> None:
        state.load_state_dict(self, saved)

    def save_model(self, path: Path) -> None:
        """The final global model as model.pt (server/state.py)."""
        state.save_model(path, self.model, self.x, self.run_id, self.version)

    def summary(self) -> dict:
        evals = self.evaluator.evals
        wall = self.wall()
        return {
            "algorithm": self.cfg.server.algorithm,
            "clock": self.cfg.run.clock,
            "world_size": self.world_size,
            "seed": self.cfg.run.seed,
            "versions": self.version,
            "virtual_time": self.jobs.now,
            "updates_received": self.received,
            "updates_accepted": self.accepted,
            "updates_rejected": self.rejected,
            "final_accuracy": evals[-1].test_accuracy,
            "best_accuracy": max(e.test_accuracy for e in evals),
            "wall_seconds": wall,
            "updates_per_second": self.rate(),
            "server_busy_fraction": self.busy_seconds / max(wall, 1e-9),
            "stop_reason": self.stop_reason,
            "model_sha256": state.model_sha256(self.x),
            "run_id": self.run_id,
            "algorithm_stats": dict(self.stats),
            "evals": [asdict(e) for e in evals],
        }
