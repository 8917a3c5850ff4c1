"""The real jobs/*.sbatch scripts on a real SLURM (`.ci/slurm_up.sh` brings up a one-node cluster).

Skipped when no SLURM answers. The scripts are adapted only through what they document: sbatch options
on the command line (fewer tasks, a short time limit), their environment variables (OUT, SWEEP,
MPI_AFL_ALGORITHMS, MPI_AFL_SEEDS) and trainer options after the script name (digits, CPU, tiny runs).
The runs use the wall clock with injected sleeps (`delays.wall_scale`), so they last long enough to be
signalled or killed while using little CPU.

All jobs are submitted at once by one module fixture (`campaign`) and driven together by one polling
loop (signals, SIGKILLs and requeues at the right moment), so the module takes about as long as its
longest job, the time-limit one (a few minutes), instead of the sum. SLURM holds a requeued job for
about two minutes (reason BeginTime); the loop releases it with `scontrol update StartTime=now` once the
previous start has left the node, which changes nothing else about the restart.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpi_helpers import REPO, summary
from slurm_helpers import (RUN, TERMINAL, Job, assert_complete_log, completed, drive, handles_usr1, logged_versions,
                           show_job, tail)

SMALL = ["--ntasks=3", "--cpus-per-task=1"]


def _slurm_problem() -> str:
    if shutil.which("sbatch") is None:
        return "sbatch not found: no SLURM on this machine (.ci/slurm_up.sh brings up a one-node SLURM as root)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed ({e}): SLURM is installed but not running (.ci/slurm_up.sh)"
    if not any(s in states for s in ("idle", "mixed", "allocated")):
        return f"SLURM has no usable node (sinfo says {states.split() or 'nothing'}; .ci/slurm_up.sh)"
    return ""


_PROBLEM = _slurm_problem()
# The campaign takes 3-5 minutes on an otherwise idle 2-core machine; the limits here are hang guards, about
# ten times that.
CAMPAIGN_GUARD = 3000
pytestmark = [pytest.mark.skipif(bool(_PROBLEM), reason=_PROBLEM or "SLURM ready"), pytest.mark.timeout(3600),
              pytest.mark.slurm, pytest.mark.slow]


def _lost(why: str):
    """The cluster stopped being usable while the tests ran (its controller went away, the node went down):
    that is the machine's state, not a result of the scripts, so the test skips and says why."""
    pytest.skip(f"SLURM became unusable during the tests: {why}")


def slurm(args: list, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """A SLURM command; one that fails because SLURM no longer answers skips the test."""
    try:
        out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, **kw)
    except (OSError, subprocess.SubprocessError) as e:
        _lost(f"{args[0]} failed ({e})")
    if out.returncode != 0:
        if problem := _slurm_problem():
            _lost(f"{args[0]} exited {out.returncode} ({out.stderr.strip()[:200]}); {problem}")
        if check:
            raise AssertionError(f"{' '.join(map(str, args))} exited {out.returncode}: {out.stderr}")
    return out


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"   # `python` in the script = this one
    return env


def submit(tmp_path: Path, script: str, sbatch: list[str], args: list[str], **env: str) -> str:
    out = slurm(["sbatch", "--parsable", *sbatch, REPO / "jobs" / script, *args], check=True, cwd=tmp_path,
                env=_env(**env))
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    return show_job(slurm, job)


def rank_pids(job: str, every_step: bool = False) -> list[int]:
    """Processes of the job's tasks on this node (`every_step`: also the batch script and helpers)."""
    out = slurm(["scontrol", "listpids", job]).stdout
    return [int(f[0]) for f in (line.split() for line in out.splitlines()[1:])
            if len(f) == 5 and (every_step or (f[2] != "batch" and f[3] != "-"))]


def kill_ranks(job: str) -> None:
    """SIGKILL to the ranks of the job's training step, and nothing else: what pre-emption does to ranks that
    have not exited after KillWait. (`scancel --signal=KILL` would cancel the job, with a SIGTERM first.)"""
    pids = rank_pids(job)
    assert pids, f"no rank processes listed for job {job}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def kill_after(versions: int, with_checkpoint: bool):
    """SIGKILL the ranks once `versions` are logged (before or after the first checkpoint), then requeue."""
    def act(job: Job, info: dict) -> None:
        if not job.events and logged_versions(job.out) >= versions \
                and (job.out / "checkpoint.h5").exists() == with_checkpoint:
            kill_ranks(job.id)
            job.events.append("killed")
            job.requeue_when_ended = True
    return act


