"""`python -m mpi_afl.report`: PNGs, summary numbers and errors, on two hand-made run files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from mpi_afl.report import PLOT_FILES, main
from mpi_afl.storage.runlog import REJECT_REASONS, RunLog

REPO = Path(__file__).resolve().parents[1]
REJECTED = next(name for name in REJECT_REASONS if name != "none")


def write_run(path: Path, attrs: dict, arrivals: list[tuple], evals: list[tuple]) -> None:
    """arrivals: (wall_time, client, staleness, accepted); evals: (version, wall_time, virtual_time, accuracy)."""
    with RunLog(path, attrs) as log:
        for i, (wall, client, staleness, accepted) in enumerate(arrivals):
            log.arrival(wall_time=wall, virtual_time=2 * wall, client=client, rank=1, job=i, base_version=0,
                        version=i, staleness=staleness, weight=1.0, loss=0.5, samples=10, bytes=100,
                        server_seconds=1e-3, accepted=accepted, reason="none" if accepted else REJECTED)
        for version, wall, virtual, acc in evals:
            log.eval(version=version, wall_time=wall, virtual_time=virtual, test_loss=1 - acc, test_accuracy=acc,
                     val_loss=float("nan"), val_accuracy=float("nan"))


@pytest.fixture
def two_runs(tmp_path):
    a = tmp_path / "a" / "run.h5"
    b = tmp_path / "b" / "run.h5"
    a.parent.mkdir()
    b.parent.mkdir()
    # Run A: 8 accepted (staleness 0,1,2,3,0,1,2,3 -> mean 1.5, max 3), 2 rejected, last arrival at 4 s.
    write_run(a, {"config": {"server": {"algorithm": "fedbuff"}, "run": {"seed": 1}, "data": {"num_clients": 6}},
                  "label": "runA"},
              [(0.5 * (i + 1), i % 4, i % 4, True) for i in range(8)] + [(3.5, 5, -1, False), (4.0, 5, -1, False)],
              [(0, 0.0, 0.0, 0.1), (5, 2.0, 10.0, 0.6), (10, 4.0, 20.0, 0.55)])
    # Run B: no label attribute -> "<algorithm> seed <seed>"; never reaches 0.5.
    write_run(b, {"config": {"server": {"algorithm": "fedasync"}, "run": {"seed": 7}}},
              [(1.0, 0, 0, True), (2.0, 1, 5, True), (5.0, 0, 1, True)],
              [(0, 0.0, 0.0, 0.2), (3, 5.0, 9.0, 0.45)])
    return a, b


def test_report_cli_writes_plots_and_summary(tmp_path, two_runs):
    out = tmp_path / "plots"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "mpi_afl.report", *map(str, two_runs), "--out", str(out),
                           "--target", "0.5", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 10_000, name  # axes, curves and legend, not an empty canvas
    lines = done.stdout.splitlines()
    table = [line.split() for line in lines if not line.startswith("{")]
    assert table[0] == ["run", "final_acc", "best_acc", "virt_to_target", "wall_to_target", "accepted",
                        "updates/s", "mean_stale", "max_stale", "rejected"]
    assert table[1] == ["runA", "0.5500", "0.6000", "10.00", "2.00", "8", "2.0", "1.50", "3", "2"]
    # "fedasync seed 7": 3 accepted over 5 s, staleness 0, 5, 1.
    assert table[2] == ["fedasync", "seed", "7", "0.4500", "0.4500", "-", "-", "3", "0.6", "2.00", "5", "0"]
    assert len({len(line) for line in lines if not line.startswith("{")}) == 1  # aligned columns
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["label"] for r in rows] == ["runA", "fedasync seed 7"]
    assert rows[0]["virtual_time_to_target"] == 10.0 and rows[0]["updates_per_second"] == 2.0
    assert rows[1]["wall_time_to_target"] is None and rows[1]["target"] == 0.5
    assert rows[1]["max_staleness"] == 5 and rows[1]["rejected"] == 0


def test_default_out_dir_and_no_target(two_runs, capsys):
    a, _ = two_runs
    assert main([str(a)]) == 0
    assert all((a.parent / name).stat().st_size > 10_000 for name in PLOT_FILES)
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:5] == ["runA", "0.5500", "0.6000", "-", "-"]


def test_same_labels_are_told_apart(two_runs, tmp_path, capsys):
    a, _ = two_runs
    assert main([str(a), str(a), "--out", str(tmp_path / "o"), "--json"]) == 0
    labels = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert labels == [f"runA [{a}]"] * 2


def test_missing_and_foreign_files_are_clear_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope.h5")]) == 2
    assert "run file not found" in capsys.readouterr().err
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    assert main([str(tmp_path / "other.h5")]) == 2
    assert "other.h5 is not an mpi_afl run file" in capsys.readouterr().err
    assert not any(tmp_path.glob("*.png"))


def test_help_describes_options(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for word in ("RUN.h5", "--out", "--target", "--json", "accuracy_vs_virtual_time.png"):
        assert word in text
