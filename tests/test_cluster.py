"""Cluster plumbing without a cluster: the job continuation rules (mpi_afl/slurm.py), the launcher/world
check (mpi_afl/launch.py) and GPU placement (mpi_afl/placement.py). tests/test_slurm_jobs.py runs the
same code under a real SLURM."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpi_afl.launch import world_mismatch
from mpi_afl.placement import _gpu_slot, _ranges, describe
from mpi_afl.slurm import (OTHER_JOB_MIN_AGE, fnv1a32, idle_starts, mapped_files, mpi_library_version,
                            pmi1_line_env, should_requeue, stale_segments, summary_stamp, trainer_args)
from mpi_helpers import HANG_GUARD


def test_segment_names_follow_mpich():
    # Seen under srun --mpi=pmi2: PMI_JOBID "2.0" -> /dev/shm/mpich_shm_281e0ec3_0
    assert f"{fnv1a32('2.0'):x}" == "281e0ec3"


def test_stale_segments_are_this_jobs_and_old_ones_of_other_jobs(tmp_path):
    mine = [f"mpich_shm_{fnv1a32('42.0'):x}_0", f"mpich_vci_{fnv1a32('42.1'):x}_0", f"mpich_shm_{fnv1a32('42.3'):x}_1"]
    old = [f"mpich_shm_{fnv1a32('43.0'):x}_0", "mpich_vci_1712_0"]
    young = [f"mpich_shm_{fnv1a32('420.0'):x}_0"]   # another job's, maybe being set up right now
    others = ["other_file", f"mpich_foo_{fnv1a32('42.0'):x}_0"]
    now = time.time()
    for name in mine + old + young + others:
        (tmp_path / name).write_bytes(b"")
        age = 0 if name in mine + young else OTHER_JOB_MIN_AGE + 1
        os.utime(tmp_path / name, (now - age, now - age))
    assert sorted(p.name for p in stale_segments("42", tmp_path, mapped=set(), now=now)) == sorted(mine + old)
    # a segment that a live process maps is never stale, whatever its name says
    st = (tmp_path / mine[0]).stat()
    assert mine[0] not in [p.name for p in stale_segments("42", tmp_path, mapped={(st.st_dev, st.st_ino)}, now=now)]


def test_a_mapped_segment_is_seen_in_proc_maps():
    import mmap
    path = Path("/dev/shm") / f"mpich_shm_test{os.getpid()}_0"
    try:
        path.write_bytes(b"\0" * 4096)
        st = path.stat()
        assert (st.st_dev, st.st_ino) not in mapped_files()
        with path.open("r+b") as f, mmap.mmap(f.fileno(), 4096) as view:
            assert view[0] == 0 and (st.st_dev, st.st_ino) in mapped_files()
    finally:
        path.unlink(missing_ok=True)


def test_starts_without_progress_are_counted(tmp_path):
    out = tmp_path / "run"
    assert [idle_starts(out, 0, False) for _ in range(2)] == [1, 2]   # no summary at all: signalled at start-up
    (out / "summary.json").write_text(json.dumps({"versions": 7}))
    assert idle_starts(out, 0, True) == 0                              # a start that added versions
    assert idle_starts(out, 7, True) == 1                              # a fresh summary but no new version


def test_trainer_args_resume_restart_or_start(tmp_path, capsys):
    out = tmp_path / "run"
    assert trainer_args(out, restarts=0) == ["--out", str(out)]
    out.mkdir()
    (out / "run.h5").write_bytes(b"")
    # first start into an existing run: no overwrite, the trainer refuses to clobber it
    assert trainer_args(out, restarts=0) == ["--out", str(out)]
    # a restart of this job that never reached a checkpoint starts over in its own directory
    assert trainer_args(out, restarts=2) == ["--out", str(out), "--run.overwrite=true"]
    assert "starting the run over" in capsys.readouterr().out
    (out / "checkpoint.h5").write_bytes(b"")
    assert trainer_args(out, restarts=0) == ["--resume", str(out)]
    assert trainer_args(out, restarts=3) == ["--resume", str(out)]


def test_requeue_only_while_the_run_stopped_on_a_signal(tmp_path):
    def write(reason: str) -> None:
        (tmp_path / "summary.json").write_text(json.dumps({"stop_reason": reason, "pad": reason * 3}))

    assert should_requeue(tmp_path, 0, None)[0]              # exit 0 without a summary: signalled at start-up
    write("signal")
    assert should_requeue(tmp_path, 0, None)[0]
    assert not should_requeue(tmp_path, 1, None)[0]          # a failure would only fail again
    assert not should_requeue(tmp_path, 137, None)[0]
    assert should_requeue(tmp_path, 138, None)[0]            # SIGUSR1 killed the ranks before Python handled it
    write("max_versions")
    requeue, why = should_requeue(tmp_path, 0, None)
    assert not requeue and "max_versions" in why
    # USR1 that killed the ranks while Python exited, after the run met its stop rule: done
    assert not should_requeue(tmp_path, 138, None)[0]
    # the same summary as before the step (an earlier segment's) says nothing about this one
    assert should_requeue(tmp_path, 0, summary_stamp(tmp_path))[0]


WHEEL = "MPICH Version:      5.0.2\nMPICH Device:       ch4:ucx ofi\nMPICH configure:    --with-device=ch4:ucx,ofi\n"


def test_several_nodes_through_pmi2_get_mpichs_ofi_netmod():
    ofi = {"MPIR_CVAR_CH4_NETMOD": "ofi"}
    assert pmi1_line_env("pmi2", 2, {}, WHEEL)[0] == ofi
    # one node exchanges no business card over PMI; pmix and other MPIs are another path
    for args in (("pmi2", 1, {}, WHEEL), ("pmix", 4, {}, WHEEL), ("pmi2", 4, {}, "Open MPI v4.1.5, ...")):
        assert pmi1_line_env(*args) == ({}, "")
    # the user's netmod, or PMI-2 (its commands carry their length), stays as it is
    assert pmi1_line_env("pmi2", 2, {"MPIR_CVAR_CH4_NETMOD": "ucx"}, WHEEL) == ({}, "")
    assert pmi1_line_env("pmi2", 2, {"MPIR_CVAR_PMI_VERSION": "2"}, WHEEL) == ({}, "")
    extra, why = pmi1_line_env("pmi2", 2, {}, WHEEL.replace("ch4:ucx ofi", "ch4:ucx"))
    assert extra == {} and why.startswith("warning:") and "MPIR_CVAR_PMI_VERSION=2" in why
    # the library the trainer loads, read without initialising MPI
    assert mpi_library_version().strip()


@pytest.mark.parametrize("env, first", [
    ({"SLURM_STEP_NUM_TASKS": "17", "SLURM_PROCID": "0"}, True),
    ({"SLURM_STEP_NUM_TASKS": "17", "SLURM_PROCID": "5"}, False),
    ({"PMI_SIZE": "4", "PMI_RANK": "0"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, False),
])
def test_world_of_one_under_a_multi_task_launch_is_named(env, first):
    message, is_first = world_mismatch(1, "MPICH Version:   5.0.2", env)
    assert is_first == first
    assert "world of 1" in message and "MPICH Version: 5.0.2" in message
    assert ("--mpi=pmi2" in message) == ("SLURM_STEP_NUM_TASKS" in env)


def test_matching_or_single_launches_pass():
    assert world_mismatch(1, "x", {}) is None
    assert world_mismatch(1, "x", {"SLURM_NTASKS": "17"}) is None        # a batch script running one process
    assert world_mismatch(1, "x", {"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "1"}) is None
    assert world_mismatch(17, "x", {"SLURM_STEP_NUM_TASKS": "17", "PMI_SIZE": "17"}) is None


@pytest.mark.slow
def test_trainer_refuses_a_world_of_one_from_a_multi_task_launcher(tmp_path):
    """End to end without SLURM: Open MPI's variable says 2 tasks, the MPICH singleton sees 1."""
    env = dict(os.environ, OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0")
    out = subprocess.run([sys.executable, "-m", "mpi_afl.train", "--dataset", "digits", "--out", str(tmp_path / "r")],
                         env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert out.returncode == 2, out.stderr
    assert "started 2 tasks (OMPI_COMM_WORLD_SIZE=2)" in out.stderr and "world of 1" in out.stderr
    assert not (tmp_path / "r").exists()


def test_server_gpu_placement_keeps_cuda0_for_rank0():
    # 4 GPUs, 17 ranks on the server's node: rank 0 alone on cuda:0, 16 workers over cuda:1-3
    slots = [_gpu_slot(r, 4, [0], "server_gpu") for r in range(17)]
    assert slots[0] == 0 and 0 not in slots[1:] and set(slots[1:]) == {1, 2, 3}
    # other nodes, one GPU, or the shared default: local rank modulo GPUs
    assert [_gpu_slot(r, 4, [], "server_gpu") for r in range(5)] == [0, 1, 2, 3, 0]
    assert [_gpu_slot(r, 1, [0], "server_gpu") for r in range(3)] == [0, 0, 0]
    assert [_gpu_slot(r, 4, [0], "shared") for r in range(5)] == [0, 1, 2, 3, 0]
    # distill.ranks = 2: the server and its two distilling ranks get cuda:0-2 alone, the workers share 3-7
    slots = [_gpu_slot(r, 8, [0, 1, 2], "server_gpu") for r in range(17)]
    assert slots[:3] == [0, 1, 2] and set(slots[3:]) == {3, 4, 5, 6, 7}
    # more distilling ranks than GPUs: every rank takes local rank % GPUs
    assert [_gpu_slot(r, 2, [0, 1, 2], "server_gpu") for r in range(4)] == [0, 1, 0, 1]


def test_placement_description():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    records = [{"rank": r, "host": "n1", "device": f"cuda:{min(r, 1)}", "gpu_name": "H100"} for r in range(4)]
    assert describe(records) == "n1 cuda:0 (H100): rank(s) 0; n1 cuda:1 (H100): rank(s) 1-3"


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU case")
def test_cuda_without_a_gpu_stops_every_rank_naming_them(tmp_path):
    from mpi_helpers import launch
    out = launch(2, ["--dataset", "digits", "--run.device=cuda", "--out", str(tmp_path / "r")])
    assert out.returncode == 2, out.stderr
    assert "2 of 2 rank(s) see no GPU (rank 0 on" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r" / "run.h5").exists()


def test_a_fault_inside_a_guarded_mpi_call_exits_11_and_elsewhere_still_crashes():
    """peer_loss.guard(): what a send to a dead peer does under MPICH's ch4:ucx (a segmentation fault) ends the
    process with exit code 11 instead; outside the guard (and after it) a fault is a fault."""
    from mpi_afl.transport.peer_loss import EXIT_PEER_LOST, _STATE
    if _STATE is None:
        pytest.skip("no guard on this platform (needs glibc on x86_64 or aarch64)")
    code = ("import ctypes, faulthandler, sys\n"
            "from mpi_afl.transport.peer_loss import guard\n"
            "faulthandler.enable()\n"
            "with guard():\n"
            "    with guard(): pass\n"
            "    if sys.argv[1] == 'inside': ctypes.string_at(0)\n"
            "ctypes.string_at(0)\n")
    inside = subprocess.run([sys.executable, "-c", code, "inside"], capture_output=True, text=True, timeout=HANG_GUARD)
    after = subprocess.run([sys.executable, "-c", code, "after"], capture_output=True, text=True, timeout=HANG_GUARD)
    assert (inside.returncode, inside.stderr) == (EXIT_PEER_LOST, "")
    assert after.returncode == -11 and "Segmentation fault" in after.stderr   # faulthandler's report is back
