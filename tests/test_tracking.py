"""Live tracking (storage/tracking.py): TensorBoard event files and an MLflow run that follow run.h5, read back
with TensorBoard's event accumulator and MLflow's client; a run killed after its checkpoint and resumed logs
every version once, with the values of an uninterrupted run."""

import json
from pathlib import Path

import numpy as np
import pytest

from mpi_afl.config import ConfigError, parse_args
from mpi_afl.storage.runlog import RunLog, read_run
from mpi_helpers import FAST, launch, ok, summary

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

def scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return [(s.step, s.value) for s in acc.Scalars(tag)]


def tags(directory: Path) -> dict:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return acc.Tags()


def f32(values) -> list[float]:
    """simple_value is a float32: compare what run.h5 holds at that precision."""
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


# ------------------------------------------------------------------ in process: RunLog -> TensorBoard
def eval_row(v: int, evaluation: int) -> dict:
    return dict(version=v, wall_time=1.0 * evaluation, virtual_time=2.5 * evaluation, test_loss=1.0 / (v + 1),
                test_accuracy=0.01 * v, val_loss=np.nan, val_accuracy=np.nan)


def arrival_row(i: int, version: int) -> dict:
    return dict(wall_time=0.1 * i, virtual_time=1.0 * i, client=i % 3, rank=1, job=i, base_version=version,
                version=version, staleness=i % 4, weight=1.0, loss=0.5, samples=10, bytes=4, server_seconds=1e-3,
                compute_seconds=0.01, accepted=i % 5 != 4, reason="none" if i % 5 != 4 else "size")


def record(log: RunLog, versions: list[int], first: int = 0) -> None:
    for evaluation, v in enumerate(versions, start=first):
        for i in range(4):
            log.arrival(**arrival_row(4 * v + i, v))
        log.eval(**eval_row(v, evaluation))
        for phase in ("aggregate", "distill", "idle", "eval"):
            log.timing(version=v, wall_time=1.0, phase=phase, seconds=0.5)


def attach(log: RunLog, out: Path, stats: dict) -> None:
    from mpi_afl.storage import tracking
    cfg, _ = parse_args(["--run.tensorboard=true"])
    tracking.attach(log, tracking.open_trackers(cfg, out), stats)


def test_points_follow_the_log_and_a_resume_drops_what_the_checkpoint_does_not_count(tmp_path):
    path, stats = tmp_path / "run.h5", {"kd_loss_change": -0.25, "kd_checks": 3, "note": "text"}
    log = RunLog(path, {"run_id": "r1", "started": "2026-01-02T03:04:05+0000"})
    attach(log, tmp_path, stats)
    record(log, [2, 4])
    log.flush()
    counts = log.counts()             # what a checkpoint taken here would count
    record(log, [6, 6, 8], first=2)   # version 6 twice: a virtual-time grid point without a new version
    log.close()
    tb = tmp_path / "tensorboard"
    assert [s for s, _ in scalars(tb / "by_version", "test/accuracy")] == [2, 4, 6, 8]
    assert [s for s, _ in scalars(tb / "by_evaluation", "test/accuracy")] == [0, 1, 2, 3, 4]
    assert scalars(tb / "by_evaluation", "time/version") == [(0, 2.0), (1, 4.0), (2, 6.0), (3, 6.0), (4, 8.0)]
    assert scalars(tb / "by_evaluation", "time/virtual_time") == [(k, 2.5 * k) for k in range(5)]
    assert scalars(tb / "by_version", "stats/kd_loss_change") == [(v, -0.25) for v in (2, 4, 6, 8)]
    assert scalars(tb / "by_version", "throughput/updates_accepted")[:2] == [(2, 3.0), (4, 6.0)]   # 1 in 5 rejected
    assert scalars(tb / "by_version", "server/distill_seconds")[:2] == [(2, 0.5), (4, 1.0)]
    assert "stats/note" not in tags(tb / "by_version")["scalars"]
    assert set(tags(tb)["tensors"]) == {"config", "_hparams_/session_start_info"}

    # Resume from the checkpoint above: the rows after it are dropped from run.h5, and so are their points;
    # the counters start again from the kept rows.
    log = RunLog(path, {}, resume_counts=counts)
    attach(log, tmp_path, stats)
    record(log, [6, 8, 10], first=2)
    log.close()
    assert [s for s, _ in scalars(tb / "by_version", "test/accuracy")] == [2, 4, 6, 8, 10]
    assert [s for s, _ in scalars(tb / "by_evaluation", "test/accuracy")] == [0, 1, 2, 3, 4]
    assert [s for s, _ in scalars(tb / "by_version", "server/distill_seconds")] == [2, 4, 6, 8, 10]
    assert scalars(tb / "by_version", "server/distill_seconds")[-1] == (10, 2.5)
    assert len(list((tb / "by_version").glob("events.out.tfevents.*"))) == 1
    assert len(read_run(path)["evals"]["version"]) == 5


