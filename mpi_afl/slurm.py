"""A SLURM batch job that continues its run until the run's own stop rule ends it.

    python -m mpi_afl.slurm OUT [mpi_afl.train options...]     (inside a batch script: jobs/*.sbatch)

One incarnation of the job (the first start, or a restart after a requeue) does:

1. remove this job's stale MPICH shared-memory segments on every node. Ranks killed before
   MPI_Finalize (pre-emption's SIGKILL after KillWait) leave `/dev/shm/mpich_shm_<id>_<node>`
   behind; `<id>` hashes the PMI job id `JOBID.STEPID`, which a requeued job gets again, so
   its MPI_Init would map the dead job's segment and spin forever;
2. start the trainer with `srun --mpi=$MPI_AFL_SRUN_MPI` (default pmi2: the plug-in that
   gives MPICH, and the `mpich` wheel, one world; Open MPI sites use pmix). The run resumes
   from OUT/checkpoint.h5 when there is one; a restarted job without a checkpoint (killed
   before its first one) starts the run over in OUT;
3. when the run stopped on a signal (`--signal=USR1@T`: the time limit is near), requeue
   the job with `scontrol requeue`, so it continues from the checkpoint; a run that ended by
   its own stop rule, or failed, ends the job. At most $MPI_AFL_MAX_REQUEUES restarts.

The signal of `--signal=USR1@T` (no `B:`) goes to the tasks of the steps, not to this
process; `scancel` (TERM to everything) ends the job for good: the trainer checkpoints and
this process dies without requeueing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_SRUN_MPI = "pmi2"
DEFAULT_MAX_REQUEUES = 100
_STEPS = 1000   # step ids whose segments count as the job's own (a job script runs a handful)


def fnv1a32(text: str) -> int:
    """MPICH's HASH_FNV (uthash's FNV-1a, 32 bit), which names the shared-memory segment of a PMI job id."""
    h = 2166136261
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def stale_segments(job_id: str, shm: Path = Path("/dev/shm")) -> list[Path]:
    """MPICH segments (`mpich_shm_<id>_<node>`, `mpich_vci_<id>_<node>`) of earlier steps with this job id."""
    ids = {f"{fnv1a32(f'{job_id}.{step}'):x}" for step in range(_STEPS)}
    found = []
    for path in sorted(shm.glob("mpich_*_*_*")):
        kind, world, _node = path.name[len("mpich_"):].split("_", 2)
        if kind in ("shm", "vci") and world in ids:
            found.append(path)
    return found


def remove_stale_segments(job_id: str, shm: Path = Path("/dev/shm")) -> list[Path]:
    removed = []
    for path in stale_segments(job_id, shm):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def trainer_args(out: Path, restarts: int) -> list[str]:
    """Resume from a checkpoint; a restarted job that has none starts over in its own OUT."""
    if (out / "checkpoint.h5").exists():
        return ["--resume", str(out)]
    if restarts > 0 and out.exists():
        print(f"mpi_afl.slurm: restart {restarts} finds no checkpoint in {out} (stopped before the first one): "
              f"starting the run over", flush=True)
        return ["--out", str(out), "--run.overwrite=true"]
    return ["--out", str(out)]


def summary_stamp(out: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of OUT/summary.json, or None: tells whether the training step wrote a new one
    (a comparison with this machine's clock could be fooled by a file server's)."""
    try:
        st = (out / "summary.json").stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def should_requeue(out: Path, returncode: int, stamp_before: tuple[int, int] | None) -> tuple[bool, str]:
    """(requeue?, why) after the training step ended with `returncode`; `stamp_before`: summary_stamp(out)
    taken before the step started."""
    stamp = summary_stamp(out)
    fresh = stamp is not None and stamp != stamp_before
    reason = json.loads((out / "summary.json").read_text()).get("stop_reason", "") if fresh else ""
    if fresh and reason != "signal":
        return False, f"the run ended by its stop rule ({reason})" + (f", exit {returncode}" if returncode else "")
    if returncode == 128 + signal.SIGUSR1:
        # Killed by the time-limit signal itself: it came while a rank's Python was starting or exiting (no
        # handler is installed then) and the run had not met its stop rule: start (or resume) again.
        return True, "the ranks were killed by SIGUSR1 while Python started or exited"
    if returncode != 0:
        return False, f"the training step failed (exit {returncode})"
    if not fresh:
        # Exit 0 without a new summary: the ranks were signalled while starting up, before the run began.
        return True, "the run was stopped by a signal before it wrote a summary"
    return True, "the run stopped on a signal (time limit or pre-emption) and has not met its stop rule"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"mpi_afl.slurm: error: {name}={value!r} is not an integer") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--clean-shm"]:   # the per-node step of a multi-node job
        _clean_shm(os.environ["SLURM_JOB_ID"])
        return 0
    if not argv or argv[0].startswith("-"):
        print("usage: python -m mpi_afl.slurm OUT [mpi_afl.train options...]  (inside a SLURM batch script)",
              file=sys.stderr)
        return 2
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        print("mpi_afl.slurm: error: SLURM_JOB_ID is not set; submit the script with sbatch", file=sys.stderr)
        return 2
    out, options = Path(argv[0]), argv[1:]
    restarts = _env_int("SLURM_RESTART_COUNT", 0)
    max_requeues = _env_int("MPI_AFL_MAX_REQUEUES", DEFAULT_MAX_REQUEUES)
    mpi = os.environ.get("MPI_AFL_SRUN_MPI", DEFAULT_SRUN_MPI)
    nodes = _env_int("SLURM_JOB_NUM_NODES", 1)

    # Every node of the allocation, one task each; a plain local call where the job has one node.
    if nodes > 1:
        subprocess.run(["srun", "--mpi=none", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                        sys.executable, "-m", "mpi_afl.slurm", "--clean-shm"], check=False)
    else:
        _clean_shm(job_id)

    cmd = ["srun", f"--mpi={mpi}", "--kill-on-bad-exit=1", sys.executable, "-m", "mpi_afl.train",
           *trainer_args(out, restarts), *options]
    print(f"mpi_afl.slurm: job {job_id} restart {restarts}: {' '.join(cmd)}", flush=True)
    before = summary_stamp(out)
    code = subprocess.run(cmd, check=False).returncode
    requeue, why = should_requeue(out, code, before)
    if not requeue:
        print(f"mpi_afl.slurm: job {job_id} done: {why}", flush=True)
        return code
    if restarts >= max_requeues:
        print(f"mpi_afl.slurm: {why}, but the job has restarted {restarts} times (MPI_AFL_MAX_REQUEUES="
              f"{max_requeues}); not requeueing. Continue with another sbatch of the same OUT.", flush=True)
        return 1
    print(f"mpi_afl.slurm: {why}: requeueing job {job_id}", flush=True)
    # The requeue ends this incarnation (SLURM kills the batch script); it restarts after SLURM's hold.
    return subprocess.run(["scontrol", "requeue", job_id], check=False).returncode


def _clean_shm(job_id: str) -> None:
    for path in remove_stale_segments(job_id):
        print(f"mpi_afl.slurm: removed stale MPI shared memory {path} (an earlier run of job {job_id} was killed)",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
