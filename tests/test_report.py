"""`python -m mpi_afl.report`: PNGs, summary numbers and errors, on two hand-made run files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import matplotlib
import pytest

from mpi_afl.report import PLOT_FILES, main
from mpi_afl.storage.runlog import RunLog
from mpi_afl.storage.runlog.schema import REJECT_REASONS
from mpi_helpers import HANG_GUARD, REPO
REJECTED = next(name for name in REJECT_REASONS if name != "none")


def write_run(path: Path, attrs: dict, arrivals: list[tuple], evals: list[tuple]) -> None:
    """arrivals: (wall_time, client, staleness, accepted); evals: (version, wall_time, virtual_time, accuracy)."""
    with RunLog(path, attrs) as log:
        for i, (wall, client, staleness, accepted) in enumerate(arrivals):
            log.arrival(wall_time=wall, virtual_time=2 * wall, client=client, rank=1, job=i, base_version=0,
                        version=i, staleness=staleness, weight=1.0, loss=0.5, samples=10, bytes=100,
                        server_seconds=1e-3, compute_seconds=0.01, accepted=accepted,
                        reason="none" if accepted else REJECTED)
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
    # Run B: no label attribute -> "<algorithm> s<seed>"; never reaches 0.5.
    write_run(b, {"config": {"server": {"algorithm": "fedasync"}, "run": {"seed": 7}}},
              [(1.0, 0, 0, True), (2.0, 1, 5, True), (5.0, 0, 1, True)],
              [(0, 0.0, 0.0, 0.2), (3, 5.0, 9.0, 0.45)])
    return a, b


def test_report_cli_writes_plots_and_summary(tmp_path, two_runs):
    out = tmp_path / "plots"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "mpi_afl.report", *map(str, two_runs), "--out", str(out),
                           "--target", "0.5", "--json"], capture_output=True, text=True, env=env, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 10_000, name  # axes, curves and legend, not an empty canvas
    lines = done.stdout.splitlines()
    runs_table = lines[:lines.index("")]   # then a blank line and the per-setting table
    table = [line.split() for line in runs_table]
    assert table[0] == ["run", "final_acc", "best_acc", "virt_to_target", "wall_to_target", "accepted",
                        "updates/s", "mean_stale", "max_stale", "rejected"]
    assert table[1] == ["runA", "0.5500", "0.6000", "10.00", "2.00", "8", "2.0", "1.50", "3", "2"]
    # "fedasync s7" (algorithm and seed, as run/provenance.py labels runs): 3 accepted over 5 s, staleness 0, 5, 1.
    assert table[2] == ["fedasync", "s7", "0.4500", "0.4500", "-", "-", "3", "0.6", "2.00", "5", "0"]
    assert len({len(line) for line in runs_table}) == 1  # aligned columns
    rows = [json.loads(line) for line in lines if line.startswith('{"run"')]
    assert [r["label"] for r in rows] == ["runA", "fedasync s7"]
    assert rows[0]["virtual_time_to_target"] == 10.0 and rows[0]["updates_per_second"] == 2.0
    assert rows[1]["wall_time_to_target"] is None and rows[1]["target"] == 0.5
    assert rows[1]["max_staleness"] == 5 and rows[1]["updates_rejected"] == 0


def test_default_out_dir_and_no_target(two_runs, capsys):
    a, _ = two_runs
    assert main([str(a)]) == 0
    assert all((a.parent / name).stat().st_size > 10_000 for name in PLOT_FILES)
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:5] == ["runA", "0.5500", "0.6000", "-", "-"]


def test_same_labels_are_told_apart(two_runs, tmp_path, capsys):
    a, _ = two_runs
    assert main([str(a), str(a), "--out", str(tmp_path / "o"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["label"] for r in rows if "label" in r] == [f"runA [{a.parent}]"] * 2
    assert [(r["setting"], r["runs"]) for r in rows if "setting" in r] == [("fedbuff", 2)]   # same config


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
    for word in ("RUN", "--out", "--target", "--json", "--format", "accuracy_vs_virtual_time.png"):
        assert word in text


def _seed_runs(root: Path) -> list[Path]:
    """Three seeds of two algorithms as run directories: accuracy = base + 0.1 * seed at virtual 0, 10, 20."""
    dirs = []
    for algorithm, base in (("fedbuff", 0.5), ("afl_dw", 0.6)):
        for seed in range(3):
            d = root / f"{algorithm}-s{seed}"
            d.mkdir(parents=True)
            acc = base + 0.1 * seed
            write_run(d / "run.h5", {"config": {"server": {"algorithm": algorithm, "lr": 0.5},
                                                "run": {"seed": seed, "out": str(d)}}},
                      [(1.0 + seed, 0, 1, True), (2.0 + seed, 1, 2, True)],
                      [(0, 0.0, 0.0, acc - 0.3), (5, 1.0 + seed, 10.0, acc - 0.1), (10, 2.0 + seed, 20.0, acc)])
            dirs.append(d)
    return dirs


def test_seeds_of_a_setting_become_mean_std_bands(tmp_path, capsys):
    from mpi_afl.report import band, plot_accuracy
    from mpi_afl.results import group_by_setting, load_many
    _seed_runs(tmp_path / "sweep")
    groups = group_by_setting(load_many([tmp_path / "sweep"]))   # a directory of runs
    # every label names the algorithm's defining keys in full, here server.lr (afl_dw's s_max is not in the files)
    assert [(g.label, len(g.runs)) for g in groups] == [("afl_dw (server.lr=0.5)", 3), ("fedbuff (server.lr=0.5)", 3)]
    times, mean, std = band(groups[1].runs, "virtual")
    assert times.tolist() == [0.0, 10.0, 20.0]
    assert mean.tolist() == pytest.approx([0.3, 0.5, 0.6]) and std.tolist() == pytest.approx([0.1] * 3)
    ax = plot_accuracy(groups, "virtual", None).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "afl_dw (server.lr=0.5): mean ± std of 3 runs", "fedbuff (server.lr=0.5): mean ± std of 3 runs"]
    # one band per setting, told apart by its hatch and outlined in its curve's colour, not filled
    bands, lines = ax.collections, ax.get_lines()
    assert len(bands) == 2 and len({b.get_hatch() for b in bands}) == 2 and all(b.get_hatch() for b in bands)
    assert all(b.get_facecolor().size == 0 for b in bands)   # facecolor "none"
    assert [tuple(b.get_edgecolor()[0][:3]) for b in bands] == [matplotlib.colors.to_rgb(l.get_color()) for l in lines]
    assert len({l.get_marker() for l in lines}) == 2 and "None" not in {l.get_marker() for l in lines}

    out = tmp_path / "plots"
    assert main([*map(str, sorted((tmp_path / "sweep").iterdir())), "--out", str(out), "--format", "png,pdf,svg",
                 "--target", "0.65", "--json"]) == 0
    for name in PLOT_FILES:
        stem = name[:-4]
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in (out / f"{stem}.svg").read_bytes()[:1000]
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    settings = {r["setting"]: r for r in map(json.loads, capsys.readouterr().out.splitlines()[-2:])}
    fedbuff = settings["fedbuff (server.lr=0.5)"]
    assert fedbuff["runs"] == 3 and fedbuff["final_accuracy_mean"] == pytest.approx(0.6)
    assert fedbuff["final_accuracy_std"] == pytest.approx(0.1)
    assert fedbuff["reached"] == 1 and fedbuff["virtual_time_to_target_mean"] == 20.0   # only seed 2 got there
    assert settings["afl_dw (server.lr=0.5)"]["reached"] == 2   # 0.6 (seed 0) stays below 0.65


def test_bad_format_is_refused(two_runs, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(two_runs[0]), "--format", "jpg"])
    assert stop.value.code == 2 and "unknown format(s) ['jpg']" in capsys.readouterr().err


def test_legends_name_the_algorithm_and_its_settings_in_full(tmp_path):
    """A FedBuff beside an AFL-DW of the same server.lr: each entry still says which FedBuff it is (its
    defining keys), and a key that differs (client.lr) is named with its section."""
    from mpi_afl.report import plot_accuracy, plot_participation, plot_staleness
    from mpi_afl.results import group_by_setting, load_many
    server = {"buffer_size": 4, "lr": 0.5, "staleness": "sqrt", "s_max": 75.0}
    for algorithm, client_lr in (("fedbuff", 0.01), ("afl_dw", 0.05)):
        (tmp_path / algorithm).mkdir()
        write_run(tmp_path / algorithm / "run.h5",
                  {"config": {"server": {"algorithm": algorithm, **server}, "client": {"lr": client_lr},
                              "run": {"seed": 3}}},
                  [(1.0, 0, 1, True)], [(0, 0.0, 0.0, 0.1), (5, 1.0, 10.0, 0.5)])
    groups = group_by_setting(load_many([tmp_path]))
    wanted = ["afl_dw (client.lr=0.05, server.lr=0.5, server.s_max=75), seed 3",
              "fedbuff (client.lr=0.01, server.buffer_size=4, server.lr=0.5, server.staleness=sqrt), seed 3"]
    for fig in (plot_accuracy(groups, "virtual", None), plot_participation(groups)):
        ax = fig.axes[0]
        assert [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()] == wanted   # wrapped
        assert [line.get_marker() for line in ax.get_lines()] == ["o", "s"]   # one marker per setting
        assert not ax.collections   # single runs: no band
    texts = [t.get_text().replace("\n", " ") for t in plot_staleness(groups).axes[0].get_legend().get_texts()]
    assert texts == [f"{w} (1 accepted)" for w in wanted]


def test_tables_fit_120_columns():
    """Long setting names move into a numbered key (wrapped), and columns that still do not fit are split
    into blocks that repeat the numbers; a table that fits is printed as it is."""
    from mpi_afl.report import WIDTH, _table, format_group_table
    long = "fedrevive (" + ", ".join(f"distill.key_{i}={i}" for i in range(12)) + ")"
    line = {"setting": long, "runs": 3, "unfinished_left_out": 2, "reached": 3,
            **{f"{key}_{stat}": 123.456 for key in ("final_accuracy", "best_accuracy", "virtual_time_to_target",
                                                    "wall_time_to_target", "updates_per_second", "mean_staleness")
               for stat in ("mean", "std")}}
    text = format_group_table([line, {**line, "setting": "fedbuff"}])
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH
    key = text[:text.index("\nsetting")]
    assert key.startswith("[1] fedrevive (") and "\n[2] fedbuff" in key
    assert " ".join(key.split()).startswith(f"[1] {long} [2]")   # the whole name, wrapped
    rows = [row for row in lines[key.count(chr(10)) + 1:] if row.startswith("[")]
    assert [row.split()[0] for row in rows] == ["[1]", "[2]"] * (len(rows) // 2)
    assert "3 (+2 unfinished)" in text and text.count("123.4560 ± 123.4560") == 4

    header = ["run", *(f"column_{i}" for i in range(20))]
    cells = [["a", *(f"{i}.000" for i in range(20))]]
    split = _table(header, cells)
    assert max(map(len, split.splitlines())) <= WIDTH and "\n\n" in split
    assert all(name in split for name in header) and split.count("[1]") >= 3   # key and every block
    assert _table(["run", "x"], [["a", "1"]]) == "run  x\na    1"
