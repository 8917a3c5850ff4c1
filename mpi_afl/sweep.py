"""Sweeps: a grid of runs (algorithms x overrides x seeds), run locally or as a SLURM job array.

    python -m mpi_afl.sweep --out DIR --algorithms fedbuff,afl_dw --seeds 0,1,2 \\
        [--set server.lr=0.1,0.5 ...] [--parallel N] [--ranks R] [--slurm FILE] [-- TRAIN OPTIONS ...]
    python -m mpi_afl.sweep --out DIR --experiment experiments/smoke/experiment.toml [--parallel N] [--slurm FILE]

Every grid point is one run directory, DIR/<algorithm>[-<key>=<value>...]/s<seed>. Options after
`--` (a preset, stop rules, data options...) go to every run. Locally, N runs go at a time, each
one process (`--ranks 1`, results are identical for any rank count in the virtual clock) or
`mpiexec -n R`; a run's console output goes to DIR/logs/ and its CPU seconds (user + system of all its
processes, summed over its launches) to <run directory>.usage.json beside it. The sweep is resumable: a
point whose summary.json says it met its stop rule (diverged included: that is a result) is done and
skipped; one stopped by a signal (pre-emption, Ctrl-C: its summary.json says "signal") or killed outright
continues from its checkpoint.h5 with `--resume`; one with neither starts over, and so does a finished one
whose run.h5 is missing or damaged (said in one line: the virtual clock repeats it exactly). A run whose resume is
refused (a damaged run file, a checkpoint of another version) is reported as failed with its log and left as
it is: delete its directory to start it over. At the end the mean ± std table over seeds is printed
(`mpi_afl.report`).

With `--slurm FILE` nothing runs here: FILE becomes an sbatch script with one array task per grid
point, each running `python -m mpi_afl.slurm` (which resumes and requeues itself; see
mpi_afl/slurm.py) on the same directories, so the local and SLURM sweeps are interchangeable.
`--array-parallel N` limits the array to N tasks at a time (default: no limit); `--partition`,
`--account`, `--gpus-per-task`, `--cpus-per-task` and `--sbatch=OPTION` (repeatable) add `#SBATCH` lines.

`--experiment FILE` runs an experiment.toml (cells x methods x seeds, each method's full settings;
mpi_afl/experiment/) into DIR/<cell>/<method>/s<seed> the same way, locally or with --slurm, and ends with
its tables (`mpi-afl report DIR`). `run_local` takes any grid points that name their directory, their
fresh-run options and their log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from .plugins import short_name


class GridPoint(Protocol):
    """What `run_local` needs of a grid point (Point below; mpi_afl.experiment.Point)."""

    def directory(self, out: Path) -> Path: ...
    def train_args(self, out: Path, extra: list[str]) -> list[str]: ...
    def log_name(self) -> str: ...


@dataclass(frozen=True)
class Point:
    algorithm: str
    overrides: tuple[tuple[str, str], ...]   # (dotted key, value) pairs
    seed: int

    def setting(self) -> str:
        parts = [short_name(self.algorithm)] + [f"{key.split('.', 1)[1]}={short_name(value)}"
                                                for key, value in self.overrides]
        return "-".join(parts)

    def directory(self, out: Path) -> Path:
        return out / self.setting() / f"s{self.seed}"

    def log_name(self) -> str:
        return f"{self.setting()}-s{self.seed}"

    def train_args(self, out: Path, extra: list[str]) -> list[str]:
        """The trainer's options for a fresh run of this point (the shared options first, so the grid's
        own values win)."""
        return [*extra, "--algorithm", self.algorithm, "--seed", str(self.seed),
                *(f"--{key}={value}" for key, value in self.overrides), "--out", str(self.directory(out))]


def grid(algorithms: list[str], seeds: list[int], sets: list[str]) -> list[Point]:
    """Every combination, algorithms outermost and seeds innermost. `sets`: "section.key=v1,v2"."""
    axes = []
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or "." not in key or not values:
            raise ValueError(f"--set {item!r}: expected section.key=VALUE[,VALUE...]")
        axes.append([(key, v) for v in values.split(",")])
    return [Point(a, combo, s) for a in algorithms for combo in itertools.product(*axes) for s in seeds]


# Client updates per global version, by algorithm: what makes a version budget unequal work.
_BUFFERED = {"fedbuff", "ca2fl", "fedecho"}   # B = server.buffer_size


def updates_per_version(cfg) -> int | None:
    """Accepted client updates per version of `cfg`'s algorithm (None for a plug-in: unknown)."""
    name = cfg.server.algorithm
    if name in _BUFFERED:
        return cfg.server.buffer_size
    if name == "fedavg":
        return cfg.server.concurrency
    return 1 if ":" not in name else None


