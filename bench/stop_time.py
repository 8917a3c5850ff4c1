"""How long a run takes to stop after SIGTERM, against SLURM's KillWait: signal to the last rank gone.

A pre-empted or cancelled job gets SIGTERM and, KillWait seconds later (30 s by default), SIGKILL. In that time
the server finishes the update it is processing (a FedRevive distillation), writes checkpoint.h5, stops the
workers (each finishes its job first), evaluates the final model and closes run.h5. This starts
`mpiexec -n RANKS python -m mpi_afl.train --preset PRESET --algorithm A` (the launcher forwards the signal to
every rank, as slurmstepd does), waits until a server.log progress line names version `--after` (evaluations lag the
newest version, so the run is further on), sends SIGTERM to the launcher and measures until it has exited, then prints one JSON line per
run:

    {"bench": "stop_time", "algorithm": "fedrevive", "ranks": 5, "after_versions": 30, "stop_seconds": ...,
     "exit": 0, "versions": ..., "stop_reason": "signal", "checkpoint": true, "load_avg_1min": ..., "cores": ...}

Measure it on the nodes and under the load your jobs see; `stop_seconds` well below KillWait is the target.

    python bench/stop_time.py                                 # fmnist_cpu, fedbuff and fedrevive, 5 ranks
    python bench/stop_time.py --algorithms fedrevive --ranks 9 --after 60
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpi_afl.launch import mpiexec_path

VERSION = re.compile(r"\[server\] version\s+(\d+)")


def versions_done(log: Path) -> int:
    """The highest version a progress line of OUT/server.log names (0 before any)."""
    if not log.exists():
        return 0
    found = VERSION.findall(log.read_text(errors="replace"))
    return max(map(int, found), default=0)


def stop_once(algorithm: str, ranks: int, preset: str, after: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "mpi_afl.train", "--preset", preset,
               "--algorithm", algorithm, "--max-versions", "100000", "--out", str(out), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while versions_done(out / "server.log") < after:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} ended (exit {proc.returncode}) before {after} versions")
            time.sleep(0.5)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
        seconds = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        checkpoint = (out / "checkpoint.h5").exists()
    return {"bench": "stop_time", "algorithm": algorithm, "ranks": ranks, "preset": preset, "after_versions": after,
            "stop_seconds": round(seconds, 2), "exit": code, "versions": summary.get("versions"),
            "stop_reason": summary.get("stop_reason"), "checkpoint": checkpoint,
            "load_avg_1min": round(os.getloadavg()[0], 2), "cores": os.cpu_count(), "command": " ".join(cmd[3:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="fedbuff,fedrevive")
    parser.add_argument("--ranks", type=int, default=5)
    parser.add_argument("--preset", default="fmnist_cpu")
    parser.add_argument("--after", type=int, default=60, help="versions made before the signal (FedRevive "
                        "distils from the preset's freeze gate, version 20, on)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="after --: extra mpi_afl.train arguments")
    args = parser.parse_args()
    for _ in range(args.repeats):
        for algorithm in args.algorithms.split(","):
            print(json.dumps(stop_once(algorithm, args.ranks, args.preset, args.after, args.extra)), flush=True)


if __name__ == "__main__":
    main()
