"""What a user sees when a run meets a fault: a full disk or a read-only directory at the end, two Ctrl-C,
bad values, odd paths, files in the way, leftovers of a killed run. Each ends with a clear outcome: exit 1
or 2 with one line naming what was not written or which key is wrong, and a directory that the messages
agree on how to continue. Refusals are checked in process (mpi_helpers.refused_at_start, the start-up's
checks); what involves the file system, signals or MPI runs for real (a small tmpfs for the full disk,
`mpiexec`)."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mpi_afl.config import from_dict, parse_args
from mpi_afl.run.build import check_split_sizes
from mpi_afl.storage.checkpoint import load_checkpoint
from mpi_helpers import FAST, HANG_GUARD, command, env, launch, refused, refused_at_start, start, summary, wait_until

ARGS = [*FAST, "--clock", "virtual", "--seed", "4", "--run.eval_every=5"]


# ------------------------------------------------------------------ refused before anything is written
@pytest.mark.parametrize("seed", ["-1", str(2 ** 64)])
def test_seed_out_of_range_is_refused_and_nothing_is_written(tmp_path, capsys, seed):
    out = tmp_path / "run"
    assert "config key 'run.seed'" in refused_at_start(["--seed", seed, "--out", str(out)], capsys)
    assert not out.exists()


def test_largest_seed_is_accepted():
    cfg, _ = parse_args(["--seed", str(2 ** 63 - 1)])
    assert cfg.run.seed == 2 ** 63 - 1


def test_wall_scale_beyond_its_range_is_refused(tmp_path, capsys):
    line = refused_at_start(["--delays.wall_scale=1e308", "--out", str(tmp_path / "r")], capsys)
    assert "config key 'delays.wall_scale'" in line and "<= 10000" in line


def test_non_utf8_out_is_refused_with_one_line(tmp_path, capsys):
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run-\xff")   # as argv gives undecodable bytes
    line = refused_at_start(["--out", bad], capsys)
    assert "config key 'run.out'" in line and "UTF-8" in line
    assert os.listdir(tmp_path) == []


def test_out_naming_a_file_says_so(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("mine")
    assert f"{path} is a file, not a directory" in refused_at_start(["--out", str(path)], capsys)
    assert path.read_text() == "mine"


@pytest.mark.parametrize("name", ["model.pt", "command.txt", "server.log"])
def test_run_file_name_taken_by_a_directory_is_refused_at_the_start(tmp_path, capsys, name):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    line = refused_at_start(["--out", str(out), "--run.overwrite=true"], capsys)
    assert f"{out / name} is a directory" in line
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_key_given_twice_takes_the_last_value_as_help_says(capsys):
    cfg, _ = parse_args(["--client.lr=0.1", "--client.lr=0.2"])
    assert cfg.client.lr == 0.2
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "more than once takes its last value" in " ".join(capsys.readouterr().out.split())


def test_split_size_checks_name_the_keys():
    cfg = from_dict({})
    cfg.data.num_clients = 2000
    with pytest.raises(ValueError, match="'data.num_clients': 2,000 clients"):
        check_split_sizes(cfg, 1259)
    cfg.data.num_clients, cfg.data.samples_per_client = 20, 5000
    with pytest.raises(ValueError, match="'data.samples_per_client': 5,000 is more than"):
        check_split_sizes(cfg, 1259)
    cfg.data.samples_per_client = 350
    check_split_sizes(cfg, 1259)


@pytest.mark.slow
def test_too_many_clients_is_exit_2_and_leaves_no_directory(tmp_path):
    out = tmp_path / "run"
    proc = launch(1, ["--data.num_clients=5000", "--server.concurrency=4", "--out", str(out)])
    refused(proc, "data.num_clients", "1,259 samples")
    assert not out.exists()


# ------------------------------------------------------------------ a run that stopped before any checkpoint
@pytest.mark.slow
def test_no_checkpoint_messages_agree_on_the_way_out(tmp_path, capsys):
    """A run killed before its first checkpoint (two Ctrl-C): --resume and a fresh start say the same thing,
    and the way they name works."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"stop_reason": "signal", "run_id": "x"}))
    (out / ".model.pt.123.abcd1234.tmp").write_bytes(b"half")
    resume = refused_at_start(["--resume", str(out)], capsys)
    fresh = refused_at_start(["--out", str(out)], capsys)
    assert "no checkpoint.h5" in resume and "--run.overwrite=true" in resume and "--resume" not in resume
    assert fresh.removeprefix("mpi_afl: error: ") in resume
    proc = launch(1, [*ARGS, "--max-versions", "5", "--out", str(out), "--run.overwrite=true"])
    assert proc.returncode == 0, proc.stderr
    assert "removed .model.pt.123.abcd1234.tmp" in proc.stdout
    assert not list(out.glob(".*.tmp")) and summary(out)["versions"] == 5


