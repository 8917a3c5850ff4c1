"""Run log: one HDF5 file per run, written by rank 0 only, readable while the run goes on.

Layout (docs/design.md "Output"):

- root attributes: whatever the server passes (config as JSON, versions,
  world size, seed, ...; dict and list values are stored as JSON strings)
  plus `format = "mpi_afl-run"` and `format_version`;
- three tables, each ONE resizable 1-D dataset with a compound dtype and
  Fletcher-32 checksums on its chunks (damaged rows are an error when read,
  never silently wrong values), one row per record: `arrivals` (ARRIVAL_FIELDS), `evals` (EVAL_FIELDS) and
  `timings` (TIMING_FIELDS). One compound dataset per table (rather than one
  dataset per column) means a live SWMR reader never sees half a row, and a
  flush is one resize + one write per table;
- coded columns hold small ints; the code tables are the module constants
  REJECT_REASONS (`arrivals.reason`) and PHASES (`timings.phase`), also
  stored as JSON in the dataset attributes `reason_codes` / `phase_codes` so
  the file decodes without this package;
- every column has a unit and a description (COLUMN_DOCS), stored as the
  dataset attributes `<column>_unit` and `<column>_description`.

All datasets are created before SWMR mode is switched on (an HDF5 rule), so
another process can follow a live run::

    f = h5py.File("run.h5", "r", swmr=True)
    arrivals = f["arrivals"]
    arrivals.refresh()                       # pick up rows flushed since
    df = pandas.DataFrame(arrivals[()])      # columns = ARRIVAL_FIELDS

or simply `read_run(path)`, which gives {table: {column: array}} and never
hangs on a damaged file (storage/h5open.py); a missing, foreign, damaged or
truncated file is a RunLogError naming the file.

Format versions: 1 had no checksums on the tables; 2 added them and the
`run_id` attribute that resume checks against the checkpoint; 3 added the
arrivals column `compute_seconds`. `read_run` reads all three; a run can only
be resumed with a version-3 log.

Observers (`attach`: the live TensorBoard and MLflow trackers of storage/tracking.py) get every row as it
is recorded, every flush and the close; on resume they first get the rows the log kept, so that they can
drop what they mirrored after the checkpoint, as the log does.

Rows are buffered in a Python list (a tuple per row) and written in one slice
per table when `flush_seconds` have passed, so logging costs 3-6 us per update
including the flushes (`bench/runlog_overhead.py`), far below 2% of a server
loop turn at hundreds of updates/s.
"""

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpi_afl.storage.atomic import allocate, atomic_replace, temp_path
from mpi_afl.storage.h5open import open_readonly

FORMAT = "mpi_afl-run"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


class RunLogError(ValueError):
    """A run file is missing, foreign, damaged, truncated or of an unknown format version."""

ARRIVAL_FIELDS = [
    ("wall_time", "f8"),       # seconds since the run started
    ("virtual_time", "f8"),    # virtual-clock finish time of the job
    ("client", "i8"),
    ("rank", "i8"),            # worker rank that ran the job
    ("job", "i8"),
    ("base_version", "i8"),    # global version the job trained from
    ("version", "i8"),         # server version after processing the arrival
    ("staleness", "i8"),       # version at arrival - base_version
    ("weight", "f8"),          # aggregation weight, or FedRevive's beta (docs/algorithms.md §3.2)
    ("loss", "f8"),            # client's local training loss
    ("samples", "i8"),
    ("bytes", "i8"),           # update payload size
    ("server_seconds", "f8"),  # server time spent on this arrival
    ("compute_seconds", "f8"), # the worker's training time for the job (stragglers)
    ("accepted", "?"),
    ("reason", "i1"),          # REJECT_REASONS code
]
EVAL_FIELDS = [
    ("version", "i8"),
    ("wall_time", "f8"),
    ("virtual_time", "f8"),
    ("test_loss", "f8"),
    ("test_accuracy", "f8"),
    ("val_loss", "f8"),
    ("val_accuracy", "f8"),
]
TIMING_FIELDS = [
    ("version", "i8"),
    ("wall_time", "f8"),
    ("phase", "i1"),           # PHASES code
    ("seconds", "f8"),
]
KD_CHECK_FIELDS = [
    ("version", "i8"),         # server version the KD started from
    ("virtual_time", "f8"),
    ("staleness", "i8"),       # of the update the distilled step joins
    ("share", "f8"),           # eta * beta: how much of Delta_KD the blend applies
    ("loss_before", "f8"),     # held-out loss of x_t
    ("loss_after", "f8"),      # held-out loss of x_t + eta * beta * Delta_KD
]

