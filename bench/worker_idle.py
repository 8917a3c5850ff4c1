"""Worker idle time in a real wall-clock training run: how long workers wait for a job.

    python bench/worker_idle.py                                  # 4 workers, Fashion-MNIST CNN, 40 versions
    python bench/worker_idle.py --max-versions 20 -- --run.eval_every=1000000

Launches `mpiexec -n WORKERS+1 python -m mpi_afl.train --dataset fashion-mnist
--clock wall --max-versions N --out TMP [extra train args]`, then reads the
run's summary.json (`worker_idle_fraction`: the workers' summed time inside
`WorkerMPI.next_job` over their summed loop wall time, gathered by train.py)
and run.h5 (the server's eval and checkpoint times, which block dispatching)
and prints one JSON line per repeat:

  idle_fraction             summed worker idle seconds / summed worker wall seconds
  idle_fraction_per_worker  the same per worker rank
  server_eval_seconds       time the server spent evaluating (run.h5 `timings`, phase eval)
  server_eval_fraction      server_eval_seconds / server wall seconds
  server_checkpoint_seconds time spent writing checkpoints (phase checkpoint)

Target: idle_fraction < 5%. Workers wait whenever the server is not
processing results, because no new job can be created before a result is
processed (K jobs in flight); the eval/checkpoint fields show how much of the
idle time those blocking phases explain. Needs the Fashion-MNIST files
(Debian package dataset-fashion-mnist, or --data.root).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mpi_afl.launch import mpiexec_path
from mpi_afl.storage.runlog import read_run
from mpi_afl.storage.runlog.schema import PHASES


def run_once(workers: int, max_versions: int, extra: list[str]) -> dict:
    train = ["-m", "mpi_afl.train", "--dataset", "fashion-mnist", "--clock", "wall",
             "--max-versions", str(max_versions), *extra]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [mpiexec_path(), "-n", str(workers + 1), sys.executable, *train, "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {done.returncode}")
        summary = json.loads((out / "summary.json").read_text())
        timings = read_run(out / "run.h5")["timings"]
    phase_seconds = {name: float(timings["seconds"][timings["phase"] == code].sum()) for name, code in PHASES.items()}
    ranks = summary["workers"]
    return {
        "bench": "worker_idle", "workers": workers, "idle_fraction": round(summary["worker_idle_fraction"], 4),
        "idle_fraction_per_worker": [round(w["idle_seconds"] / w["wall_seconds"], 4) for w in ranks],
        "jobs_per_worker": [w["jobs"] for w in ranks],
        "worker_wall_seconds": round(max(w["wall_seconds"] for w in ranks), 2),
        "server_wall_seconds": round(summary["wall_seconds"], 2),
        "server_eval_seconds": round(phase_seconds["eval"], 2),
        "server_eval_fraction": round(phase_seconds["eval"] / summary["wall_seconds"], 4),
        "server_checkpoint_seconds": round(phase_seconds["checkpoint"], 2),
        "server_busy_fraction": round(summary["server_busy_fraction"], 4),
        "versions": summary["versions"], "updates_per_s": round(summary["updates_per_second"], 2),
        "final_accuracy": summary["final_accuracy"],
        "command": f"mpiexec -n {workers + 1} python {' '.join(train)}",
        "host": socket.gethostname(), "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="worker ranks (mpiexec -n WORKERS+1)")
    parser.add_argument("--max-versions", type=int, default=40, help="global versions to train (default 40)")
    parser.add_argument("--repeats", type=int, default=1, help="runs, one JSON line each")
    parser.add_argument("extra", nargs="*", help="after --: extra mpi_afl.train arguments")
    args = parser.parse_args()
    for _ in range(args.repeats):
        print(json.dumps(run_once(args.workers, args.max_versions, args.extra)), flush=True)


if __name__ == "__main__":
    main()
