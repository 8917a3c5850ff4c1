"""Read runs back: plain arrays (and pandas DataFrames), run groups, the table of many runs.

Nothing here imports torch (a test checks it): reading a run costs h5py and
numpy, so notebooks and plotting scripts start in about a second.

    from mpi_afl import results
    run = results.load("runs/fedbuff-digits-virtual-s0-...")   # a run directory or its run.h5
    run.tables["evals"]["test_accuracy"]                       # numpy arrays, one per column
    run.units["arrivals"]["virtual_time"]                      # "vt" (see docs/design.md "Output")
    run.frame("arrivals")                                      # a DataFrame, when pandas is installed
    runs = results.load_many(["sweep/"])                       # every run below a directory
    results.runs_table("sweep/")          # DataFrame, one row per run: algorithm, seed, the settings that differ, metrics
    results.evals_table("sweep/")         # DataFrame, one row per (run, evaluation): the curves in long form

Coded columns (`arrivals.reason`, `timings.phase`) come back as their names. The two tables' columns are listed
in docs/design.md "Output" (Reading results). CSV and TensorBoard export: mpi_afl/export.py (`mpi-afl export`).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpi_afl.names import ALGORITHMS
from mpi_afl.storage.runlog import read_run
from mpi_afl.storage.runlog.schema import COLUMN_DOCS, TABLES, updates_per_second

RUN_FILE = "run.h5"
# Config keys that do not change what a run computes; runs that differ only in these (and the seed) are
# repetitions of one setting. Resume-time placement keys, output place and logging cadence.
NOT_SETTING = {"run.seed", "run.out", "run.overwrite", "run.threads", "run.device", "run.placement",
               "run.log_flush_seconds", "run.heartbeat_seconds", "run.checkpoint_every", "server.queue_depth",
               "run.tensorboard", "run.mlflow", "run.mlflow_uri", "run.mlflow_experiment"}   # live tracking
# Config sections that only some built-in algorithms read (mpi_afl/algorithms): for a run of another built-in
# algorithm their keys change nothing, so they do not tell its settings apart (runs made before a default of
# such a section changed stay one setting). A plug-in may read any section, so for it every key counts.
SECTION_READERS = {"distill": {"fedrevive", "dd_fedrevive", "fedecho"}, "echo": {"fedecho"}}
# The keys of a built-in algorithm's update rule (README "Algorithms", docs/algorithms.md), named in every label of
# its settings even when all runs share them: a legend entry "fedbuff" alone does not say which FedBuff it is.
DEFINING_KEYS = {
    "fedavg": ("server.concurrency", "server.lr"),
    "fedasync": ("server.mixing", "server.staleness"),
    "fedbuff": ("server.buffer_size", "server.lr", "server.staleness"),
    "afl_dw": ("server.lr", "server.s_max"),
    "ca2fl": ("server.buffer_size", "server.lr"),
    "fedrevive": ("server.lr", "server.s_max"),
    "dd_fedrevive": ("server.lr", "server.s_max", "data.kd_fraction"),
    "fedecho": ("server.buffer_size", "server.lr", "echo.kd_step", "echo.weighting"),
}


@dataclass
class Run:
    directory: Path
    attrs: dict                                    # root attributes of run.h5 (config as a dict under "config")
    config: dict                                   # {section: {key: value}}
    tables: dict[str, dict[str, np.ndarray]]       # {table: {column: array}}, codes decoded to names
    units: dict[str, dict[str, str]]               # {table: {column: unit}}
    descriptions: dict[str, dict[str, str]]        # {table: {column: description}}
    summary: dict | None = None                    # summary.json when the run finished
    label: str = ""

    def frame(self, table: str):
        """The table as a pandas DataFrame (units and descriptions in `df.attrs`)."""
        df = _pandas().DataFrame(self.tables[table])
        df.attrs.update(units=self.units[table], descriptions=self.descriptions[table])
        return df

    @property
    def finished(self) -> bool:
        """The run met its stop rule: its summary.json exists and does not say it was stopped by a signal."""
        return self.summary is not None and self.summary.get("stop_reason") != "signal"

    def value(self, dotted: str):
        """A config value by dotted key (`"server.algorithm"`), None when absent."""
        section, key = dotted.split(".", 1)
        return self.config.get(section, {}).get(key)


def run_file(path: str | Path) -> Path:
    """A run directory's run.h5, or the given file; a clear FileNotFoundError otherwise."""
    path = Path(path)
    if path.is_dir():
        if not (path / RUN_FILE).is_file():
            raise FileNotFoundError(f"{path} is a directory without a {RUN_FILE}; not an mpi_afl run directory")
        return path / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"run file not found: {path}")
    return path