# Why an arrival was not applied; rows pass the name, the file stores the code.
REJECT_REASONS = {
    "none": 0,        # accepted
    "size": 1,        # payload length does not match the model
    "client": 2,      # client id out of range or not the job's client
    "job": 3,         # unknown or duplicate job index, or sent by the wrong rank
    "version": 4,     # base version is not the job's, or lies in the future
    "nonfinite": 5,   # NaN/inf in the update or its loss
}
# Server time categories for timing rows.
PHASES = {
    "aggregate": 0,
    "distill": 1,
    "synthesize": 2,
    "eval": 3,
    "checkpoint": 4,
    "idle": 5,
    "dispatch": 6,
}

# (unit, description) of every column, stored in the file as the dataset attributes `<column>_unit` and
# `<column>_description` so a reader needs neither this package nor its source comments. Units: "s" wall
# seconds, "vt" virtual-time units of the delay model, "versions" global model versions, "" dimensionless.
COLUMN_DOCS = {
    "arrivals": {
        "wall_time": ("s", "wall time since the run started when the server finished processing the arrival"),
        "virtual_time": ("vt", "virtual-clock finish time of the job (NaN for an arrival that matches no job)"),
        "client": ("", "logical client id"),
        "rank": ("", "MPI rank of the worker that ran the job"),
        "job": ("", "job index (0, 1, ... in creation order)"),
        "base_version": ("versions", "global version the job trained from"),
        "version": ("versions", "server version after processing the arrival"),
        "staleness": ("versions", "version at processing time - base_version (-1 for a rejected unknown job)"),
        "weight": ("", "aggregation weight of the update, or the beta of FedRevive's blend (NaN when rejected)"),
        "loss": ("", "client's mean local training loss (cross-entropy)"),
        "samples": ("samples", "training samples the client holds"),
        "bytes": ("bytes", "update payload size (the float32 model delta; the message header is not counted)"),
        "server_seconds": ("s", "server time spent on this arrival, including any distillation it triggered"),
        "compute_seconds": ("s", "wall time of the job's local training on its worker, as the worker measured it "
                                 "(injected straggling excluded)"),
        "accepted": ("", "True when the update was passed to the algorithm"),
        "reason": ("", "why it was rejected: code of the reason_codes attribute (0 = none, accepted)"),
    },
    "evals": {
        "version": ("versions", "evaluated global version"),
        "wall_time": ("s", "wall time since the run started when the version was reached"),
        "virtual_time": ("vt", "virtual time when the version was reached"),
        "test_loss": ("", "mean cross-entropy on the test split"),
        "test_accuracy": ("", "fraction of the test split classified correctly"),
        "val_loss": ("", "mean cross-entropy on the validation split (NaN without one)"),
        "val_accuracy": ("", "fraction of the validation split classified correctly (NaN without one)"),
    },
    "timings": {
        "version": ("versions", "server version when the row was written"),
        "wall_time": ("s", "wall time since the run started when the row was written"),
        "phase": ("", "server activity: code of the phase_codes attribute"),
        "seconds": ("s", "server seconds spent in the phase since the previous evaluation (checkpoint: the write)"),
    },
    "kd_checks": {
        "version": ("versions", "global version x_t the distillation started from"),
        "virtual_time": ("vt", "virtual-clock finish time of the job whose arrival triggered the distillation"),
        "staleness": ("versions", "staleness of the update the distilled step is blended with (FedEcho: the "
                                  "buffered updates' mean, rounded)"),
        "share": ("", "eta * beta, the factor of Delta_KD in the new model (FedEcho: eta_kd * b, Delta_KD = "
                      "student - x')"),
        "loss_before": ("", "mean cross-entropy of x_t on the fixed held-out check images (distill.kd_check_images)"),
        "loss_after": ("", "the same for x_t + eta * beta * Delta_KD: below loss_before when KD carries knowledge "
                           "(FedEcho: loss_before is x', loss_after the corrected model)"),
    },
}

TABLES = {"arrivals": ARRIVAL_FIELDS, "evals": EVAL_FIELDS, "timings": TIMING_FIELDS, "kd_checks": KD_CHECK_FIELDS}
CODED_COLUMNS = {"arrivals": {"reason": REJECT_REASONS}, "timings": {"phase": PHASES}}
_CHUNK_ROWS = 1024  # ~100 KB chunks: few chunk writes per flush, small waste at the end
_METADATA_BYTES = 64 * 1024   # object headers, chunk index and superblock updates of one flush: a generous bound


