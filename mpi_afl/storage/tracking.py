"""Live tracking: TensorBoard event files and an MLflow run that follow run.h5 while the run goes on.

`run.tensorboard = true` writes `OUT/tensorboard/`, `run.mlflow = true` logs to an MLflow run
(`run.mlflow_uri`; default a SQLite file `OUT/mlflow.db`, no server). Both are mirrors: run.h5 stays the
record of the run, and a tracker that fails (a full disk, an MLflow server gone) says so once and stops,
while the run goes on.

How they are fed: `open_trackers` connects them before the run log is created (a store that cannot be
reached is one config error, exit 2, and leaves no run behind), and `attach` hands them to the run log
(`RunLog.attach`, storage/runlog/writer.py), which gives a tracker every row it records, in order. A tracker turns
them into one **point** per evaluation, written (and flushed) as soon as the evaluation's rows are complete:

- `test/accuracy`, `test/loss`, `val/accuracy`, `val/loss` (the evals row; a NaN validation value is left out);
- `time/virtual_time` (vt) and `time/wall_seconds` (s) when the evaluated version was reached, `time/evaluation`
  (its index 0, 1, ... in run.h5's evals table) and `time/version`;
- `throughput/updates_per_second` (accepted updates over the wall time of the last arrival so far, the
  definition of summary.json), `throughput/updates_accepted`, `throughput/updates_rejected`;
- `staleness/mean`, `staleness/max` over the accepted updates so far;
- `server/<phase>_seconds`: rank 0's seconds so far in each timings phase (aggregate, distill, idle, eval,
  checkpoint);
- `stats/<key>`: every number of the algorithm's stats (summary.json's algorithm_stats: FedRevive's and
  FedEcho's distillation diagnostics `kd_loss_change`, `kd_norm_ratio`, `synth_agreement`, ...), as they
  stand when the evaluation is recorded.

Steps. TensorBoard's x axis is an integer step or the event's Unix wall time, so the event files hold two
runs: `tensorboard/by_version` (step = the evaluated version) and `tensorboard/by_evaluation` (step = the
evaluation's index, with `time/virtual_time` and `time/version` as scalars of the same step). With
`run.eval_every_time = T` evaluation k is the model at virtual time (k + 1) T (all but a final evaluation at
the stop, off the grid), so by_evaluation's step axis is the virtual-time grid; otherwise read the virtual time of a step from `time/virtual_time`. Wall times are the
real time each point was written. The event's wall_time field is not used for virtual time: TensorBoard reads it
as a date. `tensorboard/` itself holds the config as text (`config`, TOML) and as HParams (one hparam per key).
An evaluation of a version already logged (run.eval_every_time with no new version between grid times:
the same model) is left out of by_version and kept in by_evaluation. MLflow gets the by_version point (its
metric step is the version), the config keys as params, config.toml as an artifact and the tags
`mpi_afl.run_id` and `mpi_afl.out`; its charts can take `time/virtual_time` as the x axis.

Resume. The checkpoint counts the rows of each run.h5 table (RunLog's resume counts); a resumed RunLog keeps
those rows and drops the rest. The TensorBoard tracker does the same with its event files: at every start it
rewrites them keeping only the points of the kept evaluations (and nothing on a fresh start), so points
written after the checkpoint by a run that was then killed are dropped and written again by the resumed run,
once; the counters above are rebuilt from the kept rows. MLflow cannot delete points: the MLflow tracker
finds the run by its `mpi_afl.run_id` tag and logs, per metric, only steps above the last one it holds, so no
step is logged twice; in the virtual clock the points it keeps from after the checkpoint are the ones the
resumed run computes again (except wall times).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from mpi_afl import console
from mpi_afl.config import Config, ConfigError
from mpi_afl.storage.runlog.schema import PHASES, updates_per_second

PHASE_NAMES = {code: name for name, code in PHASES.items()}   # timings.phase is recorded as its code
TB_DIR = "tensorboard"
BY_VERSION, BY_EVALUATION = "by_version", "by_evaluation"


class Tracker:
    """Rows in, points out. A subclass writes `emit(point)`; errors after the start are reported once and end
    the tracker (run.h5 is the record; a mirror must not stop the run)."""

    name = "tracker"

    def __init__(self, cfg: Config, out: Path):
        self.cfg, self.out = cfg, Path(out)
        self.stats: dict = {}           # the algorithm's stats (ServerContext.stats), given by `attach`
        self.accepted = self.rejected = 0
        self.staleness_sum = 0
        self.staleness_max = 0
        self.last_arrival_wall = 0.0
        self.phase_seconds: dict[str, float] = {}
        self.evaluations = 0            # eval rows seen (kept ones included): the next evaluation's index
        self.last_version = -1          # highest version a point was logged for
        self.pending: dict | None = None
        self.failed = False

    def connect(self) -> None:
        """Import the backend and reach its store; ConfigError naming the key when that fails."""
        try:
            self.open_store()
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"config key '{self.key}': {self.name} could not start: {_first_line(e)}") from None

    # ------------------------------------------------------------ RunLog's calls
    def start(self, kept: dict[str, np.ndarray], attrs: dict) -> None:
        """Rebuild the counters from the rows a resumed run log kept (none on a fresh start), then open the
        backend's run (`open`). Raises ConfigError: nothing of the run has happened yet."""
        a = kept["arrivals"]
        if len(a):
            ok = a["accepted"].astype(bool)
            self.accepted, self.rejected = int(ok.sum()), int((~ok).sum())
            self.staleness_sum = int(a["staleness"][ok].sum())
            self.staleness_max = int(a["staleness"][ok].max()) if ok.any() else 0
            self.last_arrival_wall = float(a["wall_time"][-1])
        for code, seconds in zip(kept["timings"]["phase"], kept["timings"]["seconds"]):
            phase = PHASE_NAMES.get(int(code), str(int(code)))
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + float(seconds)
        evals = kept["evals"]
        self.evaluations = len(evals)
        self.last_version = int(evals["version"].max()) if len(evals) else -1
        try:
            self.open(evals, attrs)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"config key '{self.key}': {self.name} could not start: {_first_line(e)}") from None

    def row(self, table: str, row: dict) -> None:
        if self.failed:
            return
        if table == "timings":
            phase = PHASE_NAMES.get(int(row["phase"]), str(row["phase"]))
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + float(row["seconds"])
            return   # an evaluation's timing rows follow its evals row: they belong to its point
        self.flush()
        if table == "arrivals":
            if row["accepted"]:
                self.accepted += 1
                self.staleness_sum += int(row["staleness"])
                self.staleness_max = max(self.staleness_max, int(row["staleness"]))
            else:
                self.rejected += 1
            self.last_arrival_wall = float(row["wall_time"])
        elif table == "evals":
            self.pending = dict(row)

    def flush(self) -> None:
        """Write the pending point (an evaluation whose rows are complete)."""
        if self.pending is None or self.failed:
            return
        row, self.pending = self.pending, None
        point = self._point(row)
        self.evaluations += 1
        self._guarded(self.emit, point)

    def close(self) -> None:
        self.flush()
        if not self.failed:
            self._guarded(self.finish)

    # ------------------------------------------------------------ points
    def _point(self, row: dict) -> dict:
        scalars = {}
        for split in ("test", "val"):
            for metric in ("accuracy", "loss"):
                value = float(row[f"{split}_{metric}"])
                if math.isfinite(value):
                    scalars[f"{split}/{metric}"] = value
        version = int(row["version"])
        scalars.update({
            "time/virtual_time": float(row["virtual_time"]), "time/wall_seconds": float(row["wall_time"]),
            "time/evaluation": float(self.evaluations), "time/version": float(version),
            "throughput/updates_accepted": float(self.accepted), "throughput/updates_rejected": float(self.rejected),
        })
        rate = updates_per_second(self.accepted, self.last_arrival_wall)
        if rate is not None:
            scalars["throughput/updates_per_second"] = float(rate)
        if self.accepted:
            scalars["staleness/mean"] = self.staleness_sum / self.accepted
            scalars["staleness/max"] = float(self.staleness_max)
        for phase, seconds in self.phase_seconds.items():
            scalars[f"server/{phase}_seconds"] = seconds
        for key, value in self.stats.items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value):
                scalars[f"stats/{key}"] = float(value)
        new_version = version > self.last_version
        self.last_version = max(self.last_version, version)
        return {"version": version, "evaluation": self.evaluations, "new_version": new_version,
                "scalars": scalars, "time": time.time()}

    def _guarded(self, call, *args) -> None:
        try:
            call(*args)
        except Exception as e:   # a mirror's failure: said once, the run goes on
            self.failed = True
            console.server.warning(f"warning: {self.name} tracking stopped ({_first_line(e)}); run.h5 has every row")

    # ------------------------------------------------------------ backends
    key = "run"

    def open_store(self) -> None:
        raise NotImplementedError

    def open(self, kept_evals: np.ndarray, attrs: dict) -> None:
        raise NotImplementedError

    def emit(self, point: dict) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def config_values(cfg: Config) -> dict[str, Any]:
    """Every config key as a dotted name with a bool, int, float or str value (lists as their TOML text)."""
    values = {}
    for section, body in cfg.to_dict().items():
        for name, value in body.items():
            values[f"{section}.{name}"] = ", ".join(map(str, value)) if isinstance(value, list) else value
    return values