def load(path: str | Path) -> Run:
    """Load one run (directory or run.h5). Works on a live or crashed run too (SWMR read)."""
    file = run_file(path)
    data = read_run(file)
    attrs = dict(data["attrs"])
    config = json.loads(attrs.get("config") or "{}")
    attrs["config"] = config
    tables, units, descriptions = {}, {}, {}
    for name in TABLES:
        table_attrs = data["table_attrs"][name]
        columns = dict(data[name])
        for column in list(columns):
            codes = table_attrs.get(f"{column}_codes")
            if codes is not None:
                names = {code: key for key, code in json.loads(codes).items()}
                columns[column] = np.array([names.get(int(c), f"code {int(c)}") for c in columns[column]], dtype=str)
        tables[name] = columns
        # Files written before units were stored fall back to this package's table of them.
        units[name] = {c: table_attrs.get(f"{c}_unit", COLUMN_DOCS[name].get(c, ("", ""))[0]) for c in columns}
        descriptions[name] = {c: table_attrs.get(f"{c}_description", COLUMN_DOCS[name].get(c, ("", ""))[1])
                              for c in columns}
    summary_path = file.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    run = Run(file.parent, attrs, config, tables, units, descriptions, summary)
    algorithm, seed = run.value("server.algorithm"), run.value("run.seed")
    run.label = attrs.get("label") or (f"{algorithm} s{seed}" if algorithm else file.parent.name)
    return run


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run files for the given paths: a run.h5, a run directory, or any directory holding runs below it."""
    found = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / RUN_FILE).is_file():
            below = sorted(path.rglob(RUN_FILE))
            if not below:
                raise FileNotFoundError(f"no {RUN_FILE} in or below {path}")
            found.extend(below)
        else:
            found.append(run_file(path))
    return found


def load_many(paths: list[str | Path]) -> list[Run]:
    return [load(p) for p in find_runs(paths)]


def tail_accuracy(virtual_time, accuracy, budget: float, share: float = 0.25) -> float | None:
    """Mean test accuracy of the evaluations in the last `share` of a run's virtual-time `budget` (None if
    there are none there): less noisy than the last evaluation alone. `virtual_time`, `accuracy`: the evals
    table's columns."""
    t, a = np.asarray(virtual_time, dtype=float), np.asarray(accuracy, dtype=float)
    tail = a[t >= (1 - share) * budget]
    return float(tail.mean()) if len(tail) else None


def time_to_target(virtual_time, accuracy, target: float) -> float | None:
    """Virtual time of the first evaluation whose test accuracy reaches `target` (None: never). Compare runs
    evaluated on one grid (run.eval_every_time): with evaluations every N versions, a method of buffer size B
    is checked every N x B updates and gets a head start of up to one interval."""
    t, a = np.asarray(virtual_time, dtype=float), np.asarray(accuracy, dtype=float)
    reached = np.flatnonzero(a >= target)
    return float(t[reached[0]]) if len(reached) else None


def run_updates_per_second(run: Run) -> float | None:
    arrivals = run.tables["arrivals"]
    if not len(arrivals["wall_time"]):
        return None
    return updates_per_second(int(arrivals["accepted"].sum()), float(arrivals["wall_time"].max()))


