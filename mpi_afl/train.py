"""Entry point: `mpiexec -n R python -m mpi_afl.train [--config FILE] [overrides]`.

Rank 0 parses and validates the config and broadcasts it (an error stops
every rank with a non-zero exit), every rank loads the same data and
partition from the seed, then rank 0 runs the server and the others the
worker loop. With one process the server runs the jobs itself. Any uncaught
exception on any rank aborts the whole MPI job (no rank is left hanging).

Stop signals are recorded from the first line of `main()` (signals.py), before
torch, MPI and the data load; importing this module is cheap (torch is imported
where it is used) so that nothing slow comes before. Exit codes: 0 done or
stopped by a signal, 1 a crash (traceback), 2 a bad input or environment (one
line naming the key or file), 3 the run diverged (one line; results and a
checkpoint of the last finite version are written).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from . import plugins
from . import signals
from .config import Config, ConfigError, from_dict, parse_args
from .launch import world_mismatch
from .storage.lock import LockError, RunLock

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
ABORT_GRACE_SECONDS = 1.0   # before MPI_Abort, so that mpiexec passes on what the failing rank printed


@dataclass
class _Setup:
    """What rank 0's start-up hands to the rest of the run."""
    result: tuple = ("exit", 0)          # ('ok', cfg_dict) or ('exit', code), broadcast to every rank
    resume_state: dict | None = None     # the checkpoint, when resuming
    run_id: str = ""
    new_log: bool = False                # --new-log: the resumed run starts a fresh run.h5
    lock: RunLock | None = None          # held on the run directory until the run ends
    final_error: str = ""                # the run's final files were not all written (storage/final_writes.py)
    created: Path | None = None          # the run directory, if this start created it

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.created is not None and self.created.is_dir() and not any(self.created.iterdir()):
            self.created.rmdir()   # a start refused before writing anything leaves no trace

    def exit(self, code: int) -> "_Setup":
        self.release()
        self.result = ("exit", code)
        return self


def _rank0_setup(argv) -> _Setup:
    """Parse the command line, lock the output directory and check it on rank 0.

    Nothing is written into the directory before every check has passed: a refused run or
    resume leaves it as it was."""
    from .storage.checkpoint import CheckpointError, load_checkpoint
    from .server.state import check_server_format
    from .storage.rundir import (RunDirError, check_resume, check_run_files, holds_a_run, new_run_id,
                                 no_checkpoint_advice)
    checkpoint = {}
    setup = _Setup()

    def resume_config(directory: str) -> dict:
        if not (Path(directory) / "checkpoint.h5").exists() and holds_a_run(Path(directory)):
            raise ConfigError(f"cannot resume: {no_checkpoint_advice(Path(directory))}")
        try:
            checkpoint["state"] = load_checkpoint(Path(directory) / "checkpoint.h5")
            check_server_format(checkpoint["state"])   # before anything else reads the state
            return json.loads(checkpoint["state"]["config"])
        except CheckpointError as e:
            raise ConfigError(f"cannot resume from {directory}: {e}") from None
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"cannot resume from {directory}: its checkpoint.h5 holds no run config") from None

    try:
        cfg, args = parse_args(argv, resume_config)
        if args.print_config:
            _print_closed_ok(json.dumps(cfg.to_dict(), indent=2) + "\n" if args.format == "json" else cfg.to_toml())
            return setup.exit(0)
        out = Path(cfg.run.out or _default_out(cfg))
        if out.exists() and not out.is_dir():
            raise ConfigError(f"config key 'run.out': {out} is a file, not a directory")
        try:
            if not out.exists():
                setup.created = out
            out.mkdir(parents=True, exist_ok=True)
            setup.lock = RunLock(out)   # before any check of the files: another run may be writing them
        except OSError as e:
            raise ConfigError(f"config key 'run.out': cannot write to {out}: {e.strerror}") from None
        check_run_files(out)
        if not args.resume and holds_a_run(out) and not cfg.run.overwrite:
            if not (out / "checkpoint.h5").exists():
                raise ConfigError(no_checkpoint_advice(out))
            raise ConfigError(f"output directory {out} already holds a run; continue it with --resume {out}, "
                              f"choose another --out, or pass --run.overwrite=true to replace it")
        setup.run_id = check_resume(out, checkpoint["state"], args.new_log) if args.resume else new_run_id()
        cfg.run.out = str(out)
        plugins.check(cfg)
        if signals.received() is not None:
            _stopped_at_start(signals.received())
            return setup.exit(0)
        setup.result = ("ok", cfg.to_dict())
        setup.resume_state, setup.new_log = checkpoint.get("state"), args.new_log
        return setup
    except (ConfigError, LockError, RunDirError) as e:
        print(f"mpi_afl: error: {e}", file=sys.stderr, flush=True)
        return setup.exit(EXIT_CONFIG)
    except SystemExit as e:  # --help, or argparse's own usage errors
        return setup.exit(e.code if isinstance(e.code, int) else 0)
    except BaseException:
        setup.release()
        raise