def unequal_work(points: list[GridPoint], out: Path, extra: list[str]) -> str:
    """A one-line warning when the grid compares algorithms that turn different numbers of client updates into
    a version under a version budget (run.max_versions alone), or '' when the work is equal."""
    from .config import ConfigError, parse_args
    per_version = set()   # (algorithm, updates per version): a --set axis of buffer sizes counts too
    for point in points:
        try:
            cfg, _ = parse_args(point.train_args(out, extra))
        except (ConfigError, SystemExit):
            return ""   # the run itself says what is wrong with its options
        r = cfg.run
        if r.max_versions and not (r.max_updates or r.max_virtual_time) and updates_per_version(cfg):
            per_version.add((short_name(cfg.server.algorithm), updates_per_version(cfg)))
    if len({n for _, n in per_version}) < 2:
        return ""
    mix = ", ".join(f"{name} {n}" for name, n in sorted(per_version))
    return (f"sweep: warning: a version counts aggregations, not client updates, and these algorithms make one from "
            f"different numbers of updates ({mix}): under run.max_versions they do unequal work; compare them with "
            f"--run.max_updates=N or --run.max_virtual_time=T")


def state(directory: Path) -> str:
    """'done' (summary.json of a run that met its stop rule, and an intact run.h5), 'damaged' (such a
    summary, but run.h5 is missing or damaged, or summary.json unreadable), 'resume' (a checkpoint.h5 and no
    such summary: the run was stopped by a signal or killed) or 'start'."""
    summary = directory / "summary.json"
    if summary.is_file():
        try:
            stop = json.loads(summary.read_text()).get("stop_reason")
        except (OSError, ValueError, AttributeError):
            return "damaged"
        if stop != "signal":
            return "damaged" if damage(directory) else "done"
    if (directory / "checkpoint.h5").is_file():
        return "resume"
    return "start"


def damage(directory: Path) -> str:
    """Why the finished run in `directory` cannot be read (its run.h5), or '' if it can."""
    from .storage.runlog import RunLogError, read_run
    try:
        read_run(directory / "run.h5")
    except RunLogError as e:
        return str(e)
    return ""


def usage_path(directory: Path) -> Path:
    """Where `run_local` writes a run's CPU usage: beside its directory, so --run.overwrite leaves it."""
    return directory.parent / f"{directory.name}.usage.json"


def add_usage(directory: Path, cpu_seconds: float, max_rss_mb: float, fresh: bool) -> dict:
    """Add one launch's CPU seconds to the run's usage file (started over when the launch was `fresh`).

    `max_rss_mb`: the largest resident set of any one of the launch's processes, the maximum over launches."""
    path = usage_path(directory)
    usage = {"cpu_seconds": 0.0, "launches": 0, "max_rss_mb": 0}
    if not fresh and path.is_file():
        usage.update(json.loads(path.read_text()))
    usage = {"cpu_seconds": round(usage["cpu_seconds"] + cpu_seconds, 1), "launches": usage.get("launches", 1) + 1,
             "max_rss_mb": max(usage["max_rss_mb"], round(max_rss_mb))}
    path.write_text(json.dumps(usage))
    return usage


def command(point: GridPoint, out: Path, extra: list[str], ranks: int) -> list[str]:
    """The command that brings this point to completion from where it is."""
    d = point.directory(out)
    if state(d) == "resume":
        args = ["--resume", str(d)]   # a damaged finished run starts over: the virtual clock repeats it exactly
    else:
        args = point.train_args(out, extra) + (["--run.overwrite=true"] if d.exists() else [])
    launcher = []
    if ranks > 1:
        from .launch import mpiexec_path
        launcher = [mpiexec_path(), "-n", str(ranks)]
    return [*launcher, sys.executable, "-m", "mpi_afl.train", *args]