# ------------------------------------------------------------------ groups of seeds
def _setting(run: Run) -> dict[str, object]:
    """The run's config keys that can change what it computes (NOT_SETTING and SECTION_READERS)."""
    algorithm = run.value("server.algorithm")
    ignored = {section for section, readers in SECTION_READERS.items()
               if algorithm in ALGORITHMS and algorithm not in readers}
    return {f"{section}.{key}": (tuple(v) if isinstance(v, list) else v)
            for section, body in run.config.items() if section not in ignored
            for key, v in body.items() if f"{section}.{key}" not in NOT_SETTING}


@dataclass
class Group:
    """Runs of one setting (configs equal except NOT_SETTING keys, so normally only the seed differs).

    `runs` are the ones its statistics use: the finished ones when it has any (a sweep in progress), else all
    (e.g. live runs alone); `left_out` are its unfinished runs when finished ones exist."""
    label: str
    runs: list[Run] = field(default_factory=list)
    left_out: list[Run] = field(default_factory=list)


def differing_keys(settings: list[dict[str, object]]) -> set[str]:
    """Keys with different values in two settings that both have them (a section the algorithm does not read
    is absent, not different)."""
    return {k for values in settings for k, v in values.items()
            if any(k in other and other[k] != v for other in settings)}


def setting_label(values: dict[str, object], differing: set[str], fallback: str) -> str:
    """The algorithm (`fallback` without one) and, with full dotted names, its DEFINING_KEYS and the `differing`
    keys: "fedbuff (server.buffer_size=4, server.lr=0.5, server.staleness=none)"."""
    name = values.get("server.algorithm") or fallback
    keys = sorted((set(DEFINING_KEYS.get(name, ())) | differing) & values.keys() - {"server.algorithm"})
    return f"{name} ({', '.join(f'{k}={_short(values[k])}' for k in keys)})" if keys else name


def group_by_setting(runs: list[Run]) -> list[Group]:
    """Groups in first-seen order, each labelled by `setting_label`."""
    settings: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted(_setting(run).items()))
        settings.setdefault(key, []).append(run)
    differing = differing_keys([dict(key) for key in settings])
    groups = []
    for key, members in settings.items():
        finished = [run for run in members if run.finished]
        left_out = [run for run in members if not run.finished] if finished else []
        groups.append(Group(setting_label(dict(key), differing, members[0].label), finished or members, left_out))
    return groups


def _short(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that exist (None for a single value or none)."""
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else None)


# ------------------------------------------------------------------ one table of many runs
# summary.json keys copied into a row of runs_table (None for a run without summary.json: live or killed).
SUMMARY_COLUMNS = ("versions", "virtual_time", "wall_seconds", "server_busy_fraction",
                   "worker_idle_fraction", "model_sha256")


def budget(run: Run) -> float:
    """The virtual-time budget tail_accuracy's share is of: run.max_virtual_time, else the last evaluation's time."""
    times = run.tables["evals"]["virtual_time"]
    return run.value("run.max_virtual_time") or (float(times[-1]) if len(times) else 0.0)


def run_metrics(run: Run, target: float | None = None, tail_share: float = 0.25) -> dict:
    """A run's metrics from its run.h5 tables (a live run has them too); None where a value does not exist (no
    evaluation, no accepted update, no `target` or not reached)."""
    evals, arrivals = run.tables["evals"], run.tables["arrivals"]
    acc, accepted = evals["test_accuracy"], arrivals["accepted"]
    staleness = arrivals["staleness"][accepted]
    n_accepted = int(accepted.sum())
    has_target = target is not None
    return {
        "evaluations": len(acc),
        "final_accuracy": float(acc[-1]) if len(acc) else None,
        "best_accuracy": float(np.nanmax(acc)) if len(acc) else None,
        "tail_accuracy": tail_accuracy(evals["virtual_time"], acc, budget(run), tail_share),
        "target": target,
        "virtual_time_to_target": time_to_target(evals["virtual_time"], acc, target) if has_target else None,
        "wall_time_to_target": time_to_target(evals["wall_time"], acc, target) if has_target else None,
        "updates_received": len(accepted),
        "updates_accepted": n_accepted,
        "updates_rejected": len(accepted) - n_accepted,
        "updates_per_second": run_updates_per_second(run),
        "mean_staleness": float(staleness.mean()) if n_accepted else None,
        "max_staleness": int(staleness.max()) if n_accepted else None,
    }


def _runs(source) -> list[Run]:
    """Runs from a path (run directory, run.h5, directory of runs), a list of paths, or a list of Runs."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    return items if all(isinstance(item, Run) for item in items) else load_many(items)