def _check_split_sizes(cfg: Config, samples: int) -> None:
    """The partition's demands against the training split's `samples`, named by their config keys."""
    d = cfg.data
    where = f"the training split of {d.dataset} has {samples:,} samples"
    if d.num_clients > samples:
        raise ConfigError(f"config key 'data.num_clients': {d.num_clients:,} clients need at least one sample "
                          f"each, but {where}")
    if d.samples_per_client > samples:
        raise ConfigError(f"config key 'data.samples_per_client': {d.samples_per_client:,} is more than the "
                          f"training split holds ({where}): every client would hold each image several times")
    if d.partition == "shards" and d.num_clients * d.shards_per_client > samples:
        raise ConfigError(f"config key 'data.shards_per_client': {d.num_clients} clients x {d.shards_per_client} "
                          f"shards need at least one sample per shard, but {where}")


def _repeated_images(cfg: Config, parts) -> list[str]:
    """With data.samples_per_client, a client whose class mix asks for more images of a class than the split
    has draws that class's images again: say how often, since it changes what local training sees."""
    import numpy as np
    if not cfg.data.samples_per_client:
        return []
    copies = max(len(p) / len(np.unique(p)) for p in parts)
    if copies <= 1:
        return []
    return [f"data.samples_per_client = {cfg.data.samples_per_client}: some clients hold repeated images (up to "
            f"{copies:.1f} copies per image in one client), as their class mix asks for more images of a class "
            f"than the training split has"]


def _prepare_run_dir(cfg: Config, out: Path, new_log: bool, clients: str) -> None:
    """The start's first writes: clear what a killed run left mid-write, set an old run log aside
    (--new-log), then record the config, the command line and the clients' data (`clients`: clients.txt)."""
    from .storage.rundir import remove_temp_files, set_aside_log
    for tmp in remove_temp_files(out):
        print(f"[server] removed {tmp.name}, left by a run stopped while writing it", flush=True)
    if new_log and (aside := set_aside_log(out)):
        print(f"[server] --new-log: the old run log is kept as {aside}", flush=True)
    _describe_run(cfg, out)
    (out / "clients.txt").write_text(clients)


def _print_closed_ok(text: str) -> None:
    """Print to stdout; a reader that closed it early (`--print-config | head`) is not an error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so the exit's flush does not fail


def _stopped_at_start(signum: int) -> None:
    print(f"mpi_afl: {signals.name(signum)} during start-up: stopped before any work (nothing to resume; "
          "a resumed run is left as it was)", flush=True)


def _default_out(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    algorithm, dataset = plugins.short_name(cfg.server.algorithm), plugins.short_name(cfg.data.dataset)
    return f"runs/{algorithm}-{dataset}-{cfg.run.clock}-s{cfg.run.seed}-{stamp}"


def _describe_run(cfg: Config, out: Path) -> None:
    """How the run was made, next to its results: the resolved config as TOML (`--config` reads it back)
    and one command line per start (the first and every --resume)."""
    (out / "config.toml").write_text(f"# resolved config of {out}, written by mpi_afl {__version__}\n"
                                     + cfg.to_toml())
    # surrogateescape: an argument that is not UTF-8 (a --config path) is written back as its original bytes
    with open(out / "command.txt", "a", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  {shlex.join(sys.orig_argv)}\n")


class _Tee:
    """A text stream that also appends to a file: rank 0's console output is copied to OUT/server.log."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self._to_log(self.log.write, text)
        return self.stream.write(text)

    def flush(self) -> None:
        self._to_log(self.log.flush)
        self.stream.flush()

    def _to_log(self, call, *args) -> None:
        """A full disk or a file system gone read-only must not make every print fail: the console goes
        on, the copy stops (the run's own error line says what could not be written)."""
        if self.log is None:
            return
        try:
            call(*args)
        except OSError:
            self.log = None

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _collective_or_exit(comm, result) -> object:
    """Broadcast rank 0's ('ok', value) / ('exit', code) and act on it on every rank."""
    status, value = comm.bcast(result, root=0)
    if status == "exit":
        sys.exit(value)
    return value