@pytest.mark.slow
def test_resume_removes_what_a_killed_run_left_mid_write(tmp_path, finished_runs):
    out = tmp_path / "run"
    shutil.copytree(finished_runs("fedbuff").out, out)   # 5 versions of FedBuff on ARGS
    for name in (".checkpoint.h5.99.0badf00d.tmp", ".model.pt.99.0badf00d.tmp", ".summary.json.99.00.tmp"):
        (out / name).write_bytes(b"partial")
    proc = launch(1, ["--resume", str(out), "--max-versions", "10"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("left by a run stopped while writing it") == 3
    assert not list(out.glob(".*.tmp")) and summary(out)["versions"] == 10


@pytest.mark.mpi
@pytest.mark.slow
def test_double_ctrl_c_under_mpiexec_leaves_a_directory_the_messages_agree_on(tmp_path, capsys):
    """Two SIGINT 0.3 s apart to mpiexec: hydra kills every rank after the second. The checkpoint is the
    first thing written after a stop, so the run can usually be continued; when it could not be written in
    time, --resume and a fresh start name the same way out, and it works."""
    out = tmp_path / "run"
    proc = start(3, [*ARGS, "--max-versions", "100000", "--out", str(out)])
    try:
        assert wait_until(lambda: (out / "server.log").exists() and "version" in (out / "server.log").read_text())
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=HANG_GUARD)
    finally:
        proc.kill()
    # hydra's kill leaves no time for the lock's removal: the next start takes the stale lock over.
    if (out / "checkpoint.h5").exists():
        stopped = int(load_checkpoint(out / "checkpoint.h5")["version"])
        resumed = launch(3, ["--resume", str(out), "--max-versions", str(stopped + 5)])
        assert resumed.returncode == 0, resumed.stderr
        assert summary(out)["versions"] == stopped + 5
    else:
        for argv in (["--resume", str(out)], [*ARGS, "--out", str(out)]):
            refused_at_start(argv, capsys, "no checkpoint.h5", "--run.overwrite=true")
        assert launch(1, [*ARGS, "--max-versions", "5", "--out", str(out), "--run.overwrite=true"]).returncode == 0
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------ the final writes on a full or read-only disk
@contextlib.contextmanager
def small_file_system(path: Path, size: str = "32m"):
    """A real tmpfs of `size` at `path` (root only: the test skips, saying so, where mounting is refused)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full disk: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the file system's free space."""
    filler = directory / "filler"
    with open(filler, "wb") as fh:
        for _ in range(20):   # the run writes meanwhile: measure again when the space went between the two calls
            st = os.statvfs(directory)
            try:
                os.posix_fallocate(fh.fileno(), os.fstat(fh.fileno()).st_size,
                                   max(st.f_bavail * st.f_frsize - leave, 1))
                return filler
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    raise AssertionError(f"could not fill {directory} to within {leave} bytes")


def _running(out: Path) -> bool:
    return (out / "server.log").exists() and "version" in (out / "server.log").read_text()


@pytest.mark.slow
def test_full_disk_at_the_final_writes_is_exit_1_with_one_line(tmp_path, capsys):
    """Disk full when the run stops: the checkpoint (~1 MB) and model.pt (~0.2 MB) do not fit, summary.json
    does. One line names both and why, no traceback, no segfault (HDF5 meeting a full disk half-way used to
    crash the process at exit); --resume and a fresh start then agree on the way out."""
    with small_file_system(tmp_path / "fs") as fs:
        out = fs / "run"
        proc = start(1, [*ARGS, "--max-versions", "100000", "--out", str(out)])
        try:
            assert wait_until(lambda: _running(out))
            filler = fill(fs, leave=100_000)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=HANG_GUARD)
        finally:
            proc.kill()
        proc.stdout, proc.stderr = stdout, stderr
        line = refused(proc, "not written: checkpoint.h5 (No space left on device)",
                       "model.pt (No space left on device)", "no checkpoint.h5", code=1)
        # run.h5's last rows may or may not have fitted, depending on where the filler struck
        assert "summary.json" in line.split("; written: ")[1].split(";")[0], line
        assert line == stderr.strip().splitlines()[-1]
        assert summary(out)["stop_reason"] == "signal" and not (out / "checkpoint.h5").exists()
        assert not list(out.glob(".*.tmp"))
        filler.unlink()
        refused_at_start(["--resume", str(out)], capsys, "no checkpoint.h5", "--run.overwrite=true")


