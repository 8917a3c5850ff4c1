"""What the SLURM tests share (tests/test_slurm_jobs.py on a one-node SLURM, tests/test_slurm_multinode.py on the
emulated nodes): the trainer's arguments of a wall-clock run that lasts, the job record, the polling loop that
drives a campaign of jobs, and the checks of a run log."""

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpi_afl.storage.runlog import read_run
from mpi_helpers import summary

# Small and slow on purpose: 2 workers, jobs of 1 virtual unit that sleep `delays.wall_scale` seconds each.
RUN = ["--dataset", "digits", "--run.device=cpu", "--algorithm", "fedasync", "--clock", "wall",
       "--data.num_clients=8", "--server.concurrency=2", "--client.iterations=2", "--delays.schedule=none",
       "--run.eval_every=5", "--run.log_flush_seconds=0.5"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Job:
    """One submitted job and what the polling loop does to it."""
    id: str
    log: Path
    out: Path
    on_running: Callable[["Job", dict], None] | None = None   # called at every poll while it runs
    requeue_when_ended: bool = False                          # after a kill: requeue once it has ended
    done: dict = field(default_factory=dict)                  # `scontrol show job` fields once finished
    held_since: float = 0.0                                   # when the loop first saw it in SLURM's requeue hold
    events: list = field(default_factory=list)                # what the loop did, for the assertions


def show_job(slurm: Callable, job: str) -> dict:
    """`scontrol show job` as a dict, through the caller's `slurm` command runner. An array job gives one line
    per task: the first value of a key is kept (the caller asks for one task)."""
    info = {}
    for pair in slurm(["scontrol", "show", "job", "-o", job]).stdout.split():
        key, _, value = pair.partition("=")
        info.setdefault(key, value)
    return info


def drive(jobs: dict[str, Job], timeout: float, slurm: Callable, on_held: Callable[[Job], None] | None = None) -> None:
    """Poll the jobs every second until all are done or `timeout` seconds have passed. A job that ended is done,
    unless it is to be requeued once (`requeue_when_ended`); a running one gets its `on_running` call; one held
    by SLURM after a requeue (PENDING, reason BeginTime) gets `on_held`, where given (else it waits out the
    hold). What is not done by the end is cancelled, and its `done` says so."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(not j.done for j in jobs.values()):
        for job in (j for j in jobs.values() if not j.done):
            info = show_job(slurm, job.id)
            state = info.get("JobState", "")
            if state in TERMINAL:
                if job.requeue_when_ended:
                    job.requeue_when_ended = False
                    slurm(["scontrol", "requeue", job.id], check=True)
                    job.events.append("requeued")
                else:
                    job.done = info
            elif state == "PENDING" and info.get("Reason") == "BeginTime" and on_held is not None:
                on_held(job)
            elif state == "RUNNING" and job.on_running is not None:
                job.on_running(job, info)
        time.sleep(1)
    for job in jobs.values():
        if not job.done:
            slurm(["scancel", job.id])
            job.done = {"JobState": f"still running after the campaign's {timeout:.0f} s"}


def tail(log: Path) -> str:
    """A job log's last 60 lines, for an assertion's message."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-60:]) if log.exists() else f"(no {log})"


def completed(job: Job, versions: int) -> str:
    """The job log, after checking that the job completed and its run ended at `versions` by its stop rule."""
    assert job.done.get("JobState") == "COMPLETED", f"{job.done.get('JobState')}; log:\n{tail(job.log)}"
    s = summary(job.out)
    assert (s["stop_reason"], s["versions"]) == ("max_versions", versions), tail(job.log)
    return job.log.read_text()


def assert_complete_log(out: Path, versions: int) -> None:
    """run.h5 holds every version 1..versions once (fedasync: one accepted update per version), and every
    evaluation (every 5 versions) once."""
    run = read_run(out / "run.h5")
    a = run["arrivals"]
    accepted = np.sort(a["version"][a["accepted"]])
    np.testing.assert_array_equal(accepted, np.arange(1, versions + 1))
    assert len(np.unique(a["job"])) == len(a["job"]), "an arrival row is duplicated"
    evals = run["evals"]["version"]
    assert len(np.unique(evals)) == len(evals), f"duplicate evaluation rows: {evals}"
    assert set(range(5, versions + 1, 5)) <= set(evals.tolist()), f"missing evaluation rows: {evals}"


def logged_versions(out: Path) -> int:
    """Accepted updates in the live run.h5 so far (0 while it does not exist yet)."""
    try:
        return int(read_run(out / "run.h5")["arrivals"]["accepted"].sum())
    except (OSError, ValueError):
        return 0


def handles_usr1(pid: int) -> bool:
    """The process has a handler for SIGUSR1 (its SigCgt mask), i.e. the trainer's first line has run."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGUSR1 - 1)))
