"""Reading run.h5: `read_run` (a live run's file too, never hanging on a damaged one) and the check that a log
can be continued on resume (`check_resumable`, `read_prefix`)."""

import contextlib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpi_afl.storage.h5open import open_readonly
from mpi_afl.storage.runlog.schema import FORMAT, FORMAT_VERSION, READABLE_VERSIONS, TABLES, RunLogError


def read_run(path: str | os.PathLike) -> dict:
    """{"attrs": {...}, "arrivals": {column: array}, "evals": {...}, "timings": {...},
    "table_attrs": {table: {attribute: value}}} (codes, units, descriptions).

    Works on a live run and on the file of a run that crashed (storage/h5open.py)."""
    path = Path(path)
    with _open_run(path) as f, _damage_is_an_error(path):
        out: dict[str, Any] = {"attrs": {k: py_value(v) for k, v in f.attrs.items()}}
        out["table_attrs"] = {}
        for name in TABLES:
            data = f[name][()]
            out[name] = {column: data[column] for column in data.dtype.names}
            out["table_attrs"][name] = {k: py_value(v) for k, v in f[name].attrs.items()}
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
    read_prefix(Path(path), counts, run_id)


def read_prefix(path: Path, counts: dict[str, int],
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
        if run_id is not None and py_value(f.attrs.get("run_id")) != run_id:
            raise RunLogError(f"run log {path} belongs to run {py_value(f.attrs.get('run_id'))!r}, but the checkpoint "
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


def py_value(value: Any) -> Any:
    """numpy scalars from h5py attributes -> Python values."""
    return value.item() if isinstance(value, np.generic) else value