def test_a_tracker_that_fails_during_the_run_says_so_once_and_the_log_goes_on(tmp_path, capsys):
    from mpi_afl.storage import tracking
    cfg, _ = parse_args(["--run.tensorboard=true"])
    (tb,) = tracking.open_trackers(cfg, tmp_path)
    log = RunLog(tmp_path / "run.h5", {"run_id": "r2"})
    tracking.attach(log, [tb], {})
    calls = []

    def full_disk(point):
        calls.append(point["version"])
        raise OSError(28, "No space left on device")

    tb.emit = full_disk
    record(log, [2, 4, 6])
    log.close()
    assert calls == [2]   # stopped after the first failure
    assert capsys.readouterr().out.count("[server] warning: TensorBoard tracking stopped") == 1
    assert read_run(tmp_path / "run.h5")["evals"]["version"].tolist() == [2, 4, 6]


def test_tracking_keys_are_validated():
    for argv, text in [(["--run.tensorboard=maybe"], "config key 'run.tensorboard': 'maybe' is not a boolean"),
                       (["--run.mlflow_uri=sqlite:///x.db"], "config key 'run.mlflow_uri': set, but run.mlflow"),
                       (["--run.mlflow=true", "--run.mlflow_experiment= "], "'run.mlflow_experiment': must not"),
                       (["--run.tensorbord=true"], "did you mean 'run.tensorboard'")]:
        with pytest.raises(ConfigError, match="config key|unknown config key") as e:
            parse_args(argv)
        assert text in str(e.value)


# ------------------------------------------------------------------ real runs
TRACK = [*FAST, "--run.eval_every=2", "--run.tensorboard=true", "--run.mlflow=true"]


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mpi_afl").experiment_id])
    return client, run


