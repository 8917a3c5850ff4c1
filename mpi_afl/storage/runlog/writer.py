"""`RunLog`: the append-only writer of run.h5 (rank 0 only), with its row buffers, observers and the space
reserved before each flush."""

import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpi_afl.storage.atomic import allocate, atomic_write
from mpi_afl.storage.runlog.reader import py_value, read_prefix
from mpi_afl.storage.runlog.schema import CODED_COLUMNS, COLUMN_DOCS, FORMAT, FORMAT_VERSION, TABLES

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
            kept, old_attrs = read_prefix(self.path, resume_counts)
            root_attrs = {**old_attrs, **root_attrs}
        self._file = _create(self.path, root_attrs, kept)
        self._datasets = {name: self._file[name] for name in TABLES}
        self._tables = {name: _Table(name, fields, len(kept[name])) for name, fields in TABLES.items()}
        self._last_flush = time.monotonic()
        self.attrs = {key: py_value(value) for key, value in root_attrs.items()}
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


def _create(path: Path, attrs: dict, tables: dict[str, np.ndarray]) -> h5py.File:
    """Write a fresh run file (attributes, tables with their first rows), then reopen it in SWMR write mode.

    Written to a temporary file and renamed, so a resume never leaves a half-copied log. A
    fresh file is needed on resume anyway: HDF5 refuses to reopen for writing a file whose
    SWMR writer crashed ("file is already open for write")."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w-", libver="latest") as f:
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
