"""Server throughput: updates/s the real server sustains when workers do no training.

    mpiexec -n 5 python bench/server_throughput.py --params 1000000 --seconds 10   # one run, one JSON line
    python bench/server_throughput.py                                              # driver: sweeps P, medians

Under mpiexec, rank 0 runs the real `Server` (server/loop.py: pump, validate,
FedBuff with buffer 10, dispatch, run log; wall clock) on the real
`ServerMPI`, and ranks 1..R-1 run the real worker loop (`run_worker`,
client/loop.py) over `WorkerMPI` with a `JobRunner` stand-in that returns a
constant delta at once, so the job/update protocol, its buffers and the
aggregation are exactly those of a training run; only the training is gone.
The model is one flat vector of P float32 parameters.

Rank 0 prints one JSON line (times in seconds, "per update" = per accepted update):
  updates_per_s                  accepted updates / server wall seconds
  server_seconds_per_update      wall time of receive (`poll` calls that returned updates) + validate +
                                 aggregate (`Server.process`); idle sleeps and empty polls excluded
  recv_/process_seconds_per_update  its two parts
  dispatch_seconds_per_update    `send_job` (header + Isend of the snapshot), apart: it is the next job's cost
  server_cpu_seconds_per_update  the same sections as server_seconds_per_update in thread CPU time, so
                                 time the server spent preempted by other processes is left out
  server_total_cpu_seconds_per_update  all CPU time of rank 0 during `Server.run` and its stop (job creation,
                                 the final checkpoint and evaluation included)
  worker_cpu_seconds_per_update  CPU time of all workers together (they share the cores with the server)
  copy_seconds                   median time of one in-process `dst.copy_(src)` of P float32 (the same
                                 pair every time: from the caches while 2 x 4P bytes fit in them)
  copy_seconds_cold              the same copy streaming from DRAM (pairs cycled over >= 256 MB)
  ratio                          server_seconds_per_update / copy_seconds
  ratio_cpu, ratio_cpu_cold      server_cpu_seconds_per_update / copy_seconds, / copy_seconds_cold
  load_avg_1min                  machine load when the run ended (other processes skew wall times)
Target at P = 1e6 on the 2-core dev machine: >= 200 updates/s and ratio <= 3.

Without mpiexec (no MPI launcher variables in the environment) the script is a
driver: it launches `mpiexec -n 5` --repeats times for each P in --params
(default 1e5, 1e6, 1e7) and prints, per P, the run with the median updates/s
plus the updates/s and ratios of every repeat. `--profile` (under mpiexec)
prints rank 0's cProfile table, sorted by own time, to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mpi_afl.launch import mpiexec_path

WORKERS = 4
LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class FlatModel(nn.Module):
    """P float32 parameters and nothing else; the forward pass only serves the server's final evaluation."""

    def __init__(self, params: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.w = nn.Parameter(torch.zeros(params))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w[:self.num_classes].expand(len(x), -1)


class ConstantRunner:
    """The `JobRunner` interface without training: every job returns the same small finite delta."""

    def __init__(self, params: int):
        self.size = params
        self.train_x = torch.empty(0)   # run_worker moves job payloads to train_x.device
        self.delta = torch.full((params,), 1e-4)

    def run(self, job, base: torch.Tensor):
        from mpi_afl.transport.messages import ClientUpdate
        return ClientUpdate(job.job_index, job.client_id, job.base_version, 100, 1.0, 0.0, self.delta)


def copy_seconds(params: int, cold: bool = False, budget: float = 1.0) -> float:
    """Median time of one `dst.copy_(src)` of `params` float32 (the unit the server cost is measured in).

    Hot (the default): the same pair every time, so up to ~4e6 floats it runs from the caches.
    Cold: cycles through pre-touched pairs spanning >= 256 MB, so every copy streams from DRAM,
    as the server's receive buffers, snapshots and aggregation buffer mostly do."""
    pairs = max(2, -(-(256 << 20) // (8 * params))) if cold else 1
    srcs, dsts = [torch.randn(params) for _ in range(pairs)], [torch.zeros(params) for _ in range(pairs)]
    for i in range(pairs):
        dsts[i].copy_(srcs[i])
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 21 or (time.perf_counter() - start < budget and len(times) < 2001):
        i = len(times) % pairs
        t0 = time.perf_counter()
        dsts[i].copy_(srcs[i])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def config(seconds: float):
    from mpi_afl.config import Config
    cfg = Config()
    cfg.run.clock = "wall"             # process in arrival order: the server never waits for a particular job
    cfg.run.max_versions = 0
    cfg.run.max_wall_seconds = seconds
    cfg.run.eval_every = 10**9         # evaluation only once, after the timed loop
    cfg.server.algorithm = "fedbuff"
    cfg.server.buffer_size = 10
    cfg.server.concurrency = 2 * WORKERS   # = workers x queue_depth: every worker always has a job queued
    cfg.server.queue_depth = 2
    cfg.delays.wall_scale = 0.0
    return cfg


def fake_splits(num_classes: int):
    from mpi_afl.data.datasets import Splits
    from mpi_afl.names import DatasetInfo
    info = DatasetInfo("bench", num_classes, 1, 1, (0.0,), (1.0,))
    x, y = torch.zeros(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)
    empty_x, empty_y = torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long)
    return Splits(info, x, y, empty_x, empty_y, x, y, empty_x, empty_y)


def run_mpi(params: int, seconds: float, profile: bool) -> None:
    from mpi4py import MPI

    from mpi_afl.client.loop import run_worker
    from mpi_afl.transport.mpi import ServerMPI, wait

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    cfg = config(seconds)
    wait(comm.Ibarrier())   # nonblocking: a blocking barrier busy-polls and would disturb the copy timing
    if rank != 0:
        c0 = time.process_time()
        run_worker(comm, ConstantRunner(params), cfg.server.queue_depth)
        comm.gather(time.process_time() - c0, root=0)
        return

    import numpy as np

    from mpi_afl.run.finish import stop_server
    from mpi_afl.server.loop import Server, ServerSetup
    from mpi_afl.storage.final_writes import FinalWrites
    from mpi_afl.storage.runlog import RunLog

    class TimedServerMPI(ServerMPI):
        """ServerMPI that adds up the time of polls that received something and of job sends."""

        def __init__(self, *args):
            super().__init__(*args)
            self.recv_seconds = self.recv_cpu = self.send_seconds = 0.0
            self.timing = True

        def poll(self):
            t0, c0 = time.perf_counter(), time.thread_time()
            arrivals = super().poll()
            if arrivals and self.timing:
                self.recv_seconds += time.perf_counter() - t0
                self.recv_cpu += time.thread_time() - c0
            return arrivals

        def send_job(self, worker, job, model) -> None:
            t0 = time.perf_counter()
            super().send_job(worker, job, model)
            if self.timing:
                self.send_seconds += time.perf_counter() - t0

        def stop(self) -> None:
            self.timing = False   # late updates are drained and discarded, not processed
            super().stop()

    class TimedServer(Server):
        """Server that also adds up the CPU time of `process` (its wall time is `busy_seconds`)."""

        process_cpu = 0.0

        def process(self, job, a) -> None:
            c0 = time.thread_time()
            super().process(job, a)
            self.process_cpu += time.thread_time() - c0

    copy, copy_cold = copy_seconds(params), copy_seconds(params, cold=True)   # workers idle-poll (sleep) now
    num_classes = 10
    model = FlatModel(params, num_classes)
    transport = TimedServerMPI(comm, params, cfg.server.queue_depth)
    with tempfile.TemporaryDirectory() as out:
        log = RunLog(Path(out) / "run.h5", {"bench": "server_throughput"}, flush_seconds=cfg.run.log_flush_seconds)
        server = TimedServer(cfg, transport, log, ServerSetup(
            model=model, make_model=lambda: FlatModel(params, num_classes), splits=fake_splits(num_classes),
            histograms=np.zeros((cfg.data.num_clients, num_classes), dtype=np.int64), device=torch.device("cpu"),
            out_dir=Path(out), world_size=size))

        def serve() -> dict:
            """The loop, then the end of a run up to its summary (run/finish.py): final checkpoint and evaluation."""
            server.run()
            return stop_server(server, FinalWrites(Path(out)))

        c0 = time.process_time()
        if profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            summary = prof.runcall(serve)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        else:
            summary = serve()
        server_cpu = time.process_time() - c0
    worker_cpu = sum(comm.gather(0.0, root=0)[1:])
    n = max(server.accepted, 1)
    per_update = (transport.recv_seconds + server.busy_seconds) / n
    cpu_per_update = (transport.recv_cpu + server.process_cpu) / n
    print(json.dumps({
        "bench": "server_throughput", "params": params, "workers": size - 1, "updates": server.accepted,
        "rejected": server.rejected, "versions": server.version, "seconds": round(summary["wall_seconds"], 3),
        "updates_per_s": round(server.accepted / summary["wall_seconds"], 2),
        "server_seconds_per_update": per_update,
        "recv_seconds_per_update": transport.recv_seconds / n,
        "process_seconds_per_update": server.busy_seconds / n,
        "dispatch_seconds_per_update": transport.send_seconds / n,
        "server_cpu_seconds_per_update": cpu_per_update,
        "server_total_cpu_seconds_per_update": server_cpu / n,
        "worker_cpu_seconds_per_update": worker_cpu / n,
        "copy_seconds": copy, "copy_seconds_cold": copy_cold,
        "ratio": round(per_update / copy, 3), "ratio_cpu": round(cpu_per_update / copy, 3),
        "ratio_cpu_cold": round(cpu_per_update / copy_cold, 3),
        "host": socket.gethostname(), "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
    }), flush=True)


def drive(params: list[int], seconds: float, repeats: int) -> None:
    for p in params:
        runs = []
        for _ in range(repeats):
            cmd = [mpiexec_path(), "-n", str(WORKERS + 1), sys.executable, __file__, "--params", str(p),
                   "--seconds", str(seconds)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith('{"bench"')]
            if done.returncode != 0 or not lines:
                sys.stderr.write(done.stdout + done.stderr)
                raise RuntimeError(f"{' '.join(cmd)} failed with exit code {done.returncode}")
            runs.append(json.loads(lines[-1]))
        runs.sort(key=lambda r: r["updates_per_s"])
        median = dict(runs[len(runs) // 2])
        median["repeats"] = repeats
        median["updates_per_s_all"] = [r["updates_per_s"] for r in runs]
        median["ratio_all"] = sorted(r["ratio"] for r in runs)
        median["ratio_cpu_all"] = sorted(r["ratio_cpu"] for r in runs)
        print(json.dumps(median), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[1e5, 1e6, 1e7],
                        help="model sizes P in float32 entries (under mpiexec: the first one only)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed server wall seconds per run")
    parser.add_argument("--profile", action="store_true",
                        help="under mpiexec: cProfile the server loop, top functions by own time to stderr")
    parser.add_argument("--repeats", type=int, default=3, help="driver: runs per P, the median is printed")
    args = parser.parse_args()
    params = [int(p) for p in args.params]
    if any(v in os.environ for v in LAUNCHER_ENV):
        run_mpi(params[0], args.seconds, args.profile)
    else:
        drive(params, args.seconds, args.repeats)


if __name__ == "__main__":
    main()