def usr1_during_start_up(job: Job, info: dict) -> None:
    """USR1 to the ranks once all of them handle it, while they are still starting up (no run.h5 yet)."""
    pids = rank_pids(job.id)
    if not job.events and len(pids) == 3 and all(handles_usr1(p) for p in pids):
        slurm(["scancel", "--signal=USR1", job.id], check=True)
        job.events.append("signalled" if not (job.out / "run.h5").exists() else "signalled too late")


def release_when_gone(job: Job) -> None:
    """Release a job from SLURM's requeue hold once its previous start has left the node: a restart launched
    while slurmd still revokes the old one's credential is killed at once ("Job credential revoked")."""
    job.held_since = job.held_since or time.monotonic()
    if time.monotonic() - job.held_since > 5 and not rank_pids(job.id, every_step=True):
        slurm(["scontrol", "update", f"JobId={job.id}", "StartTime=now"])
        job.held_since = 0.0


TIME_LIMIT_VERSIONS = 45   # 2-s jobs on 1 worker: >= 90 s of training, longer than the first SIGUSR1 (60-90 s in)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict[str, Job]:
    root = tmp_path_factory.mktemp("slurm")
    jobs = {}

    def single(name: str, sbatch: list[str], args: list[str], **kw) -> None:
        d = root / name
        d.mkdir()
        job_id = submit(d, "slurm_single_node.sbatch", [*SMALL, *sbatch], [*RUN, *args], OUT=str(d / "run"))
        jobs[name] = Job(job_id, d / f"mpi_afl-{job_id}.out", d / "run", **kw)

    # --time=2 with USR1 30 s before the end: SLURM sends it 60-90 s into the job (its time-limit check runs
    # every 30 s and signals early rather than late). It starts alone, so that its ranks are training, not
    # starting up, by then (a signal during start-up is the usr1_at_start case).
    single("time_limit", ["--time=2", "--signal=USR1@30", "--ntasks=2"],
           ["--delays.wall_scale=2.0", f"--max-versions={TIME_LIMIT_VERSIONS}"])
    started = time.monotonic()
    while logged_versions(jobs["time_limit"].out) == 0 and time.monotonic() - started < CAMPAIGN_GUARD / 10:
        time.sleep(1)
    single("kill_before_checkpoint", ["--time=10"],
           ["--delays.wall_scale=0.3", "--max-versions=20", "--run.checkpoint_every=0"],
           on_running=kill_after(5, with_checkpoint=False))
    single("kill_after_checkpoint", ["--time=10"],
           ["--delays.wall_scale=0.3", "--max-versions=30", "--run.checkpoint_every=5"],
           on_running=kill_after(10, with_checkpoint=True))
    single("usr1_at_start", ["--time=10"], ["--delays.wall_scale=0.2", "--max-versions=10"],
           on_running=usr1_during_start_up)
    d = root / "sweep"
    d.mkdir()
    array = submit(d, "sweep_array.sbatch", ["--ntasks=2", "--cpus-per-task=1", "--time=10", "--array=0-1"],
                   [*RUN, "--delays.wall_scale=0.1", "--max-versions=10"], SWEEP=str(d / "runs"),
                   MPI_AFL_ALGORITHMS="fedasync", MPI_AFL_SEEDS="0 1")
    for task in (0, 1):
        jobs[f"sweep_{task}"] = Job(f"{array}_{task}", d / f"mpi_afl-sweep-{array}_{task}.out",
                                    d / "runs" / f"fedasync-s{task}")
    drive(jobs, CAMPAIGN_GUARD, slurm, on_held=release_when_gone)
    return jobs


def finished(job: Job, versions: int) -> str:
    """completed(job, versions), unless the cluster stopped being usable (then the test skips)."""
    state = job.done.get("JobState", "")
    if state != "COMPLETED" and (problem := _slurm_problem() or (state in ("NODE_FAIL", "BOOT_FAIL", "")
                                                                 and f"the job ended {state or 'unknown to SLURM'}")):
        _lost(problem)
    return completed(job, versions)


def test_time_limit_signal_requeues_until_the_run_is_done(campaign):
    job = campaign["time_limit"]
    text = finished(job, TIME_LIMIT_VERSIONS)
    assert int(job.done["Restarts"]) >= 1, tail(job.log)
    assert "signal SIGUSR1" in text and "requeueing job" in text, tail(job.log)
    assert "restart 0:" in text and "restart 1:" in text, tail(job.log)   # one log, appended to across restarts
    assert_complete_log(job.out, TIME_LIMIT_VERSIONS)


