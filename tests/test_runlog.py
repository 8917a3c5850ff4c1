"""Run log: rows round-trip, live SWMR readers in another process, resume truncation, bad rows."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpi_afl.storage.runlog import RunLog, RunLogError, read_run
from mpi_afl.storage.runlog.reader import check_resumable
from mpi_afl.storage.runlog.schema import ARRIVAL_FIELDS, EVAL_FIELDS, PHASES, REJECT_REASONS, TIMING_FIELDS
from mpi_helpers import HANG_GUARD, REPO
REJECTED = next(name for name in REJECT_REASONS if name != "none")
ATTRS = {"config": {"server": {"algorithm": "fedbuff"}, "run": {"seed": 3}}, "world_size": 4, "label": "x"}


def arrival_row(i: int, accepted: bool = True) -> dict:
    return dict(wall_time=0.5 * i, virtual_time=2.0 * i, client=i % 5, rank=1 + i % 3, job=i, base_version=i,
                version=i + 1, staleness=i % 4, weight=1.0 / (i + 1), loss=0.1 * i, samples=350, bytes=1000 + i,
                server_seconds=1e-3, compute_seconds=0.01, accepted=accepted, reason="none" if accepted else REJECTED)


def eval_row(v: int) -> dict:
    return dict(version=v, wall_time=1.0 * v, virtual_time=3.0 * v, test_loss=1.0 / (v + 1),
                test_accuracy=0.1 * v, val_loss=np.nan, val_accuracy=np.nan)


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (a separate process, as a live reader would be)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_rows_round_trip(tmp_path):
    path = tmp_path / "run.h5"
    with RunLog(path, ATTRS) as log:
        for i in range(7):
            log.arrival(**arrival_row(i, accepted=i != 3))
        log.eval(**eval_row(0))
        log.eval(**eval_row(5))
        log.timing(version=1, wall_time=0.25, phase="distill", seconds=0.125)
        assert log.counts() == {"arrivals": 7, "evals": 2, "timings": 1, "kd_checks": 0}
    (tmp_path / "plain").write_text("x")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # group can read it if umask allows
    run = read_run(path)
    assert json.loads(run["attrs"]["config"]) == ATTRS["config"]
    assert run["attrs"]["world_size"] == 4 and run["attrs"]["label"] == "x"
    assert set(run["arrivals"]) == {name for name, _ in ARRIVAL_FIELDS}
    assert set(run["evals"]) == {name for name, _ in EVAL_FIELDS}
    assert set(run["timings"]) == {name for name, _ in TIMING_FIELDS}
    a = run["arrivals"]
    assert a["job"].tolist() == list(range(7))
    assert a["accepted"].dtype == bool and a["accepted"].tolist() == [True] * 3 + [False] + [True] * 3
    assert a["reason"].tolist() == [0, 0, 0, REJECT_REASONS[REJECTED], 0, 0, 0]
    assert np.allclose(a["weight"], [1.0 / (i + 1) for i in range(7)])
    assert a["bytes"].tolist() == [1000 + i for i in range(7)]
    e = run["evals"]
    assert e["version"].tolist() == [0, 5] and np.allclose(e["test_accuracy"], [0.0, 0.5])
    assert np.isnan(e["val_loss"]).all()
    t = run["timings"]
    assert t["phase"].tolist() == [PHASES["distill"]] and t["seconds"].tolist() == [0.125]
    with h5py.File(path, "r") as f:  # code tables travel with the file
        assert json.loads(f["arrivals"].attrs["reason_codes"]) == REJECT_REASONS


def test_live_reader_in_another_process_sees_flushed_rows(tmp_path):
    path = tmp_path / "live.h5"
    reader = f"""
        import h5py
        from mpi_afl.storage.runlog import read_run
        with h5py.File({str(path)!r}, "r", swmr=True) as f:
            print(f["arrivals"].shape[0], f["evals"].shape[0], f["arrivals"]["job"][-1:].tolist())
        print(len(read_run({str(path)!r})["arrivals"]["job"]))
    """
    log = RunLog(path, ATTRS, flush_seconds=3600)
    for i in range(5):
        log.arrival(**arrival_row(i))
    log.eval(**eval_row(1))
    log.maybe_flush()  # interval not reached: rows stay in memory
    assert run_python(reader).split("\n")[0] == "0 0 []"
    log.flush()
    assert run_python(reader).split("\n")[:2] == ["5 1 [4]", "5"]
    for i in range(5, 12):
        log.arrival(**arrival_row(i))
    log.flush()
    assert run_python(reader).split("\n")[:2] == ["12 1 [11]", "12"]
    log.close()


def test_maybe_flush_after_interval(tmp_path):
    path = tmp_path / "run.h5"
    log = RunLog(path, ATTRS, flush_seconds=0.0)
    log.arrival(**arrival_row(0))
    log.maybe_flush()
    assert len(read_run(path)["arrivals"]["job"]) == 1
    log.close()


def test_resume_truncates_to_checkpoint_counts(tmp_path):
    path = tmp_path / "run.h5"
    with RunLog(path, ATTRS) as log:
        for i in range(10):
            log.arrival(**arrival_row(i))
        log.eval(**eval_row(1))
        log.eval(**eval_row(2))
        log.timing(version=1, wall_time=0.0, phase="eval", seconds=0.5)
    with RunLog(path, {"resumed": 1}, resume_counts={"arrivals": 6, "evals": 1, "timings": 0, "kd_checks": 0}) as log:
        assert log.counts() == {"arrivals": 6, "evals": 1, "timings": 0, "kd_checks": 0}
        log.arrival(**arrival_row(100))
    run = read_run(path)
    assert run["arrivals"]["job"].tolist() == [0, 1, 2, 3, 4, 5, 100]
    assert run["evals"]["version"].tolist() == [1]
    assert len(run["timings"]["version"]) == 0
    assert run["attrs"]["resumed"] == 1 and run["attrs"]["world_size"] == 4  # old attrs kept, new added
    assert os.listdir(tmp_path) == ["run.h5"]


def test_resume_after_writer_crash(tmp_path):
    """A killed SWMR writer leaves flags that stop HDF5 from reopening the file for writing;
    resume must still work and keep exactly the checkpointed rows."""
    path = tmp_path / "crash.h5"
    run_python(f"""
        import os
        from mpi_afl.storage.runlog import RunLog
        log = RunLog({str(path)!r}, {{"config": "{{}}"}})
        for i in range(8):
            log.arrival(wall_time=i, virtual_time=i, client=i, rank=1, job=i, base_version=0, version=i,
                        staleness=0, weight=1.0, loss=0.0, samples=1, bytes=1, server_seconds=0.0, compute_seconds=0.01,
                        accepted=True, reason="none")
        log.flush()
        os._exit(0)  # no close(), like a node failure
    """)
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r+")
    with RunLog(path, {}, resume_counts={"arrivals": 5, "evals": 0, "timings": 0, "kd_checks": 0}) as log:
        log.arrival(**arrival_row(42))
    assert read_run(path)["arrivals"]["job"].tolist() == [0, 1, 2, 3, 4, 42]


def test_resume_with_more_rows_than_file_has(tmp_path):
    path = tmp_path / "run.h5"
    with RunLog(path, ATTRS) as log:
        log.arrival(**arrival_row(0))
    with pytest.raises(RunLogError, match=r"'arrivals' has 1 rows but the checkpoint counts 3: the log is truncated"):
        RunLog(path, ATTRS, resume_counts={"arrivals": 3, "evals": 0, "timings": 0, "kd_checks": 0})
    assert len(read_run(path)["arrivals"]["job"]) == 1


def test_bad_rows_name_the_field(tmp_path):
    log = RunLog(tmp_path / "run.h5", ATTRS)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        log.arrival(**arrival_row(0), colour=1)
    row = arrival_row(0)
    del row["staleness"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['staleness'\]"):
        log.arrival(**row)
    with pytest.raises(ValueError, match=r"phase='lunch' is not one of \['aggregate'"):
        log.timing(version=0, wall_time=0.0, phase="lunch", seconds=1.0)
    with pytest.raises(ValueError, match=r"reason='bored'"):
        log.arrival(**{**arrival_row(0), "reason": "bored"})
    log.eval(**{**eval_row(0), "test_accuracy": "high"})
    with pytest.raises(ValueError, match=r"evals\.test_accuracy"):
        log.flush()
    assert log.counts()["arrivals"] == 0


def test_existing_file_is_not_overwritten_by_default(tmp_path):
    path = tmp_path / "run.h5"
    RunLog(path, ATTRS).close()
    with pytest.raises(FileExistsError, match="run.h5 already exists"):
        RunLog(path, ATTRS)
    RunLog(path, {"label": "again"}, overwrite=True).close()
    assert read_run(path)["attrs"]["label"] == "again"


def test_read_run_errors(tmp_path):
    with pytest.raises(RunLogError, match="run log not found: .*missing.h5"):
        read_run(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="text.h5 is not a readable HDF5 file"):
        read_run(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(RunLogError, match="other.h5 is not an mpi_afl run file"):
        read_run(tmp_path / "other.h5")


def _log_with_rows(path: Path, rows: int = 3000, crash: bool = False) -> None:
    """A run log with `rows` arrivals, closed properly or left open like after a crash (another process)."""
    run_python(f"""
        import os
        from mpi_afl.storage.runlog import RunLog
        log = RunLog({str(path)!r}, {{"run_id": "abc"}})
        for i in range({rows}):
            log.arrival(wall_time=i, virtual_time=i, client=i, rank=1, job=i, base_version=0, version=i,
                        staleness=0, weight=1.0, loss=0.0, samples=1, bytes=1, server_seconds=0.0, compute_seconds=0.01,
                        accepted=True, reason="none")
        log.flush()
        if {crash}:
            os._exit(0)
        log.close()
    """)


def _flip(path: Path, offset: int, n: int = 8) -> None:
    """Damage n bytes (not with 0xFF: Fletcher-32 cannot tell 0x0000 from 0xFFFF words)."""
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


COUNTS = {"arrivals": 100, "evals": 0, "timings": 0, "kd_checks": 0}


@pytest.mark.parametrize("crash", [False, True], ids=["closed", "crashed_writer"])
@pytest.mark.timeout(300)   # in process: milliseconds when it works; it once retried forever
def test_damage_is_an_error_not_a_hang(tmp_path, crash):
    """Flipped header bytes once made a SWMR reader retry forever; flipped row bytes were read silently."""
    good = tmp_path / "good.h5"
    _log_with_rows(good, crash=crash)
    header, rows = tmp_path / "header.h5", tmp_path / "rows.h5"
    header.write_bytes(good.read_bytes())
    _flip(header, 100)
    rows.write_bytes(good.read_bytes())
    with h5py.File(good, "r", swmr=True) as f:   # the first row's bytes: inside the chunk of the arrivals table
        offset = f["arrivals"].id.get_chunk_info(0).byte_offset
    _flip(rows, offset + 16)
    with pytest.raises(RunLogError, match="header.h5"):   # it once retried forever: pytest-timeout guards
        read_run(header)
    with pytest.raises(RunLogError, match="header.h5"):
        check_resumable(header, COUNTS, "abc")
    with pytest.raises(RunLogError, match="rows.h5 is damaged"):
        read_run(rows)
    with pytest.raises(RunLogError, match="rows.h5 is damaged"):
        check_resumable(rows, COUNTS, "abc")
    check_resumable(good, COUNTS, "abc")
    assert len(read_run(good)["arrivals"]["job"]) == 3000


def test_truncated_log_is_an_error(tmp_path):
    path = tmp_path / "run.h5"
    _log_with_rows(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunLogError, match="run.h5 is not a readable HDF5 file.*truncated"):
        check_resumable(path, COUNTS, "abc")


def test_resume_checks_run_id_and_format_version(tmp_path):
    path = tmp_path / "run.h5"
    _log_with_rows(path, rows=5)
    with pytest.raises(RunLogError, match="belongs to run 'abc', but the checkpoint to run 'xyz'"):
        check_resumable(path, {"arrivals": 5, "evals": 0, "timings": 0, "kd_checks": 0}, "xyz")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1   # a log from before checksums and run ids: readable, not resumable
    assert len(read_run(path)["arrivals"]["job"]) == 5
    with pytest.raises(RunLogError, match="format_version 1 .*only version 3 logs can be continued"):
        check_resumable(path, {"arrivals": 5, "evals": 0, "timings": 0, "kd_checks": 0}, "abc")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 7
    with pytest.raises(RunLogError, match="format_version 7; this version of mpi_afl reads 1, 2, 3"):
        read_run(path)
