"""Entry point: `mpiexec -n R python -m mpi_afl.train [--config FILE] [overrides]`.

Rank 0 parses and validates the config and broadcasts it (an error stops
every rank with a non-zero exit), every rank loads the same data and
partition from the seed, then rank 0 runs the server and the others the
worker loop. With one process the server runs the jobs itself. Any uncaught
exception on any rank aborts the whole MPI job (no rank is left hanging).
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from . import __version__
from . import plugins
from .config import Config, ConfigError, from_dict, parse_args
from .storage.checkpoint import CheckpointError, load_checkpoint
from .storage.runlog import RunLog

EXIT_CONFIG = 2
RUN_FILES = ("summary.json", "run.h5", "checkpoint.h5")


def _rank0_setup(argv) -> tuple[tuple, dict | None]:
    """Parse the command line and prepare the output dir on rank 0.

    Returns (('ok', cfg_dict) or ('exit', code), the checkpoint state when resuming)."""
    checkpoint = {}

    def resume_config(directory: str) -> dict:
        try:
            checkpoint["state"] = load_checkpoint(Path(directory) / "checkpoint.h5")
            return json.loads(checkpoint["state"]["config"])
        except CheckpointError as e:
            raise ConfigError(f"cannot resume from {directory}: {e}") from None
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"cannot resume from {directory}: its checkpoint.h5 holds no run config") from None

    try:
        cfg, args = parse_args(argv, resume_config)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return ("exit", 0), None
        out = Path(cfg.run.out or _default_out(cfg))
        if not args.resume and out.exists() and any((out / f).exists() for f in RUN_FILES) and not cfg.run.overwrite:
            raise ConfigError(f"output directory {out} already holds a run; continue it with --resume {out}, "
                              f"choose another --out, or pass --run.overwrite=true to replace it")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"config key 'run.out': cannot write to {out}: {e.strerror}") from None
        cfg.run.out = str(out)
        plugins.check(cfg)
        _describe_run(cfg, out)
        return ("ok", cfg.to_dict()), checkpoint.get("state")
    except ConfigError as e:
        print(f"mpi_afl: error: {e}", file=sys.stderr, flush=True)
        return ("exit", EXIT_CONFIG), None
    except SystemExit as e:  # --help, or argparse's own usage errors
        return ("exit", e.code if isinstance(e.code, int) else 0), None


def _default_out(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    algorithm, dataset = plugins.short_name(cfg.server.algorithm), plugins.short_name(cfg.data.dataset)
    return f"runs/{algorithm}-{dataset}-{cfg.run.clock}-s{cfg.run.seed}-{stamp}"


def _describe_run(cfg: Config, out: Path) -> None:
    """How the run was made, next to its results: the resolved config as TOML (`--config` reads it back)
    and one command line per start (the first and every --resume)."""
    (out / "config.toml").write_text(f"# resolved config of {out}, written by mpi_afl {__version__}\n"
                                     + cfg.to_toml())
    with open(out / "command.txt", "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  {shlex.join(sys.orig_argv)}\n")


class _Tee:
    """A text stream that also appends to a file: rank 0's console output is copied to OUT/server.log."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def pick_device(kind: str, comm) -> torch.device:
    """`cuda:(local rank % visible GPUs)` when a GPU is there (DESIGN.md "GPU binding"), else CPU."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("config key 'run.device': 'cuda' was asked for but no GPU is visible")
    from mpi4py import MPI
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")


def _collective_or_exit(comm, result) -> object:
    """Broadcast rank 0's ('ok', value) / ('exit', code) and act on it on every rank."""
    status, value = comm.bcast(result, root=0)
    if status == "exit":
        sys.exit(value)
    return value


