"""A SLURM batch job that continues its run until the run's own stop rule ends it.

    python -m mpi_afl.slurm OUT [mpi_afl.train options...]     (inside a batch script: jobs/*.sbatch)

One incarnation of the job (the first start, or a restart after a requeue) does:

1. remove stale MPICH shared-memory segments on every node. Ranks killed before
   MPI_Finalize (pre-emption's SIGKILL after KillWait) leave `/dev/shm/mpich_shm_<id>_<node>`
   behind; `<id>` hashes the PMI job id `JOBID.STEPID`, which a requeued job gets again, so
   its MPI_Init would map the dead job's segment and spin forever. Segments of earlier jobs
   (another job id: a cancelled job, a resubmission) are removed too, once they are a minute
   old. A segment that a live process maps (/proc/*/maps, compared by device and inode) is
   never stale: MPICH's names carry no cluster, so another job with the same id may own it;
2. start the trainer with `srun --mpi=$MPI_AFL_SRUN_MPI` (default pmi2: the plug-in that
   gives MPICH, and the `mpich` wheel, one world; Open MPI sites use pmix). The run resumes
   from OUT/checkpoint.h5 when there is one; a restarted job without a checkpoint (killed
   before its first one) starts the run over in OUT. An MPICH started on several nodes through the
   pmi2 plug-in gets MPIR_CVAR_CH4_NETMOD=ofi (pmi1_line_env says why);
3. when the run stopped on a signal (`--signal=USR1@T`: the time limit is near), requeue
   the job with `scontrol requeue`, so it continues from the checkpoint; a run that ended by
   its own stop rule, or failed, ends the job. At most $MPI_AFL_MAX_REQUEUES restarts, and no
   requeue after $MPI_AFL_MAX_IDLE_STARTS (3) starts in a row that added no version (the
   signal came before the run began every time: start-up is slower than the signal's lead time).

The signal of `--signal=USR1@T` (no `B:`) goes to the tasks of the steps, not to this
process; `scancel` (TERM to everything) ends the job for good: the trainer checkpoints and
this process dies without requeueing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .transport.peer_loss import EXIT_PEER_LOST

DEFAULT_SRUN_MPI = "pmi2"
DEFAULT_MAX_REQUEUES = 100
_STEPS = 1000   # step ids whose segments count as the job's own (a job script runs a handful)


def fnv1a32(text: str) -> int:
    """MPICH's HASH_FNV (uthash's FNV-1a, 32 bit), which names the shared-memory segment of a PMI job id."""
    h = 2166136261
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


OTHER_JOB_MIN_AGE = 60.0   # seconds: a segment of another job id younger than this may be one being set up


def mapped_files(proc: Path = Path("/proc")) -> set[tuple[int, int]]:
    """(device, inode) of every file that a live process maps, from /proc/*/maps (a process whose maps cannot
    be read, e.g. another user's without root, is not seen: the caller only removes files it may remove)."""
    found = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:   # gone, or not ours to read
            continue
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/") and fields[4] != "0":
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                found.add((os.makedev(major, minor), int(fields[4])))
    return found


def stale_segments(job_id: str, shm: Path = Path("/dev/shm"), mapped: set[tuple[int, int]] | None = None,
                   now: float | None = None) -> list[Path]:
    """MPICH segments (`mpich_shm_<id>_<node>`, `mpich_vci_<id>_<node>`) that no live process maps: those of
    earlier steps with this job id, and those of other job ids once OTHER_JOB_MIN_AGE old."""
    ids = {f"{fnv1a32(f'{job_id}.{step}'):x}" for step in range(_STEPS)}
    mapped = mapped_files() if mapped is None else mapped
    now = time.time() if now is None else now
    found = []
    for path in sorted(shm.glob("mpich_*_*_*")):
        kind, world, _node = path.name[len("mpich_"):].split("_", 2)
        if kind not in ("shm", "vci"):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in mapped:
            continue
        if world in ids or now - st.st_mtime >= OTHER_JOB_MIN_AGE:
            found.append(path)
    return found


def remove_stale_segments(job_id: str, shm: Path = Path("/dev/shm")) -> list[Path]:
    removed = []
    for path in stale_segments(job_id, shm):
        try:
            path.unlink()
            removed.append(path)
        except (FileNotFoundError, PermissionError):   # gone, or another user's (sticky /dev/shm)
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


def checkpoint_stamp(out: Path) -> tuple[int, int] | None:
    try:
        st = (out / "checkpoint.h5").stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def failure_note(out: Path, returncode: int, checkpoint_before: tuple[int, int] | None) -> str:
    """What a failed training step left to resume from (empty for a step that did not fail)."""
    if returncode == 0:
        return ""
    stamp = checkpoint_stamp(out)
    if stamp is None:
        return "; no checkpoint.h5 to resume from"
    when = "written during this start" if stamp != checkpoint_before else "from an earlier start"
    cause = (" (ranks died under the server, e.g. a node failed or its ranks were killed: a rank that lost its "
             f"peers exits {EXIT_PEER_LOST})" if returncode in (EXIT_PEER_LOST, 128 + signal.SIGKILL) else "")
    return (f"{cause}; {out / 'checkpoint.h5'} ({when}) is intact: `scontrol requeue JOBID`, or a new sbatch "
            f"with the same OUT, resumes from it")


PROGRESS_FILE = ".slurm-progress.json"   # in OUT: starts in a row that added no version
DEFAULT_MAX_IDLE_STARTS = 3


def run_versions(out: Path) -> int:
    """Versions the run has reached so far (summary.json), 0 when it has none."""
    try:
        return int(json.loads((out / "summary.json").read_text()).get("versions", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def idle_starts(out: Path, before: int, added_summary: bool) -> int:
    """Count this start in OUT/.slurm-progress.json: the number of starts in a row (this one included) that
    added no version; a start that added one resets it to 0."""
    path = out / PROGRESS_FILE
    try:
        count = int(json.loads(path.read_text()).get("idle_starts", 0))
    except (OSError, ValueError, AttributeError):
        count = 0
    count = 0 if added_summary and run_versions(out) > before else count + 1
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"idle_starts": count}) + "\n")
    return count


def mpi_library_version() -> str:
    """MPI_Get_library_version of the MPI that the trainer's mpi4py loads, without initialising MPI ('' when
    mpi4py is missing: the trainer then fails with its own message)."""
    try:
        import mpi4py
        mpi4py.rc.initialize = mpi4py.rc.finalize = False
        from mpi4py import MPI
    except ImportError:
        return ""
    return MPI.Get_library_version()


def pmi1_line_env(mpi: str, nodes: int, environ: dict[str, str], library: str) -> tuple[dict[str, str], str]:
    """(variables to add to the ranks' environment, why: a line for the job log; both empty when none).

    SLURM's pmi2 plug-in (22.05) reads each PMI-1 command with one read() of at most 1024 bytes, and an MPICH
    with its own PMI client speaks PMI-1 there (MPICH's default; the `mpich` wheel has no PMI-2 client). On
    several nodes MPICH's ch4:ucx puts a 4096-byte business card (MPID_MAX_BC_SIZE, whatever the UCX address's
    size: the rest is heap bytes, so UCX_TLS cannot shrink it) in 511-byte segments, hex-encoded with zero runs
    compressed: a segment without zero runs is a 1081-byte `cmd=put` line, which the plug-in cuts in two (a
    corrupt address, UCX "Destination is unreachable", and "mpi/pmi2: invalid client request" in slurmd's
    log), depending on leftover heap bytes, so some starts fail. ch4:ofi's card is libfabric's address, read
    into FI_NAME_MAX (64) bytes: one value of at most 128 hex characters, every line below 500 bytes (70
    measured with the tcp provider). The user's MPIR_CVAR_CH4_NETMOD, or MPIR_CVAR_PMI_VERSION=2 (an MPICH
    with PMI-2, whose commands carry their length), is left as it is."""
    device = re.search(r"^MPICH Device:\s*(.*)$", library, re.MULTILINE)
    if (mpi != "pmi2" or nodes < 2 or device is None or "MPIR_CVAR_CH4_NETMOD" in environ
            or environ.get("MPIR_CVAR_PMI_VERSION") == "2"):
        return {}, ""
    if "ofi" not in re.split(r"[\s:,]+", device.group(1)):
        return {}, (f"warning: this MPICH ({device.group(1)}) has no ofi netmod, and its PMI-1 commands to "
                    f"SLURM's pmi2 plug-in can exceed the 1024 bytes the plug-in reads at once (MPI_Init then "
                    f"fails at random across nodes): set MPIR_CVAR_PMI_VERSION=2 if it has PMI-2, or use "
                    f"MPI_AFL_SRUN_MPI=pmix with an MPICH built with PMIx")
    return {"MPIR_CVAR_CH4_NETMOD": "ofi"}, (
        "MPIR_CVAR_CH4_NETMOD=ofi: across nodes MPICH's ucx business card makes PMI-1 lines longer than the "
        "1024 bytes SLURM's pmi2 plug-in reads at once (set MPIR_CVAR_CH4_NETMOD to choose the netmod yourself)")


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
    max_idle = _env_int("MPI_AFL_MAX_IDLE_STARTS", DEFAULT_MAX_IDLE_STARTS)
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
    extra, why_extra = pmi1_line_env(mpi, nodes, dict(os.environ),
                                     mpi_library_version() if mpi == "pmi2" and nodes > 1 else "")
    if why_extra:
        print(f"mpi_afl.slurm: {why_extra}", flush=True)
    print(f"mpi_afl.slurm: job {job_id} restart {restarts}: {' '.join(cmd)}", flush=True)
    before, versions_before, checkpoint_before = summary_stamp(out), run_versions(out), checkpoint_stamp(out)
    code = subprocess.run(cmd, check=False, env={**os.environ, **extra}).returncode
    requeue, why = should_requeue(out, code, before)
    if not requeue:
        print(f"mpi_afl.slurm: job {job_id} done: {why}{failure_note(out, code, checkpoint_before)}", flush=True)
        return code
    idle = idle_starts(out, versions_before, summary_stamp(out) not in (None, before))
    if idle >= max_idle:
        print(f"mpi_afl.slurm: {why}; {idle} start{'s' * (idle > 1)} in a row added no version: start-up "
              f"(importing torch, MPI initialisation, loading data) takes longer than the time-limit signal's lead "
              f"time, so every start is stopped before it trains. Not requeueing: submit again with a larger "
              f"--signal=USR1@SECONDS or a longer --time (the run continues from {out}).", flush=True)
        return 1
    if restarts >= max_requeues:
        print(f"mpi_afl.slurm: {why}, but the job has restarted {restarts} times (MPI_AFL_MAX_REQUEUES="
              f"{max_requeues}); not requeueing. Continue with another sbatch of the same OUT.", flush=True)
        return 1
    print(f"mpi_afl.slurm: {why}: requeueing job {job_id}. Expected next in this log: slurmstepd's "
          f"'*** JOB {job_id} ... CANCELLED ... DUE TO JOB REQUEUE ***' (how SLURM ends this start), then about "
          f"two minutes of hold (reason BeginTime) before the restart resumes from the checkpoint", flush=True)
    # The requeue ends this incarnation (SLURM kills the batch script); it restarts after SLURM's hold.
    return subprocess.run(["scontrol", "requeue", job_id], check=False).returncode


def _clean_shm(job_id: str) -> None:
    for path in remove_stale_segments(job_id):
        print(f"mpi_afl.slurm: removed stale MPI shared memory {path} on {os.uname().nodename} (ranks of an "
              f"earlier start or job were killed before MPI_Finalize; no live process mapped it)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