def test_requeue_before_the_first_checkpoint_starts_over_and_does_not_hang(campaign):
    """Ranks SIGKILLed before any checkpoint leave MPICH's shared memory behind; the requeued job removes
    it (or MPI_Init would spin forever on it) and starts the run over in the same OUT."""
    job = campaign["kill_before_checkpoint"]
    assert job.events == ["killed", "requeued"], tail(job.log)
    text = finished(job, 20)
    assert "removed stale MPI shared memory" in text and "finds no checkpoint" in text, tail(job.log)
    assert_complete_log(job.out, 20)


def test_requeue_after_sigkill_resumes_from_the_checkpoint(campaign):
    job = campaign["kill_after_checkpoint"]
    assert job.events == ["killed", "requeued"], tail(job.log)
    text = finished(job, 30)
    assert "removed stale MPI shared memory" in text and "restart 1: srun" in text, tail(job.log)
    assert "resumed from" in text, tail(job.log)
    assert_complete_log(job.out, 30)


def test_usr1_during_start_up_leaves_no_crashed_rank(campaign):
    """USR1 to the ranks while they start up (importing torch, loading data): every rank exits 0, the job
    requeues itself and the restart completes the run."""
    job = campaign["usr1_at_start"]
    assert job.events == ["signalled"], tail(job.log)
    text = finished(job, 10)
    assert int(job.done["Restarts"]) >= 1, tail(job.log)
    assert "Traceback" not in text and "Exited with exit code" not in text, tail(job.log)


@pytest.mark.parametrize("task", [0, 1])
def test_sweep_array_completes(campaign, task):
    job = campaign[f"sweep_{task}"]
    finished(job, 10)
    assert (summary(job.out)["algorithm"], summary(job.out)["seed"]) == ("fedasync", task)


def test_srun_without_pmi_is_refused_with_the_cause(tmp_path):
    """`srun --mpi=none` starts N MPI worlds of one: every task stops with exit 2 naming the mismatch."""
    try:
        out = subprocess.run(["srun", "-n", "2", "--mpi=none", "--time=5", sys.executable, "-m", "mpi_afl.train",
                              "--dataset", "digits", "--out", str(tmp_path / "run")], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=CAMPAIGN_GUARD)
    except (OSError, subprocess.SubprocessError) as e:
        _lost(f"srun failed ({e})")
    if out.returncode != 2 and (problem := _slurm_problem()):
        _lost(problem)
    assert out.returncode == 2, out.stderr
    assert "started 2 tasks" in out.stderr and "world of 1" in out.stderr and "--mpi=pmi2" in out.stderr
    assert not (tmp_path / "run").exists()


def test_generated_sweep_array_runs_with_its_cluster_options(tmp_path):
    """`mpi-afl sweep --slurm` with the array's concurrency, partition, CPUs per task and an extra sbatch line:
    the array SLURM accepts runs every point to its stop rule, under those options."""
    from mpi_afl.sweep import main as sweep
    script, out = tmp_path / "sweep.sbatch", tmp_path / "sweep"
    assert sweep(["--out", str(out), "--algorithms", "fedasync", "--seeds", "0,1", "--ranks", "2",
                  "--slurm", str(script), "--array-parallel", "1", "--partition", "debug", "--cpus-per-task", "1",
                  "--sbatch=--time=10", "--", *RUN, "--max-versions", "5"]) == 0
    job = slurm(["sbatch", "--parsable", script], check=True, cwd=tmp_path, env=_env()).stdout.strip().split(";")[0]
    info = job_info(job)
    assert (info.get("Partition"), info.get("ArrayTaskThrottle"), info.get("TimeLimit")) == \
        ("debug", "1", "00:10:00"), info
    end = time.monotonic() + CAMPAIGN_GUARD
    for seed in (0, 1):
        task = job_info(f"{job}_{seed}")
        while time.monotonic() < end and task.get("JobState") not in TERMINAL:
            time.sleep(1)
            task = job_info(f"{job}_{seed}")
        assert task.get("JobState") == "COMPLETED", f"task {seed}: {task.get('JobState')}\n" + "\n".join(
            tail(p) for p in (out / "logs").glob("*.out"))
        assert summary(out / "fedasync" / f"s{seed}")["versions"] == 5
