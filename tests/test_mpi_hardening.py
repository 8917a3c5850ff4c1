"""Nothing hangs, nothing mixes, nothing runs forever (issue 14): damaged and foreign run files, the run
directory lock, non-finite config values, divergence, signals during start-up, a final file that cannot be
written, full tracebacks before MPI_Abort, one-line input errors. Real mpiexec runs where ranks are involved;
the start-up's refusals in process (mpi_helpers.refused_at_start), one of them also launched."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_helpers import HANG_GUARD, FAST, env, launch, ok, refused, refused_at_start, start, summary, wait_until
from mpi_afl.storage.checkpoint import load_checkpoint

ARGS = [*FAST, "--clock", "virtual", "--seed", "4", "--run.eval_every=5"]


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def runs(finished_runs):
    """Two finished runs of different algorithms (5 versions each, tests/runs.py)."""
    return finished_runs("fedbuff").out, finished_runs("fedasync").out


def _copy(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


def test_run_id_in_every_run_file(runs):
    a, b = runs
    run_id = summary(a)["run_id"]
    assert len(run_id) == 32 and run_id != summary(b)["run_id"]
    assert load_checkpoint(a / "checkpoint.h5")["run_id"] == run_id
    from mpi_afl.storage.runlog import read_run
    assert read_run(a / "run.h5")["attrs"]["run_id"] == run_id
    assert not (a / "run.lock").exists()   # released at the end


@pytest.mark.mpi
@pytest.mark.slow
def test_damaged_run_log_header_ends_resume_within_seconds(runs, tmp_path):
    """It used to hang forever: the SWMR open retried the bad metadata checksum without end. Under mpiexec: the
    launched run's refusal of a resume (the other resume refusals are checked in process)."""
    run = _copy(runs[0], tmp_path)
    data = bytearray((run / "run.h5").read_bytes())
    for i in range(100, 108):
        data[i] ^= 0x5A
    (run / "run.h5").write_bytes(bytes(data))
    before = _snapshot(run)
    proc = launch(3, ["--resume", str(run), "--max-versions", "10"])   # a hang meets the guard
    refused(proc, str(run / "run.h5"), "damaged", "--new-log")
    assert _snapshot(run) == before
    # The way out the message names: a fresh log from the checkpoint; the damaged one is kept aside.
    ok(launch(3, ["--resume", str(run), "--max-versions", "10", "--new-log"]))
    assert summary(run)["versions"] == 10
    assert len(list(run.glob("run.h5.replaced-*"))) == 1


def test_foreign_checkpoint_is_refused_and_nothing_changes(runs, tmp_path, capsys):
    run = _copy(runs[0], tmp_path)
    shutil.copy(runs[1] / "checkpoint.h5", run / "checkpoint.h5")   # another run's (another algorithm)
    before = _snapshot(run)
    refused_at_start(["--resume", str(run), "--max-versions", "10"], capsys, "belongs to run", "two runs")
    assert _snapshot(run) == before