def config_text(cfg: Config) -> str:
    return cfg.to_toml()


# ---------------------------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker(Tracker):
    """Event files under OUT/tensorboard (module docstring)."""

    name = "TensorBoard"
    key = "run.tensorboard"

    def open_store(self) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        self.Summary = Summary

    def open(self, kept_evals: np.ndarray, attrs: dict) -> None:
        from tensorboard.plugins.hparams import summary_v2 as hparams
        from tensorboard.plugins.text import summary_v2 as text
        root = self.out / TB_DIR
        kept_versions = set(int(v) for v in kept_evals["version"])
        limits = {root: None, root / BY_VERSION: ("version", kept_versions),
                  root / BY_EVALUATION: ("evaluation", len(kept_evals))}
        self.writers = {d.name if d != root else "": _rewrite(d, limit) for d, limit in limits.items()}
        info = self.writers[""]
        start = float(_run_start(attrs))
        summaries = [text.text_pb("config", "```toml\n" + config_text(self.cfg) + "```"),
                     hparams.hparams_pb(config_values(self.cfg), trial_id=str(attrs.get("run_id") or self.out.name),
                                        start_time_secs=start)]
        for summary in summaries:
            info.add_event(_event(summary, step=0))
        for writer in self.writers.values():
            writer.flush()

    def emit(self, point: dict) -> None:
        values = [self.Summary.Value(tag=tag, simple_value=value) for tag, value in point["scalars"].items()]
        summary = self.Summary(value=values)
        if point["new_version"]:
            self.writers[BY_VERSION].add_event(_event(summary, step=point["version"], wall_time=point["time"]))
            self.writers[BY_VERSION].flush()
        self.writers[BY_EVALUATION].add_event(_event(summary, step=point["evaluation"], wall_time=point["time"]))
        self.writers[BY_EVALUATION].flush()

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _event(summary, *, step: int, wall_time: float | None = None):
    from tensorboard.compat.proto.event_pb2 import Event
    return Event(wall_time=time.time() if wall_time is None else wall_time, step=int(step), summary=summary)


