"""The run directory's lock and identity checks, stop-signal recording and finite config values, in-process
(the end-to-end cases run under mpiexec in test_mpi_hardening.py)."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from mpi_afl import signals
from mpi_afl.config import ConfigError, parse_args
from mpi_afl.storage.lock import LOCK_FILE, LockError, RunLock
from mpi_afl.storage.rundir import RunDirError, check_resume, set_aside_log
from mpi_afl.storage.runlog import RunLog
from mpi_helpers import HANG_GUARD

COUNTS = {"arrivals": 0, "evals": 0, "timings": 0, "kd_checks": 0}


def _lock_file(directory, **holder):
    (directory / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                   "slurm_job_id": "", **holder}) + "\n")


def test_lock_is_exclusive_and_released(tmp_path):
    lock = RunLock(tmp_path)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(LockError, match=f"in use by another run \\(process {os.getpid()} on host"):
        RunLock(tmp_path)
    lock.release()
    lock.release()   # twice is fine
    assert os.listdir(tmp_path) == []
    RunLock(tmp_path).release()


def test_stale_locks_are_taken_over_others_refused(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    _lock_file(tmp_path, pid=int(dead))              # its process is gone, on this host
    RunLock(tmp_path).release()
    _lock_file(tmp_path, host="elsewhere", pid=1)     # another host: cannot tell, refuse and say what to do
    with pytest.raises(LockError, match=f"delete {tmp_path / LOCK_FILE}"):
        RunLock(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    _lock_file(tmp_path, host="elsewhere", pid=1, slurm_job_id="77")   # our own job, requeued on another node
    RunLock(tmp_path).release()
    (tmp_path / LOCK_FILE).write_text("garbage")
    with pytest.raises(LockError, match="unreadable lock"):
        RunLock(tmp_path)


def _run_dir(tmp_path, run_id="r1"):
    RunLog(tmp_path / "run.h5", {"run_id": run_id}).close()
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": run_id}))
    return {"run_id": run_id, "log_counts": dict(COUNTS)}


def test_resume_checks_that_the_files_are_one_runs(tmp_path):
    state = _run_dir(tmp_path)
    assert check_resume(tmp_path, state, new_log=False) == "r1"
    with pytest.raises(RunDirError, match="summary.json belongs to run 'r1' but .*checkpoint.h5 to run 'r2'"):
        check_resume(tmp_path, {**state, "run_id": "r2"}, new_log=False)
    with pytest.raises(RunDirError, match="has no run id"):
        check_resume(tmp_path, {"log_counts": COUNTS}, new_log=False)
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": "r2"}))
    with pytest.raises(RunDirError, match="run.h5 belongs to run 'r1', but the checkpoint to run 'r2'.*--new-log"):
        check_resume(tmp_path, {**state, "run_id": "r2"}, new_log=False)
    assert check_resume(tmp_path, {**state, "run_id": "r2"}, new_log=True) == "r2"   # the log is replaced
    aside = set_aside_log(tmp_path)
    assert aside.name.startswith("run.h5.replaced-") and not (tmp_path / "run.h5").exists()
    with pytest.raises(RunDirError, match="run.h5 is missing.*--new-log"):
        check_resume(tmp_path, {**state, "run_id": "r2"}, new_log=False)
    (tmp_path / "summary.json").write_text("{trunc")
    with pytest.raises(RunDirError, match="summary.json is unreadable"):
        check_resume(tmp_path, state, new_log=True)


def test_signals_are_recorded_and_reach_a_late_callback():
    old = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    try:
        signals.arm()
        os.kill(os.getpid(), signal.SIGUSR1)   # USR1's default action would end this process
        assert signals.received() == signal.SIGUSR1
        seen = []
        signals.on_stop(seen.append)           # came before the callback: delivered at once
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGUSR1, signal.SIGTERM]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signals._received, signals._callback = None, None


@pytest.mark.parametrize("override", ["--server.lr=nan", "--delays.train_means=1,inf", "--client.lr=1e30",
                                      "--server.staleness_b=-inf"])
def test_non_finite_and_absurd_floats_are_config_errors(override):
    with pytest.raises(ConfigError, match=override.split("=")[0][2:]):
        parse_args([override])


def test_resume_into_another_out_and_new_log_without_resume_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--new-log only applies with --resume"):
        parse_args(["--new-log"])
    with pytest.raises(ConfigError, match="cannot differ"):
        parse_args(["--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")], lambda d: {})
    cfg, _ = parse_args(["--resume", str(tmp_path / "a"), "--out", str(tmp_path / "a")], lambda d: {})
    assert cfg.run.out == str(tmp_path / "a")


def test_stop_signals_are_ignored_once_the_process_exits():
    """Python's finalisation restores the default action (terminate) for signals with Python handlers; armed
    signals are set to ignored at exit, so a late USR1 cannot kill a rank that finished cleanly."""
    code = ("import atexit, signal, sys\n"
            "atexit.register(lambda: print(signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN))\n"  # runs last
            "from mpi_afl import signals\n"
            "signals.arm()\n"
            "assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_IGN\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD)
    assert out.returncode == 0 and out.stdout.strip() == "True", out