def run_local(points: list[GridPoint], out: Path, extra: list[str], parallel: int, ranks: int,
              log: TextIO | None = None) -> list[GridPoint]:
    """Run the points that are not done, `parallel` at a time; returns the ones that did not finish.
    Progress lines go to `log` (default: standard output)."""
    log = log or sys.stdout
    todo = [p for p in points if state(p.directory(out)) != "done"]
    for p in todo:
        if state(p.directory(out)) == "damaged":
            why = damage(p.directory(out)) or "its summary.json is unreadable"
            print(f"sweep: {p.directory(out)} finished but is damaged ({why}); running it again from the start",
                  file=log, flush=True)
    print(f"sweep: {len(points)} runs, {len(points) - len(todo)} already done, {len(todo)} to run, "
          f"{parallel} at a time", file=log, flush=True)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def one(point: GridPoint) -> bool:
        directory = point.directory(out)
        fresh = state(directory) in ("start", "damaged")
        cmd = command(point, out, extra, ranks)
        t0 = time.monotonic()
        with open(logs / f"{point.log_name()}.log", "a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            # wait4: the CPU seconds of the run and every process it waited for (the ranks under mpiexec);
            # on a shared machine they measure a run's cost where its wall time also counts the others.
            _, status, usage = os.wait4(proc.pid, 0)
            code = proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        if directory.is_dir():
            add_usage(directory, cpu, usage.ru_maxrss / 1024, fresh)
        ok = state(directory) == "done"
        ended = (f"done ({json.loads((directory / 'summary.json').read_text())['stop_reason']})" if ok
                 else f"FAILED (exit {code}; log {logs / point.log_name()}.log)")
        print(f"sweep: {ended} {directory} in {time.monotonic() - t0:.0f}s ({cpu:.0f} CPU s)", file=log, flush=True)
        return ok

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(one, todo))
    return [p for p, ok in zip(todo, results) if not ok]


def slurm_script(points: list[Point], out: Path, extra: list[str], ranks: int, time_limit: str,
                 parallel: int | None, sbatch: list[str] = ()) -> str:
    """An sbatch script with one array task per point; each runs mpi_afl.slurm on the point's directory.
    `parallel`: array tasks at a time (`--array=0-N%parallel`; None or 0: as many as the scheduler starts);
    `sbatch`: more sbatch options, one `#SBATCH` line each (partition, account, GPUs, ...)."""
    throttle = f"%{parallel}" if parallel else ""
    more = "".join(f"#SBATCH {option}\n" for option in sbatch)
    tasks = "\n".join(f"    {shlex.quote(shlex.join(p.train_args(out, extra)))}" for p in points)
    dirs = "\n".join(f"    {shlex.quote(str(p.directory(out)))}" for p in points)
    return f"""#!/usr/bin/env bash
# Written by `python -m mpi_afl.sweep --slurm`: {len(points)} runs, one array task each, under {out}.
# Submit from this directory: sbatch THIS_FILE. A task resumes its run and requeues itself near the
# time limit (mpi_afl/slurm.py); afterwards: python -m mpi_afl.report {shlex.quote(str(out))}
#SBATCH --job-name=mpi_afl-sweep
#SBATCH --ntasks={ranks}
#SBATCH --time={time_limit}
#SBATCH --array=0-{len(points) - 1}{throttle}
#SBATCH --output={out}/logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue
{more}set -euo pipefail
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}
DIRS=(
{dirs}
)
ARGS=(
{tasks}
)
eval "set -- ${{ARGS[$SLURM_ARRAY_TASK_ID]}}"
exec {shlex.quote(sys.executable)} -m mpi_afl.slurm "${{DIRS[$SLURM_ARRAY_TASK_ID]}}" "$@"
"""


def print_table(out: Path) -> None:
    from .report import format_group_table, summarize, summarize_group
    from .results import group_by_setting, load_many
    from .storage.runlog import RunLogError
    try:
        runs = load_many([out])
    except FileNotFoundError:
        print(f"sweep: no finished run under {out} yet")
        return
    except RunLogError as e:
        print(f"sweep: no table: {e}", file=sys.stderr)
        return
    groups = group_by_setting(runs)
    print(format_group_table([summarize_group(g, [summarize(r, None) for r in g.runs]) for g in groups]))


