"""Export runs: each run's tables as CSV (with their units) or TensorBoard event files, and for CSV the tables
of all the runs together (runs.csv, runs_evals.csv: mpi_afl.results.runs_table / evals_table). No torch.

    mpi-afl export RUN_DIR [RUN_DIR ...] --out DIR [--format csv|tensorboard] [--target ACC]
    (= python -m mpi_afl.export ...)
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from datetime import datetime
from pathlib import Path

from mpi_afl.results import Run, eval_rows, load_many, table_rows, write_rows


def export_csv(run: Run, out: Path) -> list[Path]:
    """One CSV per table (`<table>.csv`, a header row of column names) and `columns.csv` (table, column,
    unit, description) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, columns in run.tables.items():
        path = out / f"{name}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(list(columns))
            # tolist(): Python floats print with repr precision, so a CSV round trip is exact
            writer.writerows(zip(*(v.tolist() for v in columns.values())))
        written.append(path)
    path = out / "columns.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["table", "column", "unit", "description"])
        for name, units in run.units.items():
            for column, unit in units.items():
                writer.writerow([name, column, unit, run.descriptions[name][column]])
    written.append(path)
    return written


def export_tensorboard(run: Run, out: Path) -> Path:
    """TensorBoard event file: per evaluation, test/val accuracy and loss and `time/virtual_time` (vt) and
    `time/wall_seconds` (s), step = the evaluated version, event time = the run's start plus the wall time;
    the scalar names of the live tracker's by_version layout (storage/tracking.py), so a chart can use
    `time/virtual_time` as its x axis. Needs the `tensorboard` package."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise ImportError("TensorBoard export needs the tensorboard package: pip install 'mpi_afl[tensorboard]'") \
            from None
    out.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(out))
    start = _start_time(run)
    evals = run.tables["evals"]
    for i, version in enumerate(evals["version"]):
        wall = float(evals["wall_time"][i])
        values = [Summary.Value(tag=f"{split}/{metric}", simple_value=float(evals[f"{split}_{metric}"][i]))
                  for split in ("test", "val") for metric in ("accuracy", "loss")
                  if not math.isnan(evals[f"{split}_{metric}"][i])]
        values += [Summary.Value(tag="time/virtual_time", simple_value=float(evals["virtual_time"][i])),
                   Summary.Value(tag="time/wall_seconds", simple_value=wall)]
        writer.add_event(Event(wall_time=start + wall, step=int(version), summary=Summary(value=values)))
    writer.close()
    return out


def _start_time(run: Run) -> float:
    """The run's start as a Unix time (the `started` attribute), 0 when unknown."""
    try:
        return datetime.strptime(run.attrs.get("started", ""), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return 0.0


def export_name(run: Run, runs: list[Run]) -> str:
    """A directory name for the run's export: its directory name, made unique by its parent's when needed."""
    name = run.directory.name
    if sum(r.directory.name == name for r in runs) > 1:
        name = f"{run.directory.parent.name}-{name}"
    return name


def main(argv: list[str] | None = None) -> int:
    export = argparse.ArgumentParser(
        prog="mpi-afl export",
        description="Write each run's tables (arrivals, evals, timings, kd_checks) into OUT/<run>/: one CSV per "
                    "table plus columns.csv (every column's unit and description), or TensorBoard event files "
                    "(scalars by version; needs the tensorboard extra). CSV also writes the tables of all the "
                    "runs together: OUT/runs.csv, one row per run (algorithm, seed, the config keys that differ "
                    "between the runs, metrics), and OUT/runs_evals.csv, one row per (run, evaluation).",
        epilog="example: mpi-afl export sweep/ --out csv --target 0.8   (then pandas.read_csv('csv/runs.csv'))")
    export.add_argument("runs", nargs="+", metavar="RUN", help="run directories, run.h5 files or directories of runs")
    export.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="one subdirectory per run is written here (and, for csv, runs.csv and runs_evals.csv)")
    export.add_argument("--format", choices=["csv", "tensorboard"], default="csv",
                        help="csv: one file per table and columns.csv (default); tensorboard: event files")
    export.add_argument("--target", type=float, metavar="ACC",
                        help="test accuracy whose first crossing gives runs.csv's virtual_time_to_target and "
                             "wall_time_to_target (empty without it)")
    args = export.parse_args(argv)
    try:
        runs = load_many(args.runs)
        for run in runs:
            target = args.out / export_name(run, runs)
            if args.format == "csv":
                paths = export_csv(run, target)
            else:
                paths = [export_tensorboard(run, target)]
            print(f"{run.directory} -> {', '.join(str(p) for p in paths)}")
        if args.format == "csv":
            tables = (write_rows(table_rows(runs, args.target), args.out / "runs.csv"),
                      write_rows(eval_rows(runs), args.out / "runs_evals.csv"))
            print(f"{len(runs)} run(s) -> {', '.join(map(str, tables))}")
    except (OSError, ValueError, ImportError) as e:
        print(f"mpi-afl export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
