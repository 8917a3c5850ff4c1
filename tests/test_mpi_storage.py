"""Run files, checkpoints, exact resume and pre-emption, with real mpiexec runs (issue: storage); the refusals
of a run directory or a checkpoint at start-up in process."""

import signal

import h5py
import numpy as np
import pytest

from mpi_helpers import HANG_GUARD, FAST, launch, ok, refused_at_start, start, summary, wait_until
from mpi_afl.storage.checkpoint import load_checkpoint, save_checkpoint
from mpi_afl.storage.runlog import read_run

ARGS = [*FAST, "--algorithm", "fedbuff", "--clock", "virtual", "--seed", "5", "--run.eval_every=5"]


def _rows(run, table, drop=("wall_time", "server_seconds", "compute_seconds", "rank")):
    """A run table without its wall-clock and placement columns (they differ between any two runs)."""
    data = read_run(run)[table]
    return {k: v for k, v in data.items() if k not in drop}


def _same_rows(a, b, table):
    ra, rb = _rows(a, table), _rows(b, table)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert np.array_equal(ra[k], rb[k], equal_nan=True), (table, k, ra[k], rb[k])


@pytest.mark.mpi
@pytest.mark.slow
def test_run_file_has_attrs_and_rows(tmp_path):
    out = tmp_path / "r"
    ok(launch(3, [*ARGS, "--max-versions", "10", "--out", str(out)]))
    run = read_run(out / "run.h5")
    attrs = run["attrs"]
    for key in ("config", "package_version", "world_size", "seed", "torch_version", "mpi4py_version",
                "mpi_library", "h5py_version", "hostnames"):
        assert key in attrs, key
    assert attrs["world_size"] == 3 and attrs["seed"] == 5
    arrivals = run["arrivals"]
    s = summary(out)
    assert len(arrivals["job"]) == s["updates_accepted"] + s["updates_rejected"]
    assert set(arrivals["rank"]) == {1, 2}
    assert arrivals["accepted"].all() and (arrivals["staleness"] >= 0).all()
    assert list(run["evals"]["version"]) == [5, 10]
    assert len(run["timings"]["phase"]) > 0


@pytest.mark.mpi
@pytest.mark.slow
def test_resume_after_max_versions_is_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    ok(launch(3, [*ARGS, "--max-versions", "20", "--out", str(full)]))
    ok(launch(3, [*ARGS, "--max-versions", "10", "--out", str(part)]))
    ok(launch(3, ["--resume", str(part), "--max-versions", "20"]))
    assert summary(full)["model_sha256"] == summary(part)["model_sha256"]
    for table in ("evals", "arrivals"):
        _same_rows(full / "run.h5", part / "run.h5", table)


@pytest.mark.mpi
@pytest.mark.slow
def test_sigterm_under_mpiexec_checkpoints_and_resumes_exactly(tmp_path):
    """Pre-emption: SIGTERM to mpiexec reaches every rank; all exit 0; a live SWMR reader follows the run."""
    out = tmp_path / "sig"
    proc = start(3, [*ARGS, "--max-versions", "100000", "--run.log_flush_seconds=0.2", "--out", str(out)])

    def live_rows() -> int:   # follow the live file like a user would
        try:
            with h5py.File(out / "run.h5", "r", swmr=True) as f:
                f["arrivals"].refresh()
                return len(f["arrivals"])
        except (OSError, KeyError):
            return 0

    try:
        assert wait_until(lambda: live_rows() >= 30, interval=0.5), "the live run file never showed arrivals"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert "signal SIGTERM" in stdout
    assert f"continue it with: mpi-afl train --resume {out}" in stdout
    s = summary(out)
    assert s["stop_reason"] == "signal"
    state = load_checkpoint(out / "checkpoint.h5")
    stopped = int(state["version"])
    assert stopped == s["versions"] > 0
    # Resume a few versions further and compare with a run that never stopped.
    target = stopped + 7
    ok(launch(3, ["--resume", str(out), "--max-versions", str(target)]))
    straight = tmp_path / "straight"
    ok(launch(1, [*ARGS, "--max-versions", str(target), "--out", str(straight)]))
    assert summary(out)["model_sha256"] == summary(straight)["model_sha256"]
    _same_rows(out / "run.h5", straight / "run.h5", "evals")