def run_experiment(args: argparse.Namespace, extra: list[str]) -> int:
    """`--experiment FILE`: its runs into args.out (locally or as a SLURM array), then its tables, rows and
    plots (`mpi-afl report OUT`)."""
    from .experiment import ExperimentError, load_experiment, prepare, report
    try:
        experiment = load_experiment(args.experiment)
        prepare(experiment, args.out)
    except ExperimentError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    points = experiment.points()
    if warning := unequal_work(points, args.out, extra):
        print(warning, file=sys.stderr)
    if args.slurm:
        (args.out / "logs").mkdir(parents=True, exist_ok=True)
        args.slurm.write_text(slurm_script(points, args.out, extra, args.ranks, args.time, args.parallel))
        print(f"sweep: wrote {args.slurm} ({len(points)} array tasks); submit with: sbatch {args.slurm}; "
              f"then: mpi-afl report {args.out}")
        return 0
    failed = [] if args.table_only else run_local(points, args.out, extra, args.parallel, args.ranks)
    report(args.out, None, ["png"])
    if failed:
        print(f"sweep: {len(failed)} run(s) failed; see {args.out / 'logs'}; run the same command again to "
              "retry them (finished runs are kept)", file=sys.stderr)
        return 1
    return 0


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def sbatch_options(args: argparse.Namespace) -> list[str]:
    """The `#SBATCH` options of --partition, --account, --gpus-per-task, --cpus-per-task and --sbatch
    (ValueError: one that cannot be a line of the script)."""
    if args.array_parallel is not None and args.array_parallel < 0:
        raise ValueError(f"--array-parallel must be >= 0 (0: no limit), not {args.array_parallel}")
    for name in ("gpus_per_task", "cpus_per_task"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    options = [f"--{name.replace('_', '-')}={getattr(args, name)}"
               for name in ("partition", "account", "gpus_per_task", "cpus_per_task") if getattr(args, name)]
    for option in args.sbatch:
        if not option.startswith("-") or any(c in option for c in "\n\r"):
            raise ValueError(f"--sbatch {option!r}: expected one sbatch option such as --qos=long")
    return options + list(args.sbatch)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="mpi-afl sweep", description=__doc__.split("\n\n")[0],
        usage="mpi-afl sweep --out DIR (--experiment FILE | --algorithms A[,A...] --seeds S[,S...] "
              "[--set KEY=V[,V...]]) [--parallel N] [--ranks R] [--slurm FILE [--array-parallel N] [--partition P] "
              "...] [-- TRAIN OPTIONS]")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory (one subdirectory per setting)")
    parser.add_argument("--experiment", type=Path, metavar="FILE",
                        help="run the experiment FILE describes (experiment.toml: cells x methods x seeds; "
                             "mpi_afl/experiment/) instead of --algorithms/--set/--seeds")
    parser.add_argument("--algorithms", type=_csv, help="comma-separated algorithms (or plug-ins)")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in _csv(t)], default=[0], help="comma-separated seeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V[,V...]",
                        help="a grid axis: a dotted config key and its values (repeatable)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="runs at a time (local, default 1); with --slurm the same as --array-parallel")
    parser.add_argument("--ranks", type=int, default=1, help="MPI ranks per run (1: one process, no launcher)")
    parser.add_argument("--slurm", type=Path, metavar="FILE", help="write an sbatch array script instead of running")
    parser.add_argument("--time", default="04:00:00", help="SLURM time limit per task (with --slurm)")
    cluster = parser.add_argument_group("SLURM array (with --slurm)")
    cluster.add_argument("--array-parallel", type=int, default=None, metavar="N",
                         help="array tasks running at a time: --array=0-LAST%%N (default: no limit, as many as the "
                              "scheduler starts)")
    cluster.add_argument("--partition", help="#SBATCH --partition")
    cluster.add_argument("--account", help="#SBATCH --account")
    cluster.add_argument("--gpus-per-task", type=int, metavar="N", help="#SBATCH --gpus-per-task")
    cluster.add_argument("--cpus-per-task", type=int, metavar="N",
                         help="#SBATCH --cpus-per-task (also OMP_NUM_THREADS of the ranks)")
    cluster.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                         help="any other sbatch option, one #SBATCH line each (repeatable), e.g. --sbatch=--qos=long "
                              "--sbatch='--constraint=a100'")
    parser.add_argument("--table-only", action="store_true", help="only print the mean ± std table of DIR")
    args = parser.parse_args(own)
    if (args.parallel is not None and args.parallel < 1) or args.ranks < 1:
        parser.error("--parallel and --ranks must be >= 1")
    if bool(args.experiment) == bool(args.algorithms):
        parser.error("give either --experiment FILE or --algorithms A[,A...]")
    if args.experiment:
        return run_experiment(args, extra)
    try:
        sbatch_lines = sbatch_options(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        points = grid(args.algorithms, args.seeds, args.set)
    except ValueError as e:
        parser.error(str(e))
    if warning := unequal_work(points, args.out, extra):
        print(warning, file=sys.stderr)
    if args.slurm:
        (args.out / "logs").mkdir(parents=True, exist_ok=True)
        parallel = args.array_parallel if args.array_parallel is not None else args.parallel
        args.slurm.write_text(slurm_script(points, args.out, extra, args.ranks, args.time, parallel, sbatch_lines))
        print(f"sweep: wrote {args.slurm} ({len(points)} array tasks); submit with: sbatch {args.slurm}")
        return 0
    failed = [] if args.table_only else run_local(points, args.out, extra, args.parallel or 1, args.ranks)
    print_table(args.out)
    if failed:
        print(f"sweep: {len(failed)} run(s) failed; see {args.out / 'logs'}; run the same command again to "
              "retry them (finished runs are kept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
