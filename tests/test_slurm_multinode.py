"""The real job scripts and launchers across several nodes: an emulated multi-node SLURM on this machine.

`.ci/multinode_up.sh up 4` brings up nodes n1..n4 (each a network + UTS + mount namespace with its own host
name, address on a private bridge, boot id and /dev/shm; one slurmd each) and their own slurmctld; clients
reach it with SLURM_CONF=$MN_STATE/etc/slurm.conf. Ranks on two nodes then share only the kernel and the
file system: MPI traffic between them crosses the nodes' veth pairs (the tests check the bytes).

Skipped, with the reason, when the emulated cluster is not up. All SLURM jobs are submitted at once by one
module fixture (`campaign`) and driven by one polling loop; a requeued job waits out SLURM's own hold (about
two minutes, reason BeginTime) and is never released early.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from mpi_afl.slurm import fnv1a32
from mpi_helpers import HANG_GUARD, MPIEXEC, REPO, env as mpi_env, summary
from slurm_helpers import RUN, Job, assert_complete_log, completed, drive, handles_usr1, logged_versions, tail
UP = REPO / ".ci" / "multinode_up.sh"
MN_STATE = Path(os.environ.get("MN_STATE", "/var/tmp/mpi_afl-mn"))
CONF = MN_STATE / "etc" / "slurm.conf"
# The default (offline) preset on the virtual clock: bit-identical for any rank count and placement.
EXACT = ["--run.device=cpu", "--run.threads=1"]


def _nodes_up() -> tuple[int, str]:
    """(emulated nodes usable, why not all)"""
    if not CONF.exists():
        return 0, f"no emulated multi-node cluster ({CONF} missing; run .ci/multinode_up.sh up 4 as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20,
                             env=dict(os.environ, SLURM_CONF=str(CONF)))
    except (OSError, subprocess.SubprocessError) as e:
        return 0, f"sinfo of the emulated cluster failed ({e}); run .ci/multinode_up.sh up 4"
    usable = {line.split()[0] for line in out.stdout.splitlines()
              if re.search(r" (idle|mixed|allocated)\S*$", line)}
    if not usable:
        return 0, f"the emulated cluster has no usable node ({out.stdout.split() or out.stderr.strip()[:200]})"
    return len(usable), ""


NODES, _PROBLEM = _nodes_up()
pytestmark = [pytest.mark.skipif(NODES < 2, reason=_PROBLEM or f"{NODES} emulated node(s): need 2"),
              pytest.mark.timeout(2 * HANG_GUARD), pytest.mark.slurm, pytest.mark.slow]


def _env(**extra: str) -> dict:
    e = dict(mpi_env(), SLURM_CONF=str(CONF), **extra)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"   # `python` in the script = this one
    return e


def slurm(args: list, check: bool = False, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120,
                         env=kw.pop("env", _env()), **kw)
    if check and out.returncode != 0:
        if _nodes_up()[0] < 2:
            pytest.skip(f"the emulated cluster became unusable during the tests: {_nodes_up()[1]}")
        raise AssertionError(f"{' '.join(map(str, args))} exited {out.returncode}: {out.stderr}")
    return out


def on_node(node: str, args: list) -> subprocess.CompletedProcess:
    return slurm([UP, "exec", node, *args])


def hostnames(out: Path) -> list[str]:
    with h5py.File(out / "run.h5", "r") as f:
        return json.loads(f.attrs["hostnames"])


def one_process(out: Path, args: list[str]) -> str:
    """model_sha256 of the same run in one process (no MPI)."""
    done = subprocess.run([sys.executable, "-m", "mpi_afl.train", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=HANG_GUARD, env=mpi_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return summary(out)["model_sha256"]


def veth_tx(node: str) -> int:
    return int(Path(f"/sys/class/net/mn-{node}/statistics/tx_bytes").read_text())


@pytest.mark.mpi
def test_hydra_without_slurm_across_two_nodes(tmp_path):
    """mpiexec (hydra) starts its proxies on n1 and n2 through an ssh stand-in (nsenter into the node): the
    run spans both hosts, its traffic crosses n2's veth, and its model is the one-process run's."""
    launcher = slurm([UP, "launcher"], check=True).stdout.strip()
    args = [*EXACT, "--max-versions", "20"]
    before = veth_tx("n2")
    done = subprocess.run([MPIEXEC, "-launcher", "ssh", "-launcher-exec", launcher, "-hosts", "n1:1,n2:2", "-n", "3",
                           sys.executable, "-m", "mpi_afl.train", "--out", str(tmp_path / "hydra"), *args],
                          capture_output=True, text=True, timeout=HANG_GUARD, env=mpi_env(), cwd=tmp_path)
    sent = veth_tx("n2") - before
    assert done.returncode == 0, done.stderr[-3000:]
    assert hostnames(tmp_path / "hydra") == ["n1", "n2"]
    assert sent > 1_000_000, f"only {sent} bytes left n2 over its veth: MPI did not use the network"
    assert summary(tmp_path / "hydra")["model_sha256"] == one_process(tmp_path / "one", args)


def rank_pids_on(job: str, node: str) -> list[int]:
    """Processes of the job's task steps on `node` (scontrol listpids reads the node's own spool directory)."""
    out = on_node(node, ["scontrol", "listpids", job]).stdout
    return [int(f[0]) for f in (line.split() for line in out.splitlines()[1:])
            if len(f) == 5 and f[2] != "batch" and f[3] != "-"]


def kill_node_after_checkpoint(node: str, versions: int):
    """SIGKILL every rank on `node` once `versions` are logged and a checkpoint exists (a node failure, as far as
    the ranks see it), then requeue the job once it has ended."""
    def act(job: Job, info: dict) -> None:
        if not job.events and logged_versions(job.out) >= versions and (job.out / "checkpoint.h5").exists():
            pids = rank_pids_on(job.id, node)
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                job.events.append(f"killed {len(pids)} on {node}")
                job.requeue_when_ended = True
    return act


def usr1_during_start_up(job: Job, info: dict) -> None:
    """USR1 to the ranks on both nodes once all of them handle it, while they still start up (no run.h5)."""
    pids = rank_pids_on(job.id, "n1") + rank_pids_on(job.id, "n2")
    if not job.events and len(pids) == 2 and all(handles_usr1(p) for p in pids):
        slurm(["scancel", "--signal=USR1", job.id], check=True)
        job.events.append("signalled" if not (job.out / "run.h5").exists() else "signalled too late")


VERSIONS_KILL = 60
TIME_LIMIT_VERSIONS = 45   # 2-s jobs on 1 worker: >= 90 s of training, longer than the first SIGUSR1 (60-90 s in)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict[str, Job]:
    root = tmp_path_factory.mktemp("multinode")
    jobs = {}

    def submit(name: str, sbatch: list[str], args: list[str], act=None, **env: str) -> None:
        d = root / name
        d.mkdir()
        out = slurm(["sbatch", "--parsable", *sbatch, REPO / "jobs" / "slurm_multi_node.sbatch", *args],
                    check=True, cwd=d, env=_env(OUT=str(d / "run"), **env))
        job = out.stdout.strip().split(";")[0]
        jobs[name] = Job(job, d / f"mpi_afl-multi-{job}.out", d / "run", on_running=act)

    # The server alone on n1, two workers on n2 (an arbitrary distribution from a host file; --ntasks-per-node
    # replaces the script's 8, which -n 3 on 2 nodes could not satisfy).
    (root / "hosts").write_text("n1\nn2\nn2\n")
    submit("two_nodes", ["-N", "2", "-n", "3", "--ntasks-per-node=2", "--cpus-per-task=1", "--distribution=arbitrary",
                         "--time=20"],
           [*EXACT, "--max-versions", "20"], SLURM_HOSTFILE=str(root / "hosts"), PMI_DEBUG="1")
    if NODES >= 4:
        submit("four_nodes", ["-N", "4", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=20"],
               [*EXACT, "--max-versions", "20"])
    # The time limit across two nodes: server on n1, one worker on n2, USR1 30 s before a 2-minute limit.
    submit("time_limit", ["-N", "2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=2", "--signal=USR1@30"],
           [*RUN, "--delays.wall_scale=2.0", f"--max-versions={TIME_LIMIT_VERSIONS}"], PMI_DEBUG="1")
    # n2's ranks SIGKILLed after a checkpoint, then a requeue: the resume must be the one-process run's model.
    submit("node_killed", ["-N", "2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=20"],
           [*EXACT, f"--max-versions={VERSIONS_KILL}", "--run.checkpoint_every=10", "--run.log_flush_seconds=0.5"],
           act=kill_node_after_checkpoint("n2", 20))
    # A start stopped by the time-limit signal before it trained, with MPI_AFL_MAX_IDLE_STARTS=1: no requeue.
    submit("no_progress", ["-N", "2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=20"],
           [*EXACT, "--max-versions", "20"], act=usr1_during_start_up, MPI_AFL_MAX_IDLE_STARTS="1")
    drive(jobs, 2 * HANG_GUARD, slurm)   # a requeued job waits out SLURM's hold
    # The references, after the jobs (one run at a time on this machine's cores).
    jobs["sha20"] = one_process(root / "one20", [*EXACT, "--max-versions", "20"])
    jobs["sha_kill"] = one_process(root / "one_kill", [*EXACT, f"--max-versions={VERSIONS_KILL}",
                                                       "--run.checkpoint_every=10"])
    return jobs


def test_two_nodes_server_alone_matches_one_process(campaign):
    job = campaign["two_nodes"]
    completed(job, 20)
    assert hostnames(job.out) == ["n1", "n2"]
    hosts = [r["host"] for r in sorted(summary(job.out)["ranks"], key=lambda r: r["rank"])]
    assert hosts == ["n1", "n2", "n2"], hosts   # the server alone on its node
    assert summary(job.out)["model_sha256"] == campaign["sha20"]


def test_four_nodes_one_rank_each_matches_one_process(campaign):
    if "four_nodes" not in campaign:
        pytest.skip(f"{NODES} emulated nodes up; this test needs 4 (.ci/multinode_up.sh up 4)")
    job = campaign["four_nodes"]
    completed(job, 20)
    assert hostnames(job.out) == ["n1", "n2", "n3", "n4"]
    assert summary(job.out)["model_sha256"] == campaign["sha20"]


def test_time_limit_continuation_across_two_nodes(campaign):
    job = campaign["time_limit"]
    text = completed(job, TIME_LIMIT_VERSIONS)
    assert int(job.done["Restarts"]) >= 1, tail(job.log)
    assert "requeueing job" in text and "restart 1:" in text, tail(job.log)
    assert hostnames(job.out) == ["n1", "n2"]
    assert_complete_log(job.out, TIME_LIMIT_VERSIONS)


def test_node_killed_after_a_checkpoint_resumes_exactly(campaign):
    job = campaign["node_killed"]
    assert job.events and job.events[0].startswith("killed") and job.events[1:] == ["requeued"], \
        f"{job.events}\n{tail(job.log)}"
    text = completed(job, VERSIONS_KILL)
    # the server, whose peers died under it, does not segfault (ofi, the launcher's netmod across nodes, reports
    # them as an MPI error, "OFI poll failed", and MPICH ends the step), and the job log says what is left
    assert "Segmentation fault" not in text and "exit code 139" not in text, tail(job.log)
    assert "checkpoint.h5 (written during this start) is intact" in text, tail(job.log)
    # the killed start's segments, removed once: by the restart, or first by another job's start on the node (a
    # minute-old segment of another job id), whichever came first
    ids = {f"{fnv1a32(f'{job.id}.{step}'):x}" for step in range(10)}
    removed = [(path, node) for other in campaign.values() if isinstance(other, Job)
               for path, node in re.findall(r"removed stale MPI shared memory (\S+) on (\S+)", other.log.read_text())
               if Path(path).name.split("_")[2] in ids]
    assert any(node == "n2" for _, node in removed), tail(job.log)
    assert len(removed) == len(set(removed)), f"a segment was removed twice: {removed}"
    assert "resumed from" in text, tail(job.log)
    assert summary(job.out)["model_sha256"] == campaign["sha_kill"]


def test_starts_that_add_no_version_stop_the_requeues_naming_the_cause(campaign):
    job = campaign["no_progress"]
    assert job.events == ["signalled"], f"{job.events}\n{tail(job.log)}"
    text = job.log.read_text()
    assert job.done.get("Restarts") == "0" and "requeueing job" not in text, tail(job.log)
    assert "1 start in a row added no version" in text and "--signal=USR1@" in text, tail(job.log)
    assert job.done.get("JobState") == "FAILED", tail(job.log)   # exit 1: the job did not do its work


PMI1_READ = 1024   # bytes that SLURM's pmi2 plug-in reads of a PMI-1 command, in one read()


def test_pmi1_commands_fit_slurms_single_read(campaign):
    """Every PMI-1 command of every start (PMI_DEBUG=1 logs each one) is shorter than the 1024 bytes that
    SLURM's pmi2 plug-in reads at once, the restart after the time limit included: the launcher chose ofi,
    whose business card is one short value. ucx's 4096-byte card always takes 9 segments (`segments=9`), each
    up to a 1081-byte line, depending on heap bytes: the starts that failed at random."""
    for name in ("two_nodes", "time_limit"):
        job = campaign[name]
        text = job.log.read_text(errors="replace")
        sent = re.findall(r"send to fd=\d+ pmi: (.*)", text)
        puts = [line for line in sent if line.startswith("cmd=put ")]
        starts = len(re.findall(r"mpi_afl\.slurm: job \d+ restart \d+:", text))
        assert "mpi_afl.slurm: MPIR_CVAR_CH4_NETMOD=ofi" in text, tail(job.log)
        assert starts >= (2 if name == "time_limit" else 1) and len(puts) >= 2 * starts, \
            f"{name}: {starts} starts, {len(puts)} PMI puts (one business card per node and start):\n{tail(job.log)}"
        assert not any("segments=" in line for line in puts), f"{name}: a business card in segments"
        longest = max(sent, key=len)
        assert len(longest) + 1 < PMI1_READ, f"{name}: a {len(longest) + 1}-byte PMI-1 command: {longest[:200]}"
