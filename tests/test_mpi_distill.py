"""End-to-end runs of the distillation algorithms under real mpiexec (docs/algorithms.md §3, §4).

Small and fast: digits, a tiny generator, KD from version 9 on, B = 1. Each
run is launched once per module and shared by the tests that read it.
"""

from pathlib import Path

import numpy as np
import pytest

from mpi_afl.algorithms.staleness import cosine_beta
from mpi_afl.storage.runlog import read_run
from mpi_helpers import FAST, launch, ok, summary

pytestmark = pytest.mark.slow   # every test launches runs, all but one under mpiexec (marked mpi)

VERSIONS = 30
WARMUP = 8  # KD from version 9 on; the generator trains from version 4
DISTILL = ["--distill.ngf=8", "--distill.nz=16", "--distill.synth_batch=16", "--distill.kd_steps=2",
           "--distill.kd_batch=8", "--distill.freeze_versions=4", f"--distill.warmup_versions={WARMUP}",
           "--server.s_max=2", "--server.buffer_size=1"]
# 15 local iterations (FAST has 5): enough for the runs to learn steadily in 30 versions. Over 30 versions
# these runs reached 0.47-0.87 test accuracy (observed, seeds 1 and 2; DD-FedRevive 0.6 in 20); chance is 0.1.
ARGS = [*FAST, "--client.iterations=15", *DISTILL, "--clock", "virtual", "--seed", "1"]
LEARNED = 0.3


def _run(tmp_path_factory, name: str, ranks: int, args: list[str]) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    ok(launch(ranks, [*ARGS, *args, "--out", str(out)]))
    return out


def _without_wall_time(evals: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "wall_time"} for e in evals]


def _assert_identical(a: dict, b: dict) -> None:
    assert a["model_sha256"] == b["model_sha256"]
    assert _without_wall_time(a["evals"]) == _without_wall_time(b["evals"])
    assert a["virtual_time"] == b["virtual_time"]
    assert a["algorithm_stats"]["kd_applied"] == b["algorithm_stats"]["kd_applied"]


def _kd_checks(out: Path, stats: dict) -> dict:
    """The run's kd_checks table, checked against its summary: one finite row per KD call, not all zero
    changes, and the summary means of the rows."""
    checks = read_run(out / "run.h5")["kd_checks"]
    assert stats["kd_checks"] == stats["kd_applied"] == len(checks["version"])
    change = checks["loss_after"] - checks["loss_before"]
    assert np.isfinite(change).all() and bool((change != 0).any())
    assert stats["kd_loss_change"] == pytest.approx(float(change.mean()), rel=1e-9, abs=1e-12)
    assert stats["kd_loss_improved"] == pytest.approx(float((change < 0).mean()))
    return checks


def _launched_on_first_use(tmp_path_factory, name: str, extra: list[str]):
    """get(algorithm, ranks): the output directory of a VERSIONS-long run with `extra` arguments, launched on
    first use and shared by the module's tests."""
    outs: dict[tuple[str, int], Path] = {}

    def get(algorithm: str, ranks: int) -> Path:
        if (algorithm, ranks) not in outs:
            outs[algorithm, ranks] = _run(tmp_path_factory, f"{name}{algorithm}{ranks}", ranks,
                                          ["--algorithm", algorithm, *extra, "--max-versions", str(VERSIONS)])
        return outs[algorithm, ranks]

    return get


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """full_run(algorithm, ranks): a VERSIONS-long run, launched on first use."""
    return _launched_on_first_use(tmp_path_factory, "", [])


@pytest.mark.mpi
def test_fedrevive_learns_and_blends_kd_into_stale_updates(full_run):
    out = full_run("fedrevive", 3)
    s = summary(out)
    assert s["world_size"] == 3 and s["versions"] == VERSIONS and s["updates_rejected"] == 0
    assert s["final_accuracy"] > LEARNED, s["evals"]
    arrivals = read_run(out / "run.h5")["arrivals"]
    accepted = arrivals["accepted"]
    tau, weight = arrivals["staleness"][accepted], arrivals["weight"][accepted]
    at_arrival = arrivals["version"][accepted] - 1  # B = 1: every accepted arrival makes one version
    # beta = cosine beta(tau) with s_max = 2 (§3.2): 0 for fresh updates, > 0 for every stale one.
    np.testing.assert_allclose(weight, [cosine_beta(t, 2.0) for t in tau], rtol=0, atol=1e-12)
    assert bool((weight[tau > 0] > 0).all()) and bool((weight[tau == 0] == 0).all())
    # KD runs, and is blended in, exactly for the stale arrivals past the warm-up (§3.1 step 3).
    stale_after_warmup = (tau > 0) & (at_arrival > WARMUP)
    assert stale_after_warmup.sum() >= 5
    assert s["algorithm_stats"]["kd_applied"] == int(stale_after_warmup.sum())
    stats = s["algorithm_stats"]
    assert stats["distill_seconds"] > 0
    # Diagnostics (distill/kd.record_kd, Synthesizer.synthesize): present and in range.
    assert stats["kd_norm_ratio"] > 0 and -1 <= stats["kd_cosine"] <= 1
    assert stats["syntheses"] > 0 and 0 <= stats["synth_agreement"] <= 1
    # The KD diagnostic: one run.h5 row per KD call, L(x_t + eta beta Delta_KD) - L(x_t) on held-out images.
    checks = _kd_checks(out, stats)
    np.testing.assert_allclose(checks["share"], 0.5 * weight[stale_after_warmup], rtol=1e-12)  # FAST lr 0.5