@pytest.fixture
def finished_run(finished_runs):
    """A finished FedBuff run of 5 versions (tests/runs.py), shared: read, never changed."""
    return finished_runs("fedbuff").out


def test_existing_run_dir_is_never_overwritten_silently(finished_run, capsys):
    before = (finished_run / "run.h5").read_bytes()
    refused_at_start([*ARGS, "--max-versions", "5", "--out", str(finished_run)], capsys, "already holds a run",
                     "--resume", "overwrite")
    assert (finished_run / "run.h5").read_bytes() == before


def test_resume_with_incompatible_config_fails(finished_run, capsys):
    refused_at_start(["--resume", str(finished_run), "--model.name=convnet"], capsys, "model.name", "convnet", "cnn")
    refused_at_start(["--resume", str(finished_run), "--dataset", "mnist"], capsys, "data.dataset")
    refused_at_start(["--resume", str(finished_run), "--data.num_clients=50"], capsys, "data.num_clients")


def test_bad_checkpoints_fail_before_any_work(tmp_path, finished_run, capsys):
    good = (finished_run / "checkpoint.h5").read_bytes()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "checkpoint.h5").write_bytes(good[: len(good) // 3])
    refused_at_start(["--resume", str(truncated)], capsys, "cannot resume", "truncated")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with h5py.File(foreign / "checkpoint.h5", "w") as f:
        f["x"] = np.arange(3)
    refused_at_start(["--resume", str(foreign)], capsys, "not an mpi_afl checkpoint")
    old = tmp_path / "old"
    old.mkdir()
    (old / "checkpoint.h5").write_bytes(good)
    with h5py.File(old / "checkpoint.h5", "r+") as f:
        f.attrs["format_version"] = 99
    refused_at_start(["--resume", str(old)], capsys, "format_version 99")
    refused_at_start(["--resume", str(tmp_path / "missing")], capsys, "checkpoint file not found")


def test_unwritable_output_dir_fails(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    refused_at_start([*ARGS, "--out", str(blocker / "run")], capsys, "run.out", "cannot write")


def test_saved_state_round_trip_keeps_rng_state(tmp_path):
    state = {"rng": np.random.default_rng(7).bit_generator.state, "x": np.arange(4.0)}
    save_checkpoint(tmp_path / "c.h5", state)
    back = load_checkpoint(tmp_path / "c.h5")
    assert back["rng"] == state["rng"] and np.array_equal(back["x"], state["x"])


@pytest.mark.slow
def test_virtual_time_grid_evaluates_every_method_at_the_same_times_and_resumes_exactly(tmp_path):
    """run.eval_every_time: FedBuff (B = 4) and AFL-DW (B = 1) evaluated at the same virtual times, the model
    current at each grid time; a run stopped half-way and resumed records the same rows as one that never
    stopped."""
    grid = ["--run.eval_every_time=1.5", "--max-versions", "0", "--run.max_virtual_time=12"]
    times = {}
    for algorithm in ("fedbuff", "afl_dw"):
        out = tmp_path / algorithm
        ok(launch(1, [*ARGS, *grid, "--algorithm", algorithm, "--out", str(out)]))
        times[algorithm] = [e["virtual_time"] for e in summary(out)["evals"]]
        # The grid times up to the stop, then the final evaluation when an update came after the last one.
        assert len(times[algorithm]) in (7, 8) and times[algorithm][-1] > 10.5 - 1e-9
    assert times["fedbuff"][:7] == times["afl_dw"][:7] == [1.5 * i for i in range(1, 8)]
    half = tmp_path / "half"
    ok(launch(1, [*ARGS, *grid[:3], "--run.max_virtual_time=6", "--algorithm", "afl_dw", "--out", str(half)]))
    ok(launch(1, ["--resume", str(half), "--run.max_virtual_time=12"]))
    whole = summary(tmp_path / "afl_dw")
    strip = lambda evals: [{k: v for k, v in e.items() if k != "wall_time"} for e in evals]  # noqa: E731
    assert strip(summary(half)["evals"]) == strip(whole["evals"])
    assert summary(half)["model_sha256"] == whole["model_sha256"]