def _startup_point(comm, failure: str | None = None) -> None:
    """A collective point of the start-up. If any rank failed (`failure`: its one-line message), rank 0
    prints the first failure and every rank exits 2; if rank 0 received a stop signal, every rank exits 0."""
    statuses = comm.allgather((failure, signals.received()))
    failures = [f for f, _ in statuses if f]
    if failures:
        if comm.Get_rank() == 0:
            print(f"mpi_afl: error: {failures[0]}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    if statuses[0][1] is not None:
        if comm.Get_rank() == 0:
            _stopped_at_start(statuses[0][1])
        sys.exit(0)


def run(comm, argv=None) -> int:
    setup = _rank0_setup(argv) if comm.Get_rank() == 0 else _Setup()
    try:
        return _run(comm, setup)
    finally:
        setup.release()
        if setup.final_error:
            print(f"mpi_afl: error: {setup.final_error}", file=sys.stderr, flush=True)


def _run(comm, setup: _Setup) -> int:
    import torch

    from .client.loop import run_worker
    from .client.runner import JobRunner
    from .data.datasets import DataError, DataNotFoundError, load_splits, prepare
    from .data.partition import class_histograms, partition, summary_lines
    from .models import build_model
    from .placement import describe, pick_device, rank_record, record_ranks
    from .storage.atomic import write_atomic
    from .storage.runlog import RunLog

    rank, size = comm.Get_rank(), comm.Get_size()
    cfg = from_dict(_collective_or_exit(comm, setup.result))
    # The virtual clock promises results independent of the rank count: one thread keeps CPU kernels' order fixed.
    torch.set_num_threads(1 if cfg.run.clock == "virtual" else cfg.run.threads)
    d = cfg.data

    # Data: rank 0 fetches or unpacks files while the others wait, then everyone loads the same splits.
    failure = None
    if rank == 0:
        try:
            prepare(d.dataset, d.root or None, download=d.download)
        except DataNotFoundError as e:
            failure = str(e)
    _startup_point(comm, failure)
    try:
        device, placement_notes = pick_device(cfg.run.device, cfg.run.placement, comm, cfg.distill.ranks)
    except ConfigError as e:   # raised alike on every rank
        failure = str(e)
    _startup_point(comm, failure)
    try:
        splits = load_splits(d.dataset, d.root or None, seed=cfg.run.seed, val_fraction=d.val_fraction,
                             test_fraction=d.test_fraction, kd_fraction=d.kd_fraction)
    except (DataNotFoundError, DataError) as e:
        failure = str(e)
    _startup_point(comm, failure)
    labels = splits.train_y.numpy()
    try:
        _check_split_sizes(cfg, len(labels))
        _check_group(cfg, size)
        parts = partition(labels, d.num_clients, d.partition, seed=cfg.run.seed, num_classes=splits.info.num_classes,
                          alpha=d.alpha, shards_per_client=d.shards_per_client,
                          samples_per_client=d.samples_per_client)
    except (ConfigError, ValueError) as e:
        failure = str(e)
    _startup_point(comm, failure)
    out = Path(cfg.run.out)
    if rank == 0:   # every check has passed: only now is anything written into the run directory
        try:
            _prepare_run_dir(cfg, out, setup.new_log,
                             "\n".join(summary_lines(parts, labels, splits.info.num_classes)) + "\n")
        except OSError as e:
            failure = f"config key 'run.out': cannot write to {out}: {e.strerror or e}"
    _startup_point(comm, failure)
    info = splits.info

    def make_model() -> torch.nn.Module:
        return build_model(cfg.model.name, in_channels=info.channels, image_size=info.image_size,
                           num_classes=info.num_classes, norm=cfg.model.norm).to(device)

    torch.manual_seed(cfg.run.seed)   # the initial global model is the same on every rank and run
    model = make_model()
    runner = JobRunner(cfg, make_model(), splits.train_x.to(device), splits.train_y.to(device),
                       [torch.as_tensor(p, dtype=torch.long, device=device) for p in parts])

    distilling = cfg.distill.ranks   # ranks 1..distilling distil with the server (distill/group.py)
    role = "server" if rank == 0 else "distil" if rank <= distilling else "worker"
    placements = comm.allgather(rank_record(rank, device, role))
    group = _distillation_group(comm, distilling)
    if rank != 0:
        if role == "distil":
            stats = _serve_group(cfg, group, device, model, make_model, splits, parts, labels)
        else:
            stats = run_worker(comm, runner, cfg.server.queue_depth)
        comm.gather((stats, rank_record(rank, device, role)), root=0)
        return 0

    from .server.loop import Server, ServerSetup
    from .transport.local import LocalTransport
    from .transport.mpi import ServerMPI

    console = open(out / "server.log", "a", buffering=1)   # appended to on resume
    sys.stdout, sys.stderr = _Tee(sys.stdout, console), _Tee(sys.stderr, console)
    transport = (ServerMPI(comm, runner.size, cfg.server.queue_depth, first_worker=distilling + 1) if size > 1
                 else LocalTransport(runner.run))
    sizes = [len(p) for p in parts]
    print(f"[server] mpi_afl {__version__}: {cfg.server.algorithm} on {d.dataset} ({cfg.model.name}, "
          f"{runner.size:,} floats), {d.num_clients} clients ({min(sizes)}-{max(sizes)} samples), "
          f"K={cfg.server.concurrency}, {size} rank(s), {cfg.run.clock} clock, device {device}, out {out}", flush=True)
    print(f"[server] placement: {describe(placements)}", flush=True)
    if distilling:
        print(f"[server] distillation: ranks 0-{distilling} distil together (teachers split over {distilling + 1} "
              f"ranks, distill.ranks = {distilling}); ranks {distilling + 1}-{size - 1} are workers", flush=True)
    notes = placement_notes + _idle_workers(cfg.server.concurrency, size - 1 - distilling) + _repeated_images(cfg, parts)
    for note in notes:
        print(f"[server] warning: {note}", flush=True)
    resume_state = setup.resume_state
    from .storage import tracking
    trackers = tracking.open_trackers(cfg, out)   # live mirrors of run.h5; before it, so a bad store leaves no run
    log = RunLog(out / "run.h5", {**_run_attrs(cfg, size, placements), "run_id": setup.run_id},
                 flush_seconds=cfg.run.log_flush_seconds, overwrite=cfg.run.overwrite,
                 resume_counts=resume_state["log_counts"] if resume_state and not setup.new_log else None)
    server = Server(cfg, transport, log, ServerSetup(
        model=model, make_model=make_model, splits=splits, histograms=class_histograms(parts, labels, info.num_classes),
        device=device, out_dir=out, world_size=size, run_id=setup.run_id, group=group))
    if resume_state:
        server.load_state_dict(resume_state)
        print(f"[server] resumed from {out / 'checkpoint.h5'} at version {server.version}", flush=True)
    tracking.attach(log, trackers, server.stats)   # run.tensorboard, run.mlflow

    def request_stop(signum: int) -> None:
        server.stop_requested = True
        print(f"[server] signal {signals.name(signum)}: checkpointing and stopping after the "
              f"update in hand", flush=True)

    signals.on_stop(request_stop)   # also fires now for a signal that came since the last start-up point
    summary = server.run()
    gathered = comm.gather(None, root=0)[1:] if size > 1 else []
    workers = [stats for stats, _ in gathered]
    summary["ranks"] = [rank_record(0, device, "server")] + [record for _, record in gathered]
    members = [stats for stats in workers if stats.get("role") == "distil"]
    workers = [stats for stats in workers if stats.get("role") != "distil"]
    if workers:
        summary["worker_idle_fraction"] = sum(w["idle_seconds"] for w in workers) / sum(w["wall_seconds"] for w in workers)
        summary["workers"] = workers
    if members:
        summary["distill_ranks"] = members
    # checkpoint.h5 was written first, by server.run() (storage/final_writes.py gives the order and why).
    writes = server.final_writes
    if "run.h5" not in writes.failed:
        writes.attempt("run.h5", lambda path: record_ranks(path, summary["ranks"]))
    writes.attempt("summary.json", lambda path: write_atomic(path, json.dumps(summary, indent=2) + "\n"))
    writes.attempt("model.pt", server.save_model)
    if (line := writes.error_line(server.checkpoint_version)) is not None:
        setup.final_error = line   # printed by run(), after the lock's release, as the run's last line
        return EXIT_FAILED
    print(f"[server] done ({server.stop_reason}): {summary['versions']} versions, "
          f"final acc {summary['final_accuracy']:.4f}, best {summary['best_accuracy']:.4f}, "
          f"{summary['updates_rejected']} rejected, {summary['wall_seconds']:.1f}s -> {out / 'summary.json'}",
          flush=True)
    if server.stop_reason == "signal":
        print(f"[server] continue it with: mpi-afl train --resume {out}", flush=True)
    for note in _never_distilled(cfg, summary):
        print(f"[server] warning: {note}", flush=True)
    if server.diverged:
        print(f"mpi_afl: error: the run diverged: {server.diverged}; stopped at version {server.version}, the "
              f"last finite one (checkpoint, summary.json and model.pt written); try a smaller client.lr or "
              f"server.lr", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    return 0


def _check_group(cfg: Config, size: int) -> None:
    """distill.ranks must leave a worker, name an algorithm that can use a group, and give every rank a teacher."""
    from .algorithms import algorithm_class
    d = cfg.distill.ranks
    if not d:
        return
    if d >= size - 1:
        raise ConfigError(f"config key 'distill.ranks': {d} distilling rank(s) besides the server leave no worker "
                          f"among {size} rank(s); allowed: 0..{max(size - 2, 0)} (or start more ranks)")
    algorithm = algorithm_class(cfg.server.algorithm)
    if not algorithm.group_methods:
        raise ConfigError(f"config key 'distill.ranks': server.algorithm = {cfg.server.algorithm!r} does not distil "
                          f"on the server, so it has nothing to share; distill.ranks applies to fedrevive, "
                          f"dd_fedrevive and fedecho; use 0")
    teachers = cfg.echo.teachers if cfg.server.algorithm == "fedecho" else cfg.distill.teachers
    key = "echo.teachers" if cfg.server.algorithm == "fedecho" else "distill.teachers"
    if d + 1 > teachers:
        raise ConfigError(f"config key 'distill.ranks': {d + 1} distilling ranks for {key} = {teachers} teachers "
                          f"would leave a rank without a teacher; allowed: 0..{teachers - 1}")


def _distillation_group(comm, distilling: int):
    """Ranks 0..distilling on their own communicator (collective: every rank calls it); None without a group."""
    if not distilling:
        return None
    from mpi4py import MPI

    from .distill.group import Group
    sub = comm.Split(0 if comm.Get_rank() <= distilling else MPI.UNDEFINED, comm.Get_rank())
    return Group(sub) if sub != MPI.COMM_NULL else None


def _serve_group(cfg: Config, group, device, model, make_model, splits, parts, labels) -> dict:
    """A distilling rank: the run's algorithm, built as on the server, runs the server's distillation calls."""
    from .algorithms import algorithm_class
    from .data.partition import class_histograms
    from .distill.group import serve
    from .models import flat
    from .server.context import algorithm_context, check_images
    ctx = algorithm_context(cfg, device, flat.flatten(model).to(device), model, make_model, splits,
                            class_histograms(parts, labels, splits.info.num_classes), group,
                            **check_images(splits, cfg.distill.kd_check_images, device))   # a share of the KD check
    return serve(group, algorithm_class(cfg.server.algorithm)(cfg, ctx), ctx)


def _never_distilled(cfg: Config, summary: dict) -> list[str]:
    """A distilling algorithm's run that ended before KD was ever applied: it ran as its backbone alone."""
    d, algorithm = cfg.distill, cfg.server.algorithm
    if algorithm not in ("fedrevive", "fedecho") or summary["algorithm_stats"].get("kd_applied"):
        return []
    if algorithm == "fedecho" and cfg.echo.kd_step == 0:
        return []
    return [f"{algorithm} never applied its distillation: the run ended at version {summary['versions']}, and KD "
            f"starts after distill.warmup_versions = {d.warmup_versions} (synthesis from distill.freeze_versions = "
            f"{d.freeze_versions}); run longer or lower those keys"]


def _idle_workers(concurrency: int, workers: int) -> list[str]:
    """K jobs in flight keep at most K workers busy."""
    if workers <= concurrency:
        return []
    return [f"server.concurrency = {concurrency} keeps {concurrency} job(s) in flight for {workers} workers: "
            f"{workers - concurrency} worker(s) will never get a job; use --server.concurrency={workers} or more "
            f"(K is part of the algorithm: it changes staleness and results), or start fewer ranks"]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _run_attrs(cfg: Config, size: int, placements: list[dict]) -> dict:
    import h5py
    import mpi4py
    import torch
    from mpi4py import MPI
    return {
        "config": cfg.to_json(), "label": f"{plugins.short_name(cfg.server.algorithm)} s{cfg.run.seed}",
        "package_version": __version__, "git_commit": _git_commit(), "world_size": size, "seed": cfg.run.seed,
        "torch_version": str(torch.__version__), "mpi4py_version": mpi4py.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0], "h5py_version": h5py.__version__,
        "hostnames": sorted({p["host"] for p in placements}), "ranks": placements,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv=None) -> int:
    signals.arm()   # first: importing torch, starting MPI and loading data take seconds
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    mismatch = world_mismatch(comm.Get_size(), MPI.Get_library_version().strip().splitlines()[0])
    if mismatch:   # every task sees it; the launcher's first task says it
        if mismatch[1]:
            print(f"mpi_afl: error: {mismatch[0]}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        return run(comm, argv)
    except SystemExit:
        raise
    except ConfigError as e:
        # A plug-in that breaks its contract (or no GPU for run.device=cuda) fails alike on every rank;
        # rank 0 says why, then the job ends (Abort: a rank that did not fail must not wait forever).
        if comm.Get_rank() == 0:
            print(f"mpi_afl: error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(2)   # let rank 0 print first; if only this rank failed, still say why
            print(f"mpi_afl: error on rank {comm.Get_rank()}: {e}", file=sys.stderr, flush=True)
        if comm.Get_size() > 1:
            _abort(comm, EXIT_CONFIG)
        return EXIT_CONFIG
    except BaseException as e:
        return _fail(comm, e)


def _fail(comm, e: BaseException) -> int:
    """Print this rank's traceback in full, naming the rank and its role, then end the whole job."""
    rank, size = comm.Get_rank(), comm.Get_size()
    role = "server" if rank == 0 else "worker"
    what = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    sys.stderr.write(traceback.format_exc() + f"mpi_afl: rank {rank} ({role}) failed: {what}"
                     + ("; aborting all ranks\n" if size > 1 else "\n"))
    sys.stderr.flush()
    if size > 1:
        _abort(comm, EXIT_FAILED)
    return EXIT_FAILED


def _abort(comm, code: int) -> None:
    """End every rank of the job, after giving mpiexec time to pass on what this rank just printed.

    MPI_Abort makes mpiexec kill every process at once, and text still in its forwarding pipes was lost: about
    one traceback in ten before this wait, and once a plug-in's contract error (a CI run with empty stderr).
    """
    time.sleep(ABORT_GRACE_SECONDS)
    comm.Abort(code)


if __name__ == "__main__":
    sys.exit(main())