def _identities(runs: list[Run]) -> list[dict]:
    """Per run: its directory, setting label (group_by_setting's), algorithm, seed and one entry per config key
    (dotted) whose value differs across `runs` (None where the run's algorithm does not read the key's section)."""
    settings = [_setting(run) for run in runs]
    keys = sorted(differing_keys(settings) - {"server.algorithm"})
    label = {id(run): group.label for group in group_by_setting(runs) for run in group.runs + group.left_out}
    return [{"run": str(run.directory), "setting": label[id(run)], "algorithm": run.value("server.algorithm"),
             "seed": run.value("run.seed"), **{k: setting.get(k) for k in keys}}
            for run, setting in zip(runs, settings)]


def table_rows(runs: list[Run], target: float | None = None) -> list[dict]:
    """runs_table's rows as dicts, every row with the same keys (no pandas needed)."""
    stats = sorted({k for run in runs for k in (run.summary or {}).get("algorithm_stats", {})})
    rows = []
    for run, identity in zip(runs, _identities(runs)):
        summary = run.summary or {}
        rows.append({**identity, "finished": run.finished, "stop_reason": summary.get("stop_reason"),
                     **run_metrics(run, target),
                     **{k: summary.get(k) for k in SUMMARY_COLUMNS},
                     **{f"algorithm_stats.{k}": summary.get("algorithm_stats", {}).get(k) for k in stats}})
    return rows


def eval_rows(runs: list[Run]) -> list[dict]:
    """evals_table's rows as dicts: each run's identity, then one evaluation (the evals table's columns)."""
    rows = []
    for run, identity in zip(runs, _identities(runs)):
        evals = run.tables["evals"]
        rows += [{**identity, **dict(zip(evals, values))} for values in zip(*(v.tolist() for v in evals.values()))]
    return rows


def runs_table(source, target: float | None = None):
    """One row per run of `source` (a sweep directory, run directories or run.h5 files, or loaded Runs):
    `run`, `setting`, `algorithm`, `seed`, one column per differing config key (dotted, e.g. `server.lr`),
    `finished`, `stop_reason`, the run_metrics (`target`: for the time-to-target columns), SUMMARY_COLUMNS and
    `algorithm_stats.<key>` for every key any run reports. A pandas DataFrame."""
    return _pandas().DataFrame.from_records(table_rows(_runs(source), target))


def evals_table(source):
    """One row per (run, evaluation), for curves: runs_table's identity columns, then the evals table's
    (`version`, `wall_time`, `virtual_time`, test/val loss and accuracy). A pandas DataFrame."""
    return _pandas().DataFrame.from_records(eval_rows(_runs(source)))


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("DataFrames need pandas (pip install pandas); run.tables, table_rows and eval_rows hold "
                          "the same values without it") from None
    return pandas


def write_rows(rows: list[dict], path: Path) -> Path:
    """`rows` as CSV with a header of their keys: None is an empty cell, a list value its items joined by
    commas, a float its repr (an exact round trip)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(rows[0]) if rows else [])
        writer.writerows([["" if v is None else _short(v) if isinstance(v, tuple) else v for v in row.values()]
                          for row in rows])
    return path