class _Table:
    """Row buffer of one table: validates field names, encodes coded columns, writes in one slice."""

    def __init__(self, name: str, fields: list[tuple[str, str]], written: int):
        self.name = name
        self.dtype = np.dtype(fields)
        self.names = self.dtype.names
        self.keys = frozenset(self.names)
        self.codes = CODED_COLUMNS.get(name, {})
        self.rows: list[tuple] = []
        self.written = written

    def add(self, row: dict[str, Any]) -> None:
        if row.keys() != self.keys:
            unknown = sorted(row.keys() - self.keys)
            missing = sorted(self.keys - row.keys())
            raise ValueError(f"{self.name} row: unknown field(s) {unknown}, missing field(s) {missing}; "
                             f"fields are {list(self.names)}")
        for column, codes in self.codes.items():
            if row[column] not in codes:
                raise ValueError(f"{self.name} row: {column}={row[column]!r} is not one of {list(codes)}")
            row[column] = codes[row[column]]
        self.rows.append(tuple(row[n] for n in self.names))

    def new_chunks(self) -> int:
        """Chunks that writing the buffered rows adds to the dataset."""
        return -(-(self.written + len(self.rows)) // _CHUNK_ROWS) - -(-self.written // _CHUNK_ROWS)

    def write(self, ds: h5py.Dataset) -> None:
        if not self.rows:
            return
        block = self._block()
        end = self.written + len(block)
        ds.resize((end,))
        ds[self.written:end] = block
        ds.flush()  # makes the rows visible to SWMR readers
        self.written = end
        self.rows.clear()

    def _block(self) -> np.ndarray:
        try:
            return np.array(self.rows, dtype=self.dtype)
        except (TypeError, ValueError) as e:
            for i, name in enumerate(self.names):  # name the column that does not convert
                try:
                    np.array([r[i] for r in self.rows], dtype=self.dtype[name])
                except (TypeError, ValueError):
                    raise ValueError(f"{self.name}.{name}: buffered values do not convert to "
                                     f"{self.dtype[name]} ({e})") from e
            raise


class RunLog:
    """Append-only run log (rank 0 only). Call `flush()` before `counts()` when checkpointing,
    so the checkpoint never refers to rows that only lived in memory."""

    def __init__(self, path: str | os.PathLike, attrs: dict, *, flush_seconds: float = 2.0,
                 resume_counts: dict[str, int] | None = None, overwrite: bool = False):
        """New file (`resume_counts` None): fails if `path` exists unless `overwrite`.
        Resume: keep the first `resume_counts[table]` rows of each table (rows logged
        after the checkpoint are dropped, so the resumed run neither repeats nor misses
        rows) and update the root attributes with `attrs`."""
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        root_attrs = {key: _attr_value(key, value) for key, value in attrs.items()}
        if resume_counts is None:
            if self.path.exists() and not overwrite:
                raise FileExistsError(f"run log {self.path} already exists; resume the run or choose another path")
            kept = {name: np.zeros(0, np.dtype(fields)) for name, fields in TABLES.items()}
        else:
            kept, old_attrs = _read_prefix(self.path, resume_counts)
            root_attrs = {**old_attrs, **root_attrs}
        self._file = _create(self.path, root_attrs, kept)
        self._datasets = {name: self._file[name] for name in TABLES}
        self._tables = {name: _Table(name, fields, len(kept[name])) for name, fields in TABLES.items()}
        self._last_flush = time.monotonic()
        self.attrs = {key: _py(value) for key, value in root_attrs.items()}
        self._kept: dict[str, np.ndarray] | None = kept   # for observers attached before the first row
        self._observers: list = []

    def attach(self, *observers) -> None:
        """Let `observers` follow the log: `start(kept_rows, attrs)` now (the rows a resumed log kept, by table;
        empty tables on a fresh start), then `row(table, row)` for every row recorded (coded columns as their
        codes), `flush()` after every flush and `close()` at the close. Attach before the first row."""
        if self._kept is None:
            raise RuntimeError("RunLog.attach: rows were recorded already")
        for observer in observers:
            observer.start(self._kept, self.attrs)
            self._observers.append(observer)

    def _record(self, table: str, row: dict[str, Any]) -> None:
        self._kept = None   # the kept rows are only needed until the first new one
        self._tables[table].add(row)
        for observer in self._observers:
            observer.row(table, row)

    def arrival(self, **row: Any) -> None:
        """Buffer one arrival row (all ARRIVAL_FIELDS; `reason` is a REJECT_REASONS name)."""
        self._record("arrivals", row)

    def eval(self, **row: Any) -> None:
        """Buffer one evaluation row (all EVAL_FIELDS)."""
        self._record("evals", row)

    def timing(self, **row: Any) -> None:
        """Buffer one server timing row (all TIMING_FIELDS; `phase` is a PHASES name)."""
        self._record("timings", row)

    def kd_check(self, **row: Any) -> None:
        """Buffer one KD-effect row (all KD_CHECK_FIELDS)."""
        self._record("kd_checks", row)

    def counts(self) -> dict[str, int]:
        """Rows logged so far per table, written and buffered."""
        return {name: t.written + len(t.rows) for name, t in self._tables.items()}

    def maybe_flush(self) -> None:
        """Flush when `flush_seconds` have passed since the last flush; cheap enough for every loop turn."""
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Append the buffered rows to the file and make them visible to SWMR readers. A full disk (or quota)
        is an OSError before anything is written (`_reserve`); the rows then stay buffered."""
        self._reserve()
        try:
            for name, table in self._tables.items():
                table.write(self._datasets[name])
        except RuntimeError as e:   # HDF5 reports a failed write as RuntimeError; callers handle OSError
            raise OSError(f"HDF5 could not write {self.path}: {str(e).splitlines()[0]}") from e
        finally:
            for observer in self._observers:
                observer.flush()
        self._last_flush = time.monotonic()

    def _reserve(self) -> None:
        """Allocate the space the buffered rows' new chunks (and their metadata) need at the end of the file,
        before HDF5 writes them. HDF5 that meets a full disk half-way leaves its library state broken and the
        process segfaults at exit; space allocated beforehand cannot run out. HDF5 writes at its end of
        allocation, so the file keeps at most one reserve of zeros past it (read as any other run.h5)."""
        needed = _METADATA_BYTES + sum(t.new_chunks() * _CHUNK_ROWS * t.dtype.itemsize
                                       for t in self._tables.values())
        end = self._file.id.get_filesize()   # HDF5's end of allocation, not the file's size
        if self.path.stat().st_size - end >= needed:
            return
        fd = os.open(self.path, os.O_WRONLY)
        try:
            allocate(fd, end, needed)
        finally:
            os.close(fd)

    def postpone_flush(self) -> None:
        """Count a failed periodic flush as a flush, so that it is tried again only after flush_seconds."""
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close; calling it again does nothing."""
        if self._file is None:
            return
        try:
            self.flush()
        finally:   # a flush refused for want of space wrote nothing, so the file still closes cleanly
            self._file.close()
            self._file = None
            observers, self._observers = self._observers, []
            for observer in observers:
                observer.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def updates_per_second(accepted: int, last_arrival_wall: float) -> float | None:
    """THE definition of a run's throughput, used by summary.json and the report alike: accepted updates
    divided by the wall time (since the start) at which the server finished processing the last arrival
    (the arrivals column `wall_time`). Start-up before the first job, the final checkpoint and the final
    evaluation are not counted."""
    return accepted / last_arrival_wall if last_arrival_wall > 0 else None


def read_run(path: str | os.PathLike) -> dict:
    """{"attrs": {...}, "arrivals": {column: array}, "evals": {...}, "timings": {...},
    "table_attrs": {table: {attribute: value}}} (codes, units, descriptions).

    Works on a live run and on the file of a run that crashed (storage/h5open.py)."""
    path = Path(path)
    with _open_run(path) as f, _damage_is_an_error(path):
        out: dict[str, Any] = {"attrs": {k: _py(v) for k, v in f.attrs.items()}}
        out["table_attrs"] = {}
        for name in TABLES:
            data = f[name][()]
            out[name] = {column: data[column] for column in data.dtype.names}
            out["table_attrs"][name] = {k: _py(v) for k, v in f[name].attrs.items()}
    return out


@contextlib.contextmanager
def _damage_is_an_error(path: Path):
    """HDF5's errors while reading (bad checksums, data past the end of a truncated file) -> RunLogError."""
    try:
        yield
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        if isinstance(e, RunLogError):
            raise
        raise RunLogError(f"run log {path} is damaged or truncated ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    return str(e).strip().strip("'\"").splitlines()[0] if str(e).strip() else type(e).__name__


def _open_run(path: Path) -> h5py.File:
    if not path.is_file():
        raise RunLogError(f"run log not found: {path}")
    with _damage_is_an_error(path):
        try:
            f = open_readonly(path)
        except OSError as e:
            raise RunLogError(f"run log {path} is not a readable HDF5 file: damaged, truncated or not a "
                              f"run log ({_first_line(e)})") from e
        try:
            marker = f.attrs.get("format")
            version = f.attrs.get("format_version")
            missing = [name for name in TABLES if name not in f]
            if marker != FORMAT or missing:
                raise RunLogError(f"{path} is not an mpi_afl run file (root attribute format={marker!r}, "
                                  f"expected {FORMAT!r}; missing tables {missing})")
            if version not in READABLE_VERSIONS:
                raise RunLogError(f"run log {path} has format_version {version}; this version of mpi_afl reads "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}")
        except BaseException:
            f.close()
            raise
    return f


def check_resumable(path: str | os.PathLike, counts: dict[str, int], run_id: str) -> None:
    """Raise RunLogError unless `path` is an intact, version-2 log of run `run_id` holding at least
    `counts[table]` rows of each table (every kept row is read, so its checksums are verified)."""
    _read_prefix(Path(path), counts, run_id)


def _read_prefix(path: Path, counts: dict[str, int],
                 run_id: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The first counts[table] rows of each table and the root attributes of an existing run file
    (of run `run_id`, when given)."""
    if set(counts) != set(TABLES):
        raise RunLogError(f"the checkpoint counts rows of the tables {sorted(counts)}, but this version of mpi_afl "
                          f"logs {list(TABLES)}: it was written by another version")
    with _open_run(path) as f, _damage_is_an_error(path):
        if f.attrs.get("format_version") != FORMAT_VERSION:
            raise RunLogError(f"run log {path} has format_version {f.attrs.get('format_version')} (written by an "
                              f"older mpi_afl); only version {FORMAT_VERSION} logs can be continued")
        if run_id is not None and _py(f.attrs.get("run_id")) != run_id:
            raise RunLogError(f"run log {path} belongs to run {_py(f.attrs.get('run_id'))!r}, but the checkpoint "
                              f"to run {run_id!r}: the files come from different runs")
        kept = {}
        for name, n in counts.items():
            have = f[name].shape[0]
            if not 0 <= n <= have:
                raise RunLogError(f"run log {path}: table {name!r} has {have} rows but the checkpoint counts {n}: "
                                  "the log is truncated or does not belong to the checkpoint")
            kept[name] = f[name][:n]
        attrs = dict(f.attrs)
    return kept, attrs


def _create(path: Path, attrs: dict, tables: dict[str, np.ndarray]) -> h5py.File:
    """Write a fresh run file (attributes, tables with their first rows), then reopen it in SWMR write mode.

    Written to a temporary file and renamed, so a resume never leaves a half-copied log. A
    fresh file is needed on resume anyway: HDF5 refuses to reopen for writing a file whose
    SWMR writer crashed ("file is already open for write")."""
    tmp = temp_path(path)
    try:
        with h5py.File(tmp, "w-", libver="latest") as f:
            f.attrs.update(attrs)
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            for name, rows in tables.items():
                ds = f.create_dataset(name, data=rows, maxshape=(None,), chunks=(_CHUNK_ROWS,), fletcher32=True)
                for column, codes in CODED_COLUMNS.get(name, {}).items():
                    ds.attrs[f"{column}_codes"] = json.dumps(codes)
                for column, (unit, description) in COLUMN_DOCS[name].items():
                    ds.attrs[f"{column}_unit"] = unit
                    ds.attrs[f"{column}_description"] = description
        atomic_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    f = h5py.File(path, "r+", libver="latest")
    f.swmr_mode = True
    return f


def _attr_value(key: str, value: Any) -> Any:
    if key in ("format", "format_version"):
        raise ValueError(f"run log attribute {key!r} is reserved")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if isinstance(value, (str, bool, int, float, np.generic)):
        return value
    raise TypeError(f"run log attribute {key!r}: cannot store {type(value).__name__}; "
                    "allowed: str, int, float, bool, dict/list (stored as JSON)")


def _py(value: Any) -> Any:
    """numpy scalars from h5py attributes -> Python values."""
    return value.item() if isinstance(value, np.generic) else value