def event_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("events.out.tfevents.*"))


def _rewrite(directory: Path, limit):
    """A new event file in `directory` holding the points of the old ones that the run log kept (`limit`:
    ("version", kept versions) or ("evaluation", kept count); None: none), each once; then the old files are
    removed. Returns its writer, for the points to come."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    old = event_files(directory)
    kept, seen = [], set()
    if limit is not None:
        kind, bound = limit
        for path in old:
            # the raw records, as written: EventFileLoader would turn simple_value scalars into tensors
            for record in RawEventFileLoader(str(path)).Load():
                event = Event.FromString(record)
                if not event.HasField("summary"):
                    continue   # the file_version record: the new file has its own
                inside = event.step in bound if kind == "version" else event.step < bound
                if inside and event.step not in seen:   # a copy left by a start killed mid-rewrite: once
                    seen.add(event.step)
                    kept.append(event)
    writer = EventFileWriter(str(directory))
    for event in kept:
        writer.add_event(event)
    writer.flush()
    for path in old:
        path.unlink()
    return writer


def _run_start(attrs: dict) -> float:
    from datetime import datetime
    try:
        return datetime.strptime(str(attrs.get("started", "")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return time.time()


# ---------------------------------------------------------------------------------------------- MLflow
class MlflowTracker(Tracker):
    """An MLflow run (module docstring); found again on resume by its `mpi_afl.run_id` tag."""

    name = "MLflow"
    PARAM_LIMIT = 6000   # MLflow's longest param value

    @property
    def key(self) -> str:
        return "run.mlflow_uri" if self.cfg.run.mlflow_uri else "run.mlflow"

    def open_store(self) -> None:
        import logging
        from mlflow.tracking import MlflowClient
        for name in ("mlflow.store.db.utils", "alembic"):   # their INFO lines about creating the database
            logging.getLogger(name).setLevel(logging.WARNING)
        r = self.cfg.run
        uri = r.mlflow_uri or f"sqlite:///{(self.out / 'mlflow.db').resolve()}"
        self.client = client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(r.mlflow_experiment)
        if experiment is None:
            # A store of this run's own keeps its artifacts beside it; another store decides for itself.
            location = None if r.mlflow_uri else (self.out / "mlflow-artifacts").resolve().as_uri()
            self.experiment_id = client.create_experiment(r.mlflow_experiment, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id

    def open(self, kept_evals: np.ndarray, attrs: dict) -> None:
        from mlflow.entities import Param
        client, experiment_id = self.client, self.experiment_id
        run_id = str(attrs.get("run_id", ""))
        found = client.search_runs([experiment_id], filter_string=f"tags.`mpi_afl.run_id` = '{run_id}'",
                                   max_results=1) if run_id else []
        self.logged: dict[str, int] = {}   # metric -> highest step it holds
        if found:
            run = found[0]
            self.run_id = run.info.run_id
            for key in run.data.metrics:
                self.logged[key] = max(m.step for m in client.get_metric_history(self.run_id, key))
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=self.out.name,
                                    tags={"mpi_afl.run_id": run_id, "mpi_afl.out": str(self.out.resolve())})
            self.run_id = run.info.run_id
        params = [Param(k, str(v)[:self.PARAM_LIMIT]) for k, v in config_values(self.cfg).items()
                  if k not in run.data.params]   # set once: a resume's new stop rule is in config.toml
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=params[i:i + 100])
        client.log_text(self.run_id, config_text(self.cfg), "config.toml")

    def emit(self, point: dict) -> None:
        from mlflow.entities import Metric
        if not point["new_version"]:
            return
        step, stamp = point["version"], int(point["time"] * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in point["scalars"].items()
                   if step > self.logged.get(key, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
            for m in metrics:
                self.logged[m.key] = step

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


def open_trackers(cfg: Config, out: Path) -> list[Tracker]:
    """The trackers `cfg` asks for (run.tensorboard, run.mlflow), connected to their stores; call before the
    run log is created, so that a store that cannot be reached (ConfigError naming the key) leaves no run."""
    trackers: list[Tracker] = []
    if cfg.run.tensorboard:
        trackers.append(TensorBoardTracker(cfg, out))
    if cfg.run.mlflow:
        trackers.append(MlflowTracker(cfg, out))
    for tracker in trackers:
        tracker.connect()
    return trackers


def attach(log, trackers: list[Tracker], stats: dict) -> None:
    """Let `trackers` follow the run log `log` (before its first row), with the algorithm's `stats`
    (ServerContext.stats, the dict summary.json's algorithm_stats comes from)."""
    for tracker in trackers:
        tracker.stats = stats
    log.attach(*trackers)
