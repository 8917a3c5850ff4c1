"""The server loop (rank 0): keep K jobs in flight, aggregate what arrives.

One loop serves both clocks (docs/design.md "Two clocks, one server loop"):

- every job gets a virtual start and finish time from the delay model when it
  is created, whatever the clock;
- **virtual**: results are processed strictly in `(finish_time, job_index)`
  order; the loop waits for the head job if it has not arrived yet, while
  workers keep computing the jobs behind it. The result of a run is then the
  same for any number of ranks;
- **wall**: results are processed in the order they really arrived.

Jobs not yet handed to a worker wait in a heap ordered by virtual finish time
and go to the worker with the fewest outstanding jobs, up to `queue_depth`
each, so a worker always has its next job queued while the server aggregates
or distils. Algorithm work that comes as a generator runs in slices with a
poll + dispatch between slices (see algorithms/base.py).
"""

from __future__ import annotations

import hashlib
import heapq
import inspect
import io
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..algorithms import algorithm_class
from ..algorithms.base import ServerContext, Update, add_notes
from ..config import Config
from ..delays import DelayModel
from ..distill.group import WAIT, Solo, share_state
from ..models.evaluate import evaluate_slices
from ..storage.atomic import write_atomic
from ..storage.checkpoint import CheckpointError, save_checkpoint
from ..storage.final_writes import FinalWrites
from ..storage.runlog import RunLog, updates_per_second
from ..transport.backoff import Backoff
from ..transport.messages import Arrival, JobSpec
from . import progress
from .versions import VersionStore

_CLIENT_STREAM = 0x5E7  # separates client sampling from other uses of the run seed
CHECKPOINT_FORMAT = 3   # bump when the server state layout changes (2: FedRevive's teachers keep their versions;
                        # 3: FedEcho keeps its buffered updates' staleness, and a StatTracker's update
                        # count is part of the flat model)
EVAL_BATCH = 256        # images per evaluation slice: ~0.1 s of CPU for the 28x28 CNN, so arrivals wait little


