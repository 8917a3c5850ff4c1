"""A whole FedRevive run with and without a distillation group: wall time and worker idle time.

    python bench/distill_group_run.py                       # fmnist_cpu, 3 ranks, 80 versions, 2 repeats
    python bench/distill_group_run.py --ranks 5 --distill-ranks 2 --repeats 1 -- --run.device=cuda

Runs `mpiexec -n RANKS python -m mpi_afl.train --preset fmnist_cpu --algorithm fedrevive --max-versions N`
with `distill.ranks` = 0 (RANKS - 1 workers, the server distils alone) and = D (RANKS - 1 - D workers, the
group distils), alternating, `--repeats` times each, and prints one JSON line per run:

  distill_ranks, workers        the split of the ranks
  wall_seconds                  the server's wall time (summary.json)
  distill_seconds_per_version   the server's distillation seconds (distill_seconds) / versions
  worker_idle_fraction          the workers' summed time waiting for a job / their summed wall time
  final_accuracy, model_sha256  the run's result (the virtual clock: equal for any worker count at one D)

and, last, one line with the medians and `speedup` = wall_seconds(D = 0) / wall_seconds(D), the same ratio
for the distillation seconds per version, and the workers' idle fractions. Targets on 2 cores, 3 ranks,
D = 1: speedup >= 1.4 and worker_idle_fraction(D = 1) < 0.25. Needs the Fashion-MNIST files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mpi_afl.launch import mpiexec_path


def run_once(ranks: int, distill_ranks: int, versions: int, extra: list[str]) -> dict:
    train = ["-m", "mpi_afl.train", "--preset", "fmnist_cpu", "--algorithm", "fedrevive", "--max-versions",
             str(versions), f"--distill.ranks={distill_ranks}", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, *train, "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {done.returncode}")
        s = json.loads((out / "summary.json").read_text())
    return {"bench": "distill_group_run", "ranks": ranks, "distill_ranks": distill_ranks,
            "workers": ranks - 1 - distill_ranks, "versions": s["versions"],
            "wall_seconds": round(s["wall_seconds"], 2),
            "distill_seconds_per_version": round(s["algorithm_stats"].get("distill_seconds", 0.0) / s["versions"], 4),
            "worker_idle_fraction": round(s["worker_idle_fraction"], 4), "final_accuracy": s["final_accuracy"],
            "model_sha256": s["model_sha256"], "command": f"mpiexec -n {ranks} python {' '.join(train)}",
            "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--distill-ranks", type=int, default=1, help="D of the group run (distill.ranks)")
    parser.add_argument("--max-versions", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="after --: extra mpi_afl.train arguments")
    args = parser.parse_args()
    rows: dict[int, list[dict]] = {0: [], args.distill_ranks: []}
    for _ in range(args.repeats):   # alternating, so a change in machine load hits both alike
        for d in rows:
            row = run_once(args.ranks, d, args.max_versions, args.extra)
            rows[d].append(row)
            print(json.dumps(row), flush=True)

    def median(d: int, key: str) -> float:
        return statistics.median(r[key] for r in rows[d])

    d = args.distill_ranks
    print(json.dumps({"bench": "distill_group_run_summary", "ranks": args.ranks, "distill_ranks": d,
                      "repeats": args.repeats, "d0_wall_seconds": median(0, "wall_seconds"),
                      "dD_wall_seconds": median(d, "wall_seconds"),
                      "speedup": round(median(0, "wall_seconds") / median(d, "wall_seconds"), 3),
                      "distill_seconds_ratio": round(median(d, "distill_seconds_per_version")
                                                     / median(0, "distill_seconds_per_version"), 3),
                      "d0_worker_idle_fraction": median(0, "worker_idle_fraction"),
                      "dD_worker_idle_fraction": median(d, "worker_idle_fraction")}), flush=True)


if __name__ == "__main__":
    main()