@pytest.mark.mpi
def test_fedrevive_virtual_clock_identical_across_rank_counts(full_run):
    one, three = summary(full_run("fedrevive", 1)), summary(full_run("fedrevive", 3))
    assert one["world_size"] == 1 and three["world_size"] == 3
    _assert_identical(one, three)


@pytest.mark.mpi
def test_fedrevive_resume_is_exact(full_run, tmp_path):
    # Stopped past the warm-up, the checkpoint must carry the generator, the pool, the probe estimates,
    # the teacher buffer and the random streams for the resumed half to match.
    out = tmp_path / "run"
    ok(launch(3, [*ARGS, "--algorithm", "fedrevive", "--max-versions", str(VERSIONS // 2), "--out", str(out)]))
    half = summary(out)
    assert half["versions"] == VERSIONS // 2 and half["algorithm_stats"]["kd_applied"] > 0
    ok(launch(3, ["--resume", str(out), "--max-versions", str(VERSIONS)]))
    resumed, whole = summary(out), summary(full_run("fedrevive", 1))
    assert resumed["versions"] == VERSIONS
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert _without_wall_time(resumed["evals"]) == _without_wall_time(whole["evals"])


@pytest.mark.mpi
def test_fedecho_learns_under_mpiexec(full_run):
    s = summary(full_run("fedecho", 3))
    assert s["world_size"] == 3 and s["versions"] == VERSIONS and s["updates_rejected"] == 0
    assert s["final_accuracy"] > LEARNED, s["evals"]
    stats = s["algorithm_stats"]
    assert stats["kd_applied"] > 0
    assert stats["distill_seconds"] > 0   # timed by the server loop for every algorithm that slices its work
    # The KD diagnostic, as FedRevive's: one run.h5 row per correction (corrected model against x').
    checks = _kd_checks(full_run("fedecho", 3), stats)
    assert bool((checks["share"] > 0).all()) and bool((checks["share"] <= 1).all())


@pytest.mark.mpi
def test_fedecho_virtual_clock_identical_across_rank_counts(full_run):
    _assert_identical(summary(full_run("fedecho", 1)), summary(full_run("fedecho", 3)))


@pytest.mark.mpi
def test_fedecho_with_kd_step_zero_is_ca2fl(tmp_path_factory, full_run):
    """echo.kd_step = 0 (CA2FL backbone, the default): no synthesis, no KD, and CA2FL's final model for the
    same arrivals; on 2 ranks against CA2FL's 3, which the virtual clock makes irrelevant."""
    out = _run(tmp_path_factory, "fedecho_kd0", 2, ["--algorithm", "fedecho", "--echo.kd_step=0",
                                                    "--max-versions", str(VERSIONS)])
    echo, ca2fl = summary(out), summary(full_run("ca2fl", 3))
    assert echo["versions"] == ca2fl["versions"] == VERSIONS
    assert echo["model_sha256"] == ca2fl["model_sha256"]
    assert _without_wall_time(echo["evals"]) == _without_wall_time(ca2fl["evals"])
    assert "kd_applied" not in echo["algorithm_stats"] and "syntheses" not in echo["algorithm_stats"]


@pytest.mark.mpi
def test_ca2fl_learns_under_mpiexec(full_run):
    s = summary(full_run("ca2fl", 3))
    assert s["world_size"] == 3 and s["versions"] == VERSIONS and s["updates_rejected"] == 0
    assert s["final_accuracy"] > LEARNED, s["evals"]


@pytest.mark.mpi
def test_dd_fedrevive_blends_every_update(tmp_path_factory):
    versions = 20
    out = _run(tmp_path_factory, "dd", 3, ["--algorithm", "dd_fedrevive", "--data.kd_fraction=0.1",
                                           "--distill.dd_beta=0.5", "--max-versions", str(versions)])
    s = summary(out)
    assert s["world_size"] == 3 and s["versions"] == versions and s["updates_rejected"] == 0
    # Fixed beta and no gates (§3.4): every accepted update is distilled and blended with dd_beta = 0.5.
    assert s["algorithm_stats"]["kd_applied"] == versions
    arrivals = read_run(out / "run.h5")["arrivals"]
    assert set(arrivals["weight"][arrivals["accepted"]].tolist()) == {0.5}
    assert s["final_accuracy"] > LEARNED, s["evals"]


def test_teacher_matched_synthesis_runs_end_to_end(tmp_path):
    """distill.synth_labels = teacher: a short FedRevive run distils and reports its synthesis agreement."""
    out = tmp_path / "run"
    ok(launch(1, [*ARGS, "--algorithm", "fedrevive", "--distill.synth_labels=teacher",
                   "--max-versions", "15", "--out", str(out)]))
    stats = summary(out)["algorithm_stats"]
    assert stats["syntheses"] > 0 and 0.0 <= stats["synth_agreement"] <= 1.0 and stats["kd_applied"] > 0


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """group_run(algorithm, ranks): a VERSIONS-long run with distill.ranks = 1, launched on first use."""
    return _launched_on_first_use(tmp_path_factory, "group-", ["--distill.ranks=1"])


@pytest.mark.mpi
def test_distill_group_gives_one_result_for_any_worker_count(group_run):
    four, five = summary(group_run("fedrevive", 4)), summary(group_run("fedrevive", 5))
    _assert_identical(four, five)
    assert [r["role"] for r in five["ranks"]] == ["server", "distil", "worker", "worker", "worker"]
    assert len(five["workers"]) == 3 and five["distill_ranks"][0]["rank"] == 1
    assert five["distill_ranks"][0]["calls"] > 0


@pytest.mark.mpi
def test_distill_group_follows_the_one_rank_run(group_run, full_run):
    """D = 1 sums the teachers' shares in another order than D = 0: the same KD calls, per-call held-out loss
    changes within float noise of each other, and the same accuracy within noise."""
    group, alone = group_run("fedrevive", 4), full_run("fedrevive", 1)
    g, a = summary(group), summary(alone)
    assert g["algorithm_stats"]["kd_applied"] == a["algorithm_stats"]["kd_applied"]
    rows_g, rows_a = _kd_checks(group, g["algorithm_stats"]), _kd_checks(alone, a["algorithm_stats"])
    np.testing.assert_array_equal(rows_g["version"], rows_a["version"])
    change_g = rows_g["loss_after"] - rows_g["loss_before"]
    change_a = rows_a["loss_after"] - rows_a["loss_before"]
    np.testing.assert_allclose(change_g, change_a, rtol=0.05, atol=1e-3)
    assert abs(g["final_accuracy"] - a["final_accuracy"]) <= 0.05, (g["evals"], a["evals"])


@pytest.mark.mpi
def test_distill_group_resume_is_exact(group_run, tmp_path):
    out = tmp_path / "run"
    ok(launch(3, [*ARGS, "--algorithm", "fedrevive", "--distill.ranks=1", "--max-versions", str(VERSIONS // 2),
                   "--out", str(out)]))
    ok(launch(3, ["--resume", str(out), "--max-versions", str(VERSIONS)]))
    resumed, whole = summary(out), summary(group_run("fedrevive", 4))
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert _without_wall_time(resumed["evals"]) == _without_wall_time(whole["evals"])


@pytest.mark.mpi
def test_fedecho_distill_group_records_its_distillation(group_run, full_run):
    g, a = summary(group_run("fedecho", 3)), summary(full_run("fedecho", 3))
    assert g["algorithm_stats"]["distill_seconds"] > 0
    assert g["algorithm_stats"]["kd_applied"] == a["algorithm_stats"]["kd_applied"] > 0
    assert abs(g["final_accuracy"] - a["final_accuracy"]) <= 0.05, (g["evals"], a["evals"])


@pytest.mark.mpi
def test_distill_group_without_a_worker_is_refused_in_one_line(tmp_path):
    proc = launch(2, [*ARGS, "--algorithm", "fedrevive", "--distill.ranks=1", "--out", str(tmp_path / "r")])
    assert proc.returncode == 2, proc.stderr
    assert "config key 'distill.ranks'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