@pytest.mark.slow
def test_periodic_checkpoint_on_a_full_disk_warns_and_the_run_goes_on(tmp_path):
    with small_file_system(tmp_path / "fs") as fs:
        out = fs / "run"
        proc = start(1, [*ARGS, "--max-versions", "100000", "--run.checkpoint_every=5", "--out", str(out)])
        try:
            assert wait_until(lambda: (out / "checkpoint.h5").exists())
            filler = fill(fs, leave=100_000)
            assert wait_until(lambda: "was not written" in (out / "server.log").read_text())
            filler.unlink()
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=HANG_GUARD)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr
        assert "the run goes on; checkpoint.h5 kept: version" in stdout
        assert int(summary(out)["versions"]) > 5 and (out / "model.pt").exists()
        assert launch(1, ["--resume", str(out), "--max-versions", str(summary(out)["versions"] + 5)]).returncode == 0


@pytest.mark.slow
def test_directory_made_unwritable_mid_run_names_the_files_not_written(tmp_path):
    """The run (as an unprivileged user, so that permissions apply) loses write access to its directory:
    its open files still take rows, new files cannot be made. The last line names what was not written."""
    outside = Path(tempfile.mkdtemp(prefix="mpi_afl-unwritable-"))   # pytest's tmp_path is private to root
    os.chmod(outside, 0o755)
    with small_file_system(outside / "fs") as fs:
        out = fs / "run"
        out.mkdir()
        os.chmod(out, 0o777)
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = subprocess.Popen([*user, *command(1, [*ARGS, "--max-versions", "100000", "--out", str(out)])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=fs)
        try:
            assert wait_until(lambda: _running(out) or proc.poll() is not None)
            if proc.poll() is not None:
                pytest.skip(f"cannot run the trainer as an unprivileged user here: {proc.stderr.read()[-300:]}")
            os.chmod(out, 0o555)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=HANG_GUARD)
        finally:
            proc.kill()
        proc.stdout, proc.stderr = stdout, stderr
        line = refused(proc, "checkpoint.h5 (Permission denied)", "summary.json (Permission denied)",
                       "model.pt (Permission denied)", code=1)
        assert line == stderr.strip().splitlines()[-1]
        assert "could not remove" in stdout and "run.lock" in stdout   # a warning, not the last word
    shutil.rmtree(outside, ignore_errors=True)


@pytest.mark.slow
def test_a_distilling_run_that_ends_before_its_gates_says_so(tmp_path, finished_runs):
    proc = launch(1, [*ARGS, "--algorithm", "fedrevive", "--max-versions", "5", "--out", str(tmp_path / "r")])
    assert proc.returncode == 0, proc.stderr
    assert "fedrevive never applied its distillation: the run ended at version 5" in proc.stdout
    quiet = finished_runs("fedbuff").proc   # 5 versions of FedBuff on ARGS
    assert "[server] done" in quiet.stdout and "never applied" not in quiet.stdout


@pytest.mark.slow
def test_update_budget_gives_methods_of_any_buffer_size_equal_work(tmp_path):
    """run.max_updates: FedBuff (B = 4) and AFL-DW (B = 1) stop at the same number of accepted updates."""
    for algorithm in ("fedbuff", "afl_dw"):
        out = tmp_path / algorithm
        proc = launch(1, [*ARGS, "--algorithm", algorithm, "--max-versions", "0", "--run.max_updates=24",
                          "--out", str(out)])
        assert proc.returncode == 0, proc.stderr
        s = summary(out)
        assert (s["stop_reason"], s["updates_accepted"]) == ("max_updates", 24)
        assert s["versions"] == (6 if algorithm == "fedbuff" else 24)
