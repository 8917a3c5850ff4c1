"""End-to-end runs under real mpiexec: the asynchronous runtime (issue: runtime)."""

import numpy as np
import pytest

from mpi_afl.storage.runlog import read_run

from mpi_helpers import FAST, launch, ok, refused, summary

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def test_wall_clock_run_learns(tmp_path):
    # The quick-start defaults (K = 8, 25 local iterations): stale deltas once drove BatchNorm running
    # variances negative here and the model to NaN; the server now keeps them >= 0.
    out = tmp_path / "wall"
    proc = launch(3, ["--algorithm", "fedbuff", "--clock", "wall", "--max-versions", "40", "--out", str(out)])
    ok(proc)
    s = summary(out)
    assert s["world_size"] == 3 and s["clock"] == "wall"
    assert s["versions"] == 40
    assert s["final_accuracy"] > 0.6, s  # 10 classes: chance is 0.1
    assert s["updates_rejected"] == 0
    assert all(w["jobs"] > 0 for w in s["workers"]), s["workers"]


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync", "fedavg"])
def test_virtual_clock_identical_across_rank_counts(tmp_path, algorithm):
    args = [*FAST, "--algorithm", algorithm, "--clock", "virtual", "--seed", "3", "--max-versions", "20"]
    one, three = tmp_path / "one", tmp_path / "three"
    ok(launch(1, [*args, "--out", str(one)]))
    ok(launch(3, [*args, "--out", str(three)]))
    a, b = summary(one), summary(three)
    assert a["model_sha256"] == b["model_sha256"]
    strip = lambda evals: [{k: v for k, v in e.items() if k != "wall_time"} for e in evals]
    assert strip(a["evals"]) == strip(b["evals"])
    assert a["virtual_time"] == b["virtual_time"] and a["updates_accepted"] == b["updates_accepted"]
    # Every recorded value but wall times and the rank that ran a job, row by row (bytes: the payload,
    # without the MPI header, under either transport).
    one_log, three_log = read_run(one / "run.h5")["arrivals"], read_run(three / "run.h5")["arrivals"]
    for column in set(one_log) - {"wall_time", "server_seconds", "compute_seconds", "rank"}:   # measured times
        np.testing.assert_array_equal(one_log[column], three_log[column], err_msg=column)
    assert set(one_log["bytes"].tolist()) == {4 * 53_196}


def test_worker_exception_ends_job_quickly(tmp_path):
    out = tmp_path / "x"
    proc = launch(3, [*FAST, "--max-versions", "200", "--fault.kind=raise", "--fault.job=3", "--out", str(out)])
    assert proc.returncode != 0
    assert "injected fault" in proc.stderr
    # Ended at the fault, not after the run's 200 versions (a job that waited would have hit the hang guard).
    assert not (out / "summary.json").exists()
    assert "version   200/200" not in proc.stdout


@pytest.mark.parametrize("kind", ["nan", "bad_size", "bad_client"])
def test_malformed_update_is_rejected_and_run_finishes(tmp_path, kind):
    out = tmp_path / kind
    proc = launch(3, [*FAST, "--max-versions", "20", f"--fault.kind={kind}", "--fault.job=2", "--out", str(out)])
    ok(proc)
    s = summary(out)
    assert s["updates_rejected"] == 1
    assert s["versions"] == 20
    assert "rejected update: job 2" in proc.stdout


def test_config_error_under_mpiexec_exits_nonzero_once(tmp_path):
    """The launched run's refusal of a config (the other config refusals are checked in process): every rank
    exits 2 and one line says why."""
    proc = launch(3, ["--server.lrr=0.1", "--out", str(tmp_path / "x")])
    refused(proc, "unknown config key 'server.lrr'", "server.lr")
    assert proc.stderr.count("unknown config key 'server.lrr'") == 1
    assert not (tmp_path / "x").exists()