@pytest.mark.parametrize("damage", ["missing", "empty", "foreign", "truncated_file", "flipped_rows", "truncated_rows"])
def test_bad_run_log_on_resume_is_a_one_line_error(runs, tmp_path, capsys, damage):
    run = _copy(runs[0], tmp_path)
    log = run / "run.h5"
    if damage == "missing":
        log.unlink()
    elif damage == "empty":
        log.write_bytes(b"")
    elif damage == "foreign":
        shutil.copy(runs[1] / "run.h5", log)
    elif damage == "truncated_file":   # it used to resume with exit 0 and zero-filled rows
        log.write_bytes(log.read_bytes()[: log.stat().st_size // 2])
    elif damage == "flipped_rows":     # they used to be carried into the resumed log silently
        import h5py
        with h5py.File(log, "r") as f:
            offset = f["arrivals"].id.get_chunk_info(0).byte_offset
        data = bytearray(log.read_bytes())
        for i in range(offset + 8, offset + 16):
            data[i] ^= 0x5A
        log.write_bytes(bytes(data))
    else:   # a log with fewer rows than the checkpoint counts: another run's log truncated by hand
        import h5py
        with h5py.File(log, "r+") as f:
            f["arrivals"].resize((2,))
    before = _snapshot(run)
    words = {"missing": ["run.h5 is missing"], "empty": ["run.h5", "not a readable HDF5 file"],
             "foreign": ["run.h5 belongs to run"], "truncated_file": ["run.h5", "truncated"],
             "flipped_rows": ["run.h5 is damaged"], "truncated_rows": ["has 2 rows but the checkpoint counts"]}
    refused_at_start(["--resume", str(run), "--max-versions", "10"], capsys, *words[damage], "--new-log")
    assert _snapshot(run) == before


def test_resume_into_another_out_is_refused(runs, tmp_path, capsys):
    refused_at_start(["--resume", str(runs[0]), "--out", str(tmp_path / "elsewhere")], capsys, "--resume",
                     "cannot differ")
    assert not (tmp_path / "elsewhere").exists()


def test_infinite_learning_rate_is_refused_at_start(tmp_path, capsys):
    """It used to make every update non-finite and run forever (other values: test_run_dir.py)."""
    refused_at_start([*ARGS, "--client.lr=inf", "--out", str(tmp_path / "x")], capsys, "client.lr",
                     "not a finite number")
    assert not (tmp_path / "x").exists()


@pytest.mark.mpi
@pytest.mark.slow
def test_second_run_on_the_same_out_is_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "busy"
    first = start(3, [*ARGS, "--max-versions", "100000", "--run.checkpoint_every=2", "--out", str(out)])
    try:
        assert wait_until((out / "checkpoint.h5").exists), "no checkpoint within 120 s"
        assert (out / "run.lock").exists()
        commands = (out / "command.txt").read_text()
        clients = (out / "clients.txt").read_bytes()
        for extra in ([], ["--run.overwrite=true"]):
            refused_at_start([*ARGS, "--max-versions", "5", "--out", str(out), *extra], capsys,
                             "in use by another run", "run.lock")
        refused_at_start(["--resume", str(out)], capsys, "in use by another run")
        assert (out / "command.txt").read_text() == commands and (out / "clients.txt").read_bytes() == clients
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=HANG_GUARD)
    finally:
        first.kill()
    assert first.returncode == 0, (stdout, stderr)
    assert not (out / "run.lock").exists()
    # A lock left by a process that died on this host is stale: the resume takes it over.
    (out / "run.lock").write_text('{"host": "%s", "pid": 999999999, "slurm_job_id": ""}\n' % os.uname().nodename)
    ok(launch(1, ["--resume", str(out), "--max-versions", str(summary(out)["versions"] + 2)]))


@pytest.mark.mpi
@pytest.mark.slow
def test_non_finite_updates_stop_the_run_as_diverged(tmp_path):
    out = tmp_path / "nan"
    proc = launch(3, [*ARGS, "--max-versions", "1000", "--fault.kind=nan_from", "--fault.job=12",
                      "--run.diverged_after=6", "--out", str(out)])
    refused(proc, "diverged", "6 consecutive updates were non-finite", code=3)
    s = summary(out)
    assert s["stop_reason"] == "diverged" and s["updates_rejected"] >= 6
    state = load_checkpoint(out / "checkpoint.h5")
    assert int(state["version"]) == s["versions"] > 0
    assert (out / "model.pt").exists()


@pytest.mark.slow
def test_non_finite_global_model_stops_the_run_at_the_last_finite_version(tmp_path):
    """A finite update so large that the aggregate overflows: the model is never made a version."""
    out = tmp_path / "huge"
    proc = launch(1, [*ARGS, "--algorithm", "fedbuff", "--server.buffer_size=1", "--server.lr=10",
                      "--max-versions", "1000", "--fault.kind=huge", "--fault.job=7", "--out", str(out)])
    refused(proc, "diverged", "global model turned non-finite", code=3)
    s = summary(out)
    assert s["stop_reason"] == "diverged"
    import torch
    state = load_checkpoint(out / "checkpoint.h5")
    assert torch.isfinite(state["global_model"]).all() and int(state["version"]) == s["versions"]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_during_start_up_stops_cleanly(tmp_path, sig):
    """USR1 during the imports used to kill every rank; TERM was ignored and the run went on to the end."""
    out = tmp_path / "early"
    proc = start(3, [*ARGS, "--max-versions", "100000", "--out", str(out)])
    try:
        # rank 0 takes the lock early in its start-up, while the other ranks import torch (seconds)
        assert wait_until((out / "run.lock").exists, interval=0.01), "no run.lock within 120 s"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    finally:
        proc.kill()
    assert proc.returncode == 0, (stdout, stderr)
    assert "during start-up: stopped before any work" in stdout, (stdout, stderr)
    assert not (out / "checkpoint.h5").exists() and not (out / "run.lock").exists()


@pytest.mark.slow
def test_a_final_file_that_cannot_be_written_leaves_the_others_and_says_so(tmp_path):
    """model.pt's name taken by a directory while the run goes on: the checkpoint (written first) and
    summary.json are there, one line names model.pt and why, and --resume continues from the stop."""
    out = tmp_path / "run"
    proc = start(1, [*ARGS, "--max-versions", "100000", "--out", str(out)])
    try:
        assert wait_until(lambda: (out / "server.log").exists() and "version" in (out / "server.log").read_text())
        (out / "model.pt").mkdir()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    finally:
        proc.kill()
    line = refused(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                    "not written: model.pt (Is a directory)", "written: checkpoint.h5, run.h5, summary.json",
                    f"--resume {out} continues from this stop", code=1)
    assert line == stderr.strip().splitlines()[-1]
    stopped = summary(out)["versions"]
    assert int(load_checkpoint(out / "checkpoint.h5")["version"]) == stopped
    (out / "model.pt").rmdir()
    ok(launch(1, ["--resume", str(out), "--max-versions", str(stopped + 5)]))
    assert summary(out)["versions"] == stopped + 5 and (out / "model.pt").is_file()


@pytest.mark.mpi
@pytest.mark.slow
def test_tracebacks_reach_stderr_in_full_before_the_abort(tmp_path):
    """About one abort in ten used to cut the traceback; run several at once, workers and the server failing."""
    cases = [("raise", r"rank [12] \(worker\) failed: RuntimeError: injected fault")] * 2 + \
            [("server_raise", r"rank 0 \(server\) failed: RuntimeError: injected fault")] * 2
    procs = [start(3, [*ARGS, "--max-versions", "200", f"--fault.kind={kind}", "--fault.job=3",
                               "--out", str(tmp_path / f"f{i}")]) for i, (kind, _) in enumerate(cases)]
    for proc, (kind, line) in zip(procs, cases):
        try:
            stdout, stderr = proc.communicate(timeout=HANG_GUARD)
        finally:
            proc.kill()
        assert proc.returncode != 0
        assert "Traceback (most recent call last):" in stderr, (kind, stderr)
        assert "RuntimeError: injected fault" in stderr and re.search(line, stderr), (kind, stderr)


@pytest.mark.mpi
@pytest.mark.slow
def test_garbage_data_file_names_the_file(tmp_path):
    """Under mpiexec: a refusal at one of the start-up's collective points (after the data load), which leaves
    no run directory behind."""
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    sizes = {"train-images-idx3-ubyte": (3, [60000, 28, 28]), "train-labels-idx1-ubyte": (1, [60000]),
             "t10k-images-idx3-ubyte": (3, [10000, 28, 28]), "t10k-labels-idx1-ubyte": (1, [10000])}
    for name, (ndim, dims) in sizes.items():
        header = (0x0800 + ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
        (raw / name).write_bytes(header + b"\0" * 100)   # a truncated download
    proc = launch(2, [*FAST, "--dataset", "fashion-mnist", "--data.root", str(tmp_path / "data"),
                      "--out", str(tmp_path / "out")])
    refused(proc, "train-images-idx3-ubyte", "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_download_without_network_is_a_one_line_error(tmp_path):
    e = {**env(), "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
         "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
         "XDG_CACHE_HOME": str(tmp_path / "cache"), "MPI_AFL_DATA": ""}
    cmd = [sys.executable, "-m", "mpi_afl.train", *FAST, "--dataset", "mnist", "--data.download=true",
           "--data.root", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD, env=e)
    refused(proc, "mnist", "download", "failed")