def run(comm, argv=None) -> int:
    from .client.loop import run_worker
    from .client.runner import JobRunner
    from .data.datasets import DataNotFoundError, load_splits, prepare
    from .data.partition import class_histograms, partition, summary_lines
    from .models import build_model
    from .models import flat

    rank, size = comm.Get_rank(), comm.Get_size()
    setup, resume_state = _rank0_setup(argv) if rank == 0 else (None, None)
    cfg = from_dict(_collective_or_exit(comm, setup))
    # Pre-emption: workers ignore the signal and finish when the server says stop; the server checkpoints.
    _on_signals(lambda signum: None)
    # The virtual clock promises results independent of the rank count: one thread keeps CPU kernels' order fixed.
    torch.set_num_threads(1 if cfg.run.clock == "virtual" else cfg.run.threads)
    d = cfg.data

    # Data: rank 0 fetches or unpacks files while the others wait, then everyone loads the same splits.
    ready = None
    if rank == 0:
        try:
            prepare(d.dataset, d.root or None, download=d.download)
            ready = ("ok", None)
        except DataNotFoundError as e:
            print(f"mpi_afl: error: {e}", file=sys.stderr, flush=True)
            ready = ("exit", EXIT_CONFIG)
    _collective_or_exit(comm, ready)
    device = pick_device(cfg.run.device, comm)
    splits = load_splits(d.dataset, d.root or None, seed=cfg.run.seed, val_fraction=d.val_fraction,
                         test_fraction=d.test_fraction, kd_fraction=d.kd_fraction)
    labels = splits.train_y.numpy()
    parts = partition(labels, d.num_clients, d.partition, seed=cfg.run.seed, num_classes=splits.info.num_classes,
                      alpha=d.alpha, shards_per_client=d.shards_per_client, samples_per_client=d.samples_per_client)
    info = splits.info

    def make_model() -> torch.nn.Module:
        return build_model(cfg.model.name, in_channels=info.channels, image_size=info.image_size,
                           num_classes=info.num_classes, norm=cfg.model.norm).to(device)

    torch.manual_seed(cfg.run.seed)   # the initial global model is the same on every rank and run
    model = make_model()
    runner = JobRunner(cfg, make_model(), splits.train_x.to(device), splits.train_y.to(device),
                       [torch.as_tensor(p, dtype=torch.long, device=device) for p in parts])

    hosts = sorted(set(comm.allgather(_processor_name())))
    if rank != 0:
        stats = run_worker(comm, runner, cfg.server.queue_depth)
        comm.gather(stats, root=0)
        return 0

    from .server.loop import Server
    from .transport.local import LocalTransport
    from .transport.mpi import ServerMPI

    out = Path(cfg.run.out)
    console = open(out / "server.log", "a", buffering=1)   # appended to on resume
    sys.stdout, sys.stderr = _Tee(sys.stdout, console), _Tee(sys.stderr, console)
    (out / "clients.txt").write_text("\n".join(summary_lines(parts, labels, info.num_classes)) + "\n")
    transport = ServerMPI(comm, runner.size, cfg.server.queue_depth) if size > 1 else LocalTransport(runner)
    sizes = [len(p) for p in parts]
    print(f"[server] mpi_afl {__version__}: {cfg.server.algorithm} on {d.dataset} ({cfg.model.name}, "
          f"{runner.size:,} floats), {d.num_clients} clients ({min(sizes)}-{max(sizes)} samples), "
          f"K={cfg.server.concurrency}, {size} rank(s), {cfg.run.clock} clock, device {device}, out {out}", flush=True)
    log = RunLog(out / "run.h5", _run_attrs(cfg, size, hosts), flush_seconds=cfg.run.log_flush_seconds,
                 resume_counts=resume_state["log_counts"] if resume_state else None, overwrite=cfg.run.overwrite)
    server = Server(cfg, transport, model=model, make_model=make_model, splits=splits,
                    histograms=class_histograms(parts, labels, info.num_classes), device=device, flat=flat,
                    out_dir=out, world_size=size, log=log)
    if resume_state:
        server.load_state_dict(resume_state)
        print(f"[server] resumed from {out / 'checkpoint.h5'} at version {server.version}", flush=True)

    def request_stop(signum: int) -> None:
        server.stop_requested = True
        print(f"[server] signal {signal.Signals(signum).name}: checkpointing and stopping after the "
              f"update in hand", flush=True)

    _on_signals(request_stop)
    summary = server.run()
    workers = comm.gather(None, root=0)[1:] if size > 1 else []
    if workers:
        summary["worker_idle_fraction"] = sum(w["idle_seconds"] for w in workers) / sum(w["wall_seconds"] for w in workers)
        summary["workers"] = workers
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[server] done ({server.stop_reason}): {summary['versions']} versions, "
          f"final acc {summary['final_accuracy']:.4f}, best {summary['best_accuracy']:.4f}, "
          f"{summary['updates_rejected']} rejected, {summary['wall_seconds']:.1f}s -> {out / 'summary.json'}",
          flush=True)
    return 0


def _on_signals(handler) -> None:
    """SLURM's `--signal` and `scancel` send USR1/TERM; mpiexec forwards INT, TERM and USR1 to every rank."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: handler(signum))


def _processor_name() -> str:
    from mpi4py import MPI
    return MPI.Get_processor_name()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _run_attrs(cfg: Config, size: int, hosts: list[str]) -> dict:
    import h5py
    import mpi4py
    from mpi4py import MPI
    return {
        "config": cfg.to_json(), "label": f"{plugins.short_name(cfg.server.algorithm)} s{cfg.run.seed}",
        "package_version": __version__, "git_commit": _git_commit(), "world_size": size, "seed": cfg.run.seed,
        "torch_version": str(torch.__version__), "mpi4py_version": mpi4py.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0], "h5py_version": h5py.__version__,
        "hostnames": hosts, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv=None) -> int:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
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
            comm.Abort(EXIT_CONFIG)
        return EXIT_CONFIG
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        if comm.Get_size() > 1:
            print(f"mpi_afl: rank {comm.Get_rank()} failed; aborting all ranks", file=sys.stderr, flush=True)
            comm.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