def history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.slow
def test_a_run_is_followed_by_tensorboard_and_mlflow(tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    ok(launch(1, [*TRACK, "--max-versions", "12", "--out", str(out)], cwd=tmp_path))
    evals, s = read_run(out / "run.h5")["evals"], summary(out)
    tb = out / "tensorboard"
    assert scalars(tb / "by_version", "test/accuracy") == list(zip(evals["version"].tolist(),
                                                                    f32(evals["test_accuracy"])))
    assert scalars(tb / "by_version", "val/loss") == list(zip(evals["version"].tolist(), f32(evals["val_loss"])))
    n = len(evals["version"])
    assert scalars(tb / "by_evaluation", "time/virtual_time") == list(zip(range(n), f32(evals["virtual_time"])))
    by_version = tags(tb / "by_version")["scalars"]
    assert {"throughput/updates_per_second", "staleness/mean", "staleness/max", "server/aggregate_seconds",
            "time/wall_seconds"} <= set(by_version)
    last_accepted = scalars(tb / "by_version", "throughput/updates_accepted")[-1][1]
    assert last_accepted <= s["updates_accepted"]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    config = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert "[run]" in config and "tensorboard = true" in config
    from tensorboard.plugins.hparams import metadata as hp_metadata
    start = hp_metadata.parse_session_start_info_plugin_data(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    assert start.hparams["server.algorithm"].string_value == "fedbuff"
    assert start.hparams["run.seed"].number_value == 0

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.data.tags["mpi_afl.run_id"] == s["run_id"]
    assert run.data.params["server.algorithm"] == "fedbuff" and run.data.params["run.max_versions"] == "12"
    assert history(client, run, "test/accuracy") == list(zip(evals["version"].tolist(),
                                                             evals["test_accuracy"].tolist()))
    assert history(client, run, "time/virtual_time") == list(zip(evals["version"].tolist(),
                                                                 evals["virtual_time"].tolist()))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.toml"]


@pytest.mark.slow
def test_a_run_killed_after_its_checkpoint_and_resumed_logs_every_version_once(tmp_path):
    """The server crashes (fault injection) after the checkpoint of version 10 and after evaluating later
    versions; --resume continues from version 10. TensorBoard ends up with the points of an uninterrupted run,
    each once; MLflow with each step once and the uninterrupted run's values (virtual clock)."""
    pytest.importorskip("mlflow")
    # a target accuracy makes the virtual clock evaluate at once (stopping depends on it), so which
    # evaluations come before the crash does not depend on timing; 0.999 is not reached in 20 versions
    args = [*TRACK, "--run.checkpoint_every=10", "--run.target_accuracy=0.999"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ok(launch(1, [*args, "--max-versions", "20", "--out", str(whole)], cwd=tmp_path))
    crashed = launch(1, [*args, "--max-versions", "20", "--fault.kind=server_raise", "--fault.job=68",
                         "--out", str(cut)], cwd=tmp_path)
    assert crashed.returncode == 1 and "injected fault" in crashed.stderr, crashed.stderr
    tb_whole, tb_cut = whole / "tensorboard", cut / "tensorboard"
    before = [step for step, _ in scalars(tb_cut / "by_version", "test/accuracy")]
    assert 10 in before and max(before) > 10, before   # points the checkpoint (version 10) does not count
    client, run = mlflow_run(cut)
    assert run.info.status == "RUNNING"

    ok(launch(1, ["--resume", str(cut), "--fault.kind=none"], cwd=tmp_path))
    assert summary(cut)["model_sha256"] == summary(whole)["model_sha256"]
    for run_name in ("by_version", "by_evaluation"):
        for tag in ("test/accuracy", "test/loss", "time/virtual_time", "time/version"):
            assert scalars(tb_cut / run_name, tag) == scalars(tb_whole / run_name, tag), (run_name, tag)
    steps = [step for step, _ in scalars(tb_cut / "by_version", "test/accuracy")]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    evals = read_run(whole / "run.h5")["evals"]
    client, run = mlflow_run(cut)
    assert run.info.status == "FINISHED"
    for key in ("test/accuracy", "time/virtual_time", "throughput/updates_accepted"):
        points = history(client, run, key)
        assert len({step for step, _ in points}) == len(points), (key, points)
    assert history(client, run, "test/accuracy") == list(zip(evals["version"].tolist(),
                                                             evals["test_accuracy"].tolist()))
    assert json.loads((cut / "summary.json").read_text())["versions"] == 20


@pytest.mark.slow
def test_a_store_that_cannot_be_reached_is_one_line_and_leaves_no_run(tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    proc = launch(1, [*FAST, "--max-versions", "2", "--run.mlflow=true", "--run.mlflow_uri=nosuchscheme://x",
                      "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "mpi_afl: error: config key 'run.mlflow_uri': MLflow could not start:")
    assert "Traceback" not in proc.stderr
    assert not (out / "run.h5").exists() and not (out / "checkpoint.h5").exists()   # a fresh start may follow


@pytest.mark.slow
def test_distillation_diagnostics_of_the_stats_are_tracked(tmp_path):
    out = tmp_path / "fr"
    small = ["--algorithm", "fedrevive", "--distill.freeze_versions=2", "--distill.warmup_versions=4",
             "--distill.synth_batch=16", "--distill.ngf=16", "--distill.nz=32", "--distill.kd_steps=2",
             "--distill.kd_check_images=64"]
    ok(launch(1, [*FAST, *small, "--run.eval_every=2", "--max-versions", "10", "--run.tensorboard=true",
                  "--out", str(out)], cwd=tmp_path))
    stats = summary(out)["algorithm_stats"]
    assert stats["kd_applied"] > 0 and stats["kd_checks"] > 0
    tb = out / "tensorboard" / "by_version"
    for key in ("kd_loss_change", "kd_loss_improved", "kd_norm_ratio", "kd_cosine", "synth_agreement", "kd_applied"):
        # the last point is written after the last update: the stats as summary.json has them
        assert scalars(tb, f"stats/{key}")[-1] == (10, f32([stats[key]])[0]), key


@pytest.mark.slow
def test_a_run_stopped_by_a_signal_and_resumed_matches_its_run_log(tmp_path):
    """SIGTERM during the run: the server checkpoints, then evaluates the version it stopped at if that one was
    not evaluated (off-schedule: a row the resumed run log drops). After --resume the event files hold exactly
    run.h5's evaluations, each once; MLflow holds each step once and every evaluation of run.h5."""
    import signal
    from mpi_helpers import HANG_GUARD, start, wait_until
    pytest.importorskip("mlflow")
    out = tmp_path / "sig"
    proc = start(1, [*TRACK, "--max-versions", "400", "--out", str(out)])
    by_version = out / "tensorboard" / "by_version"

    def points() -> int:
        if not by_version.is_dir() or "test/accuracy" not in tags(by_version)["scalars"]:
            return 0
        return len(scalars(by_version, "test/accuracy"))

    try:
        assert wait_until(lambda: points() >= 3 or proc.poll() is not None), "no points while the run goes on"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    first = summary(out)
    assert first["stop_reason"] == "signal", first["stop_reason"]
    ok(launch(1, ["--resume", str(out), "--max-versions", str(first["versions"] + 6)], cwd=tmp_path))
    evals = read_run(out / "run.h5")["evals"]
    assert evals["version"].tolist() == sorted(set(evals["version"].tolist()))
    assert scalars(by_version, "test/accuracy") == list(zip(evals["version"].tolist(), f32(evals["test_accuracy"])))
    by_evaluation = scalars(out / "tensorboard" / "by_evaluation", "test/accuracy")
    assert [step for step, _ in by_evaluation] == list(range(len(evals["version"])))
    client, run = mlflow_run(out)
    points_ = history(client, run, "test/accuracy")
    assert len({s for s, _ in points_}) == len(points_)
    assert set(zip(evals["version"].tolist(), evals["test_accuracy"].tolist())) <= set(points_)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_on_a_virtual_time_grid_the_evaluation_step_is_virtual_time(tmp_path):
    out = tmp_path / "grid"
    ok(launch(1, [*FAST, "--run.eval_every_time=0.5", "--max-versions", "6", "--run.tensorboard=true",
                  "--out", str(out)], cwd=tmp_path))
    evals = read_run(out / "run.h5")["evals"]
    tb = out / "tensorboard"
    grid = scalars(tb / "by_evaluation", "time/virtual_time")
    assert grid[:-1] == [(k, 0.5 * (k + 1)) for k in range(len(grid) - 1)]   # the last one: the stop, off the grid
    assert grid[-1] == (len(grid) - 1, f32([evals["virtual_time"][-1]])[0])
    versions = evals["version"].tolist()
    assert len(versions) > len(set(versions))   # grid times without a new version: the same model again
    first = {v: i for i, v in reversed(list(enumerate(versions)))}   # each version's first evaluation
    assert scalars(tb / "by_version", "time/virtual_time") == [
        (v, f32([evals["virtual_time"][i]])[0]) for v, i in sorted(first.items())]