def check_images(splits, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """ServerContext.check_x/check_y: the first n validation images, or test images without a validation
    split (fixed for the whole run, so every KD call is measured on the same images); none for n = 0."""
    x, y = (splits.val_x, splits.val_y) if len(splits.val_x) else (splits.test_x, splits.test_y)
    return {"check_x": x[:n].to(device), "check_y": y[:n].to(device)} if n else {}


@dataclass
class Job:
    index: int
    client_id: int
    base_version: int
    start_time: float
    finish_time: float
    sleep_seconds: float
    worker: int = -1

    def spec(self) -> JobSpec:
        return JobSpec(self.index, self.client_id, self.base_version, self.sleep_seconds)


def check_server_format(state: dict) -> None:
    """Refuse a checkpoint whose server state was written with another layout (CheckpointError)."""
    if state.get("server_format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint server state format {state.get('server_format')!r}; "
                              f"this version reads {CHECKPOINT_FORMAT}")


@dataclass
class EvalPoint:
    version: int
    wall_time: float
    virtual_time: float
    test_loss: float
    test_accuracy: float
    val_loss: float
    val_accuracy: float


def algorithm_context(cfg: Config, device: torch.device, x: torch.Tensor, model: torch.nn.Module, make_model, splits,
                      histograms: np.ndarray, flat, group, **extra) -> ServerContext:
    """The algorithm's view of the run (algorithms/base.py), on the server and on a distilling rank."""
    info = splits.info
    return ServerContext(
        cfg=cfg, device=device, global_model=x, version=0, snapshot=extra.pop("snapshot", None),
        make_model=make_model, param_mask=flat.param_mask(model).to(device), num_classes=info.num_classes,
        image_shape=(info.channels, info.image_size, info.image_size), data_mean=tuple(info.mean),
        data_std=tuple(info.std), client_histograms=histograms,
        kd_x=splits.kd_x.to(device) if len(splits.kd_x) else None,
        kd_y=splits.kd_y.to(device) if len(splits.kd_y) else None, group=group, **extra)


class Server:
    def __init__(self, cfg: Config, transport, *, model: torch.nn.Module, make_model, splits, histograms: np.ndarray,
                 device: torch.device, flat, out_dir: Path, world_size: int, log: RunLog, run_id: str = "",
                 group=None):
        self.cfg = cfg
        self.transport = transport
        self.device = device
        self.model = model          # scratch module for evaluation
        self.splits = splits
        self.out_dir = out_dir
        self.world_size = world_size
        self.log = log
        self.flat = flat            # the models.flat module (flatten / param_mask)
        group = Solo() if group is None else group   # ranks 0..distill.ranks (distill/group.py)
        self.group = group
        self.x = flat.flatten(model).to(device)
        self.variances = flat.variance_mask(model).nonzero().squeeze(1).to(device)   # a few hundred indices
        self.version = 0
        self.versions = VersionStore()
        self.versions.put(0, self.x)
        self.ctx = algorithm_context(cfg, device, self.x, model, make_model, splits, histograms, flat, group,
                                     snapshot=self.versions.get,
                                     **check_images(splits, cfg.distill.kd_check_images, device))
        self.algorithm = algorithm_class(cfg.server.algorithm)(cfg, self.ctx)
        self.stats: dict = {}   # summary.json's algorithm_stats: the algorithm's notes, distill_seconds
        self.delays = DelayModel(cfg.delays, cfg.data.num_clients, cfg.run.seed)
        self.rng = np.random.default_rng([cfg.run.seed, _CLIENT_STREAM])
        self.virtual = cfg.run.clock == "virtual"

        self.in_flight: dict[int, Job] = {}
        self.schedule: list[tuple[float, int]] = []     # virtual: (finish_time, job) of jobs in flight
        self.pending: list[tuple[float, int]] = []      # created, not yet sent to a worker
        self.outstanding = {w: 0 for w in transport.workers}
        self.arrived: dict[int, Arrival] = {}
        self.arrival_order: deque[int] = deque()        # wall: processing order
        self.busy = np.zeros(cfg.data.num_clients, dtype=bool)
        self.now = 0.0
        self.next_job = 0
        self.received = self.accepted = self.rejected = 0
        self.evals: list[EvalPoint] = []
        self.busy_seconds = 0.0
        self.idle_seconds = 0.0
        self.interval = {"busy": 0.0, "idle": 0.0, "eval": 0.0, "distill": 0.0}   # timing-row sums since the last eval
        self.eval_queue: deque[tuple[int, torch.Tensor, float, float]] = deque()   # (version, model, wall, virtual)
        self.eval_task = None                                                      # the evaluation in progress
        self.t0 = time.perf_counter()
        self.last_arrival_wall = 0.0  # wall time of the last logged arrival: the updates/s denominator
        self.last_line = 0.0          # wall time of the last progress line (heartbeat)
        self.stop_reason = ""
        self.stop_requested = False   # set by the SIGTERM/SIGUSR1 handler (train.py)
        self.stopped = False          # the run has stopped: nothing more is received or dispatched
        self.run_id = run_id          # storage/rundir.py: written into checkpoint.h5 and summary.json
        self.nonfinite_streak = 0     # consecutive updates rejected as non-finite (run.diverged_after)
        self.diverged = ""            # why the run diverged, when it did
        self.final_writes = FinalWrites(out_dir)   # the stop's writes, checkpoint.h5 first (storage/final_writes.py)
        self.checkpoint_version: int | None = None   # version of OUT/checkpoint.h5 (None: none written yet)
        self.log_flush_failed = False   # said once: run.h5 rows wait in memory for room on the disk
        self.next_eval_time = cfg.run.eval_every_time   # the next grid time of run.eval_every_time

    # ----------------------------------------------------------- jobs
    def _new_job(self, client: int | None = None, base_version: int | None = None) -> None:
        """Create a job for `client` (default: a random idle client) from `base_version` (default: current)."""
        if client is None:
            client = int(self.rng.choice(np.flatnonzero(~self.busy)))
        base = self.version if base_version is None else base_version
        times = self.delays.job(client, self.next_job)
        sleep = times.train * self.cfg.delays.wall_scale if not self.virtual else 0.0
        job = Job(self.next_job, client, base, self.now, self.now + times.total, sleep)
        self.next_job += 1
        self.busy[client] = True
        self.versions.acquire(base)
        self.in_flight[job.index] = job
        heapq.heappush(self.pending, (job.finish_time, job.index))
        if self.virtual:
            heapq.heappush(self.schedule, (job.finish_time, job.index))

    def refill(self) -> None:
        """Keep K jobs in flight; synchronous algorithms start a round only when the last one is done."""
        k = self.cfg.server.concurrency
        if self.algorithm.synchronous and self.in_flight:
            return
        while len(self.in_flight) < k:
            self._new_job()

    def dispatch(self) -> None:
        depth = self.transport.queue_depth
        while self.pending:
            worker = min(self.outstanding, key=lambda w: (self.outstanding[w], w))
            if self.outstanding[worker] >= depth:
                return
            _, index = heapq.heappop(self.pending)
            job = self.in_flight[index]
            job.worker = worker
            self.transport.send_job(worker, job.spec(), self.versions.get(job.base_version))
            self.outstanding[worker] += 1

    def pump(self) -> bool:
        """Receive whatever has arrived; True if anything did."""
        arrivals = self.transport.poll()
        for a in arrivals:
            self.received += 1
            self.outstanding[a.rank] -= 1
            index = a.update.job_index
            job = self.in_flight.get(index)
            if job is None or index in self.arrived or job.worker != a.rank:
                self._reject(a, "job")  # unknown, duplicate or from the wrong rank
                self._log_arrival(a, None, "job", 0.0)
                continue
            self.arrived[index] = a
            self.arrival_order.append(index)
        return bool(arrivals)

    def next_ready(self) -> tuple[Job, Arrival] | None:
        if self.virtual:
            if not self.schedule or self.schedule[0][1] not in self.arrived:
                return None
            _, index = heapq.heappop(self.schedule)
        else:
            if not self.arrival_order:
                return None
            index = self.arrival_order.popleft()
        return self.in_flight.pop(index), self.arrived.pop(index)

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
        self.busy[job.client_id] = False
        self.now = job.finish_time if self.virtual else max(self.now, job.finish_time)
        self._evaluate_grid(before=self.now)   # the model of every grid time passed is the one before this update
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
                self._new_job(job.client_id, job.base_version)
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
        self.interval["busy"] += seconds
        self._log_arrival(a, job, reason, seconds, staleness, weight)

    def _log_arrival(self, a: Arrival, job: Job | None, reason: str, seconds: float, staleness: int = -1,
                     weight: float = math.nan) -> None:
        self.last_arrival_wall = self.wall()
        u = a.update
        self.log.arrival(
            wall_time=self.last_arrival_wall, virtual_time=job.finish_time if job else math.nan, client=u.client_id,
            rank=a.rank, job=u.job_index, base_version=u.base_version, version=self.version, staleness=staleness,
            weight=weight, loss=u.loss, samples=u.num_samples,
            bytes=a.nbytes, server_seconds=seconds, compute_seconds=u.compute_seconds, accepted=not reason,
            reason=reason or "none")

    def _reject(self, a: Arrival, reason: str) -> None:
        self.rejected += 1
        a.release()
        where = f"job {a.update.job_index} from rank {a.rank} (client {a.update.client_id})"
        print(f"[server] rejected update: {where}: {reason}", flush=True)

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
        if not self.cfg.run.eval_every_time and self.version % self.cfg.run.eval_every == 0:
            self.evaluate()

    def _evaluate_grid(self, before: float) -> None:
        """run.eval_every_time: evaluate the current model at every grid time earlier than `before` (the
        virtual time of the arrival about to be processed), recorded at the grid time."""
        every = self.cfg.run.eval_every_time
        while every and self.next_eval_time < before:
            self.evaluate(at=self.next_eval_time)
            self.next_eval_time = every * (round(self.next_eval_time / every) + 1)   # k * T: no drift

    def evaluate(self, at: float | None = None) -> None:
        """Evaluate the current version (recorded at virtual time `at`, default now): queued and run in slices
        between loop turns, so the server keeps aggregating and creating jobs meanwhile (an evaluation pass is
        seconds of CPU), or at once where the result decides when to stop (virtual clock with a target
        accuracy: stopping must not depend on timing)."""
        self.eval_queue.append((self.version, self.x, self.wall(), self.now if at is None else at))
        if self.virtual and self.cfg.run.target_accuracy:
            self.finish_evaluations()

    def _eval_step(self) -> None:
        """Advance the pending evaluations by one slice (one batch)."""
        t0 = time.perf_counter()
        if self.eval_task is None and self.eval_queue:
            self.eval_task = self._evaluation(*self.eval_queue.popleft())
        if self.eval_task is not None:
            try:
                next(self.eval_task)
            except StopIteration:
                self.eval_task = None
            self.interval["eval"] += time.perf_counter() - t0

    def finish_evaluations(self) -> None:
        while self.eval_task is not None or self.eval_queue:
            self._eval_step()
            if not self.stopped:
                self.pump()
                self.dispatch()

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

    def heartbeat(self) -> None:
        """A progress line when none was printed for `run.heartbeat_seconds` (also before the first evaluation)."""
        if self.wall() - self.last_line >= self.cfg.run.heartbeat_seconds:
            self.progress_line(f"  ({len(self.in_flight)} jobs in flight, heartbeat)", self.version, self.now,
                               self.wall())

    def progress_line(self, tail: str, version: int, now: float, wall: float) -> None:
        """Print a progress line (stop-rule progress and ETA, docs/design.md "Progress") for `version`."""
        rate = updates_per_second(self.accepted, self.last_arrival_wall)
        print(f"[server] {progress.line(self.cfg.run, version, now, wall, rate)}{tail}", flush=True)
        self.last_line = self.wall()

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    # ----------------------------------------------------------- main loop
    def should_stop(self) -> bool:
        r = self.cfg.run
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
        elif r.target_accuracy and self.evals and self.evals[-1].test_accuracy >= r.target_accuracy:
            self.stop_reason = "target_accuracy"
        elif r.max_virtual_time and self._next_time() > r.max_virtual_time:
            self.stop_reason = "max_virtual_time"
        return bool(self.stop_reason)

    def _next_time(self) -> float:
        """Virtual time of the next result to process (the head job; `now` in wall mode)."""
        return self.schedule[0][0] if self.virtual and self.schedule else self.now

    def run(self) -> dict:
        share_state(self.algorithm, self.group)   # a distillation group starts from the server's state (also on resume)
        self.refill()
        self.dispatch()
        backoff = Backoff()
        every = self.cfg.run.checkpoint_every
        while not self.should_stop():
            self._maybe_flush_log()
            self.heartbeat()
            self.pump()
            ready = self.next_ready()
            if ready is None:
                self.dispatch()
                if self.eval_task is not None or self.eval_queue:
                    self._eval_step()   # idle time is evaluation time
                    continue
                t0 = time.perf_counter()
                backoff.idle()
                self.interval["idle"] += time.perf_counter() - t0
                continue
            backoff.reset()
            version = self.version
            self.process(*ready)
            self.refill()
            self.dispatch()
            if len(self.eval_queue) > 1:   # evaluations mostly use idle time, but must not pile up
                self._eval_step()
            if every and self.version != version and self.version % every == 0:
                self.checkpoint()
        # The final checkpoint first (also after a normal stop, so `--resume` can extend the run): after a
        # signal the job may be killed any moment now. It is taken between two updates, as every checkpoint,
        # and before the off-schedule final evaluation (a resumed run drops that row, as an uninterrupted run
        # never had it); jobs still in flight are in it and run again on resume.
        self.stopped = True   # from here on nothing is received or sent (the evaluations below would pump)
        if self.final_writes.attempt("checkpoint.h5", lambda path: save_checkpoint(path, self._checkpoint_state())):
            self.checkpoint_version = self.version
        self.transport.stop()
        self.group.stop()
        if not self.evals or self.evals[-1].version != self.version:
            self.evaluate()
            self.finish_evaluations()
        self.final_writes.attempt("run.h5", lambda _: self.log.close())
        return self.summary()

    def _maybe_flush_log(self) -> None:
        """The periodic run.h5 flush; on a full disk the rows stay buffered and the next flush tries again."""
        try:
            self.log.maybe_flush()
        except OSError as e:
            self.log.postpone_flush()
            if not self.log_flush_failed:
                print(f"[server] warning: run.h5 rows could not be written ({e.strerror or e}); they are kept in "
                      f"memory and written when there is room", flush=True)
            self.log_flush_failed = True

    # ----------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        """Write OUT/checkpoint.h5 atomically; only ever called between two updates."""
        t0 = time.perf_counter()
        try:
            save_checkpoint(self.out_dir / "checkpoint.h5", self._checkpoint_state())
        except OSError as e:   # a full disk may clear; the run goes on, and says which checkpoint it has
            kept = f"version {self.checkpoint_version}" if self.checkpoint_version is not None else "none"
            print(f"[server] warning: the checkpoint of version {self.version} was not written "
                  f"({e.strerror or e}); the run goes on; checkpoint.h5 kept: {kept}", flush=True)
            return
        self.checkpoint_version = self.version
        self.log.timing(version=self.version, wall_time=self.wall(), phase="checkpoint",
                        seconds=time.perf_counter() - t0)

    def _checkpoint_state(self) -> dict:
        self.finish_evaluations()   # a checkpoint covers every evaluation of the versions before it
        self.log.flush()   # the checkpoint must never count rows that only lived in memory
        return self.state_dict()

    def save_model(self, path: Path) -> None:
        """The final global model as a torch state dict (`model.load_state_dict(torch.load(path)["state_dict"])`),
        written atomically. Serialised in memory first (one model): torch.save into a file that fails half-way
        raises a RuntimeError about stream positions, where a plain write raises the OSError that says why."""
        self.flat.load_flat(self.model, self.x)
        buffer = io.BytesIO()
        torch.save({"state_dict": self.model.state_dict(), "run_id": self.run_id, "version": self.version,
                    "model_sha256": self.model_sha256()}, buffer)
        write_atomic(path, buffer.getbuffer())

    def model_sha256(self) -> str:
        return hashlib.sha256(self.x.detach().cpu().numpy().tobytes()).hexdigest()

    def state_dict(self) -> dict:
        return {
            "server_format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_json(),
            "version": self.version,
            "now": self.now,
            "next_job": self.next_job,
            "wall": self.wall(),
            "global_model": self.x.cpu(),
            "versions": {"versions": sorted(self.versions.models),
                         "models": [self.versions.models[v].cpu() for v in sorted(self.versions.models)]},
            "rng": self.rng.bit_generator.state,
            "in_flight": [asdict(job) for _, job in sorted(self.in_flight.items())],
            "busy": torch.from_numpy(self.busy.copy()),
            "counters": {"received": self.received, "accepted": self.accepted, "rejected": self.rejected,
                         "busy_seconds": self.busy_seconds, "last_arrival_wall": self.last_arrival_wall},
            "evals": [asdict(e) for e in self.evals],
            "stats": dict(self.stats),
            "algorithm": self.algorithm.state_dict(),
            "log_counts": self.log.counts(),
            "run_id": self.run_id,
            "nonfinite_streak": self.nonfinite_streak,
            "next_eval_time": self.next_eval_time,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint: every job that was in flight is sent again (workers lost them)."""
        check_server_format(state)
        self.version, self.now, self.next_job = int(state["version"]), float(state["now"]), int(state["next_job"])
        self.t0 = time.perf_counter() - float(state["wall"])
        self.x = state["global_model"].to(self.device)
        models = {int(v): m.to(self.device) for v, m in zip(state["versions"]["versions"], state["versions"]["models"])}
        models[self.version] = self.x
        self.versions = VersionStore()
        self.versions.models, self.versions.current = models, self.version
        self.rng.bit_generator.state = state["rng"]
        self.busy = state["busy"].numpy().astype(bool)
        for row in state["in_flight"]:
            job = Job(**{**row, "worker": -1})
            self.in_flight[job.index] = job
            self.versions.acquire(job.base_version)
            heapq.heappush(self.pending, (job.finish_time, job.index))
            if self.virtual:
                heapq.heappush(self.schedule, (job.finish_time, job.index))
        self.versions.collect()
        c = state["counters"]
        self.received, self.accepted, self.rejected = int(c["received"]), int(c["accepted"]), int(c["rejected"])
        self.busy_seconds = float(c["busy_seconds"])
        self.last_arrival_wall = float(c.get("last_arrival_wall", 0.0))   # absent before 0.1.0's results API
        self.evals = [EvalPoint(**e) for e in state["evals"]]
        self.stats.update(state["stats"])
        self.interval["distill"] = self.stats.get("distill_seconds", 0.0)
        self.checkpoint_version = self.version
        self.algorithm.load_state_dict(state["algorithm"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.next_eval_time = float(state.get("next_eval_time", self.cfg.run.eval_every_time))

    def summary(self) -> dict:
        final = self.evals[-1]
        wall = self.wall()
        summary = {
            "algorithm": self.cfg.server.algorithm,
            "clock": self.cfg.run.clock,
            "world_size": self.world_size,
            "seed": self.cfg.run.seed,
            "versions": self.version,
            "virtual_time": self.now,
            "updates_received": self.received,
            "updates_accepted": self.accepted,
            "updates_rejected": self.rejected,
            "final_accuracy": final.test_accuracy,
            "best_accuracy": max(e.test_accuracy for e in self.evals),
            "wall_seconds": wall,
            "updates_per_second": updates_per_second(self.accepted, self.last_arrival_wall),
            "server_busy_fraction": self.busy_seconds / max(wall, 1e-9),
            "stop_reason": self.stop_reason,
            "model_sha256": self.model_sha256(),
            "run_id": self.run_id,
            "algorithm_stats": dict(self.stats),
            "evals": [asdict(e) for e in self.evals],
        }
        return summary
