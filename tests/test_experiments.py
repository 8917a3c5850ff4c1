"""Experiments as data (mpi_afl/experiment/): experiments/smoke end to end with real runs (sweep --experiment,
then report on the sweep directory and on its results.jsonl alone), and one clear line for bad input (in
process, and once from a launched `mpi-afl sweep`)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_afl import cli, experiment
from mpi_helpers import HANG_GUARD, REPO, env

SMOKE = REPO / "experiments" / "smoke" / "experiment.toml"


def mpi_afl(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpi_afl.cli", *args], capture_output=True, text=True, env=env(),
                          cwd=cwd, timeout=HANG_GUARD)


@pytest.mark.slow
def test_smoke_experiment_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    done = mpi_afl("sweep", "--experiment", str(SMOKE), "--out", str(out), "--parallel", "2")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "sweep: 6 runs, 0 already done, 6 to run" in done.stdout
    lines = done.stdout.splitlines()
    paired = [line for line in lines if line.startswith("fedbuff - fedasync, high, tail_accuracy: ")]
    assert len(paired) == 1 and " ± " in paired[0] and " points, fedbuff ahead on " in paired[0]
    assert " of 3 seeds, p = " in paired[0]
    assert any(line.startswith("fedbuff - fedasync, high: rule tail_accuracy >= +1.0 points") for line in lines)
    assert any(line.startswith("| FedBuff (B 4, sqrt discount, lr 0.5) | 3 | ") for line in lines)
    assert (out / "plots" / "accuracy_vs_virtual_time-high.png").is_file()

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in rows) == [(m, s) for m in ("fedasync", "fedbuff") for s in range(3)]
    for row in rows:
        run = out / row["run"]
        assert row["config_sha256"] == hashlib.sha256((run / "config.toml").read_bytes()).hexdigest()
        assert row["package_version"] and row["commit"] and len(row["commit"]) == 40
        assert row["eval_every_time"] == 1.0 and row["evals"]["virtual_time"][:2] == [1.0, 2.0]
        summary = json.loads((run / "summary.json").read_text())
        assert row["final_accuracy"] == summary["final_accuracy"]
        config = (run / "config.toml").read_text()
        assert 'schedule = "high"' in config and "max_virtual_time = 8.0" in config

    again = mpi_afl("sweep", "--experiment", str(SMOKE), "--out", str(out))   # resumable: nothing to run
    assert again.returncode == 0 and "6 already done, 0 to run" in again.stdout

    # The committed form: the rows and the experiment.toml beside them, no run directories.
    alone = tmp_path / "committed"
    alone.mkdir()
    (alone / "results.jsonl").write_text((out / "results.jsonl").read_text())
    (alone / "experiment.toml").write_text(SMOKE.read_text())
    from_rows = mpi_afl("report", str(alone / "results.jsonl"))
    assert from_rows.returncode == 0, from_rows.stderr
    from_runs = mpi_afl("report", str(out))
    assert from_rows.stdout == from_runs.stdout            # the same tables from the rows alone
    assert (alone / "plots" / "accuracy_vs_virtual_time-high.png").is_file()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BASE = """[experiment]
seeds = [0]
preset = "quickstart"
[cells.a]
data.alpha = 0.5
[methods.m]
algorithm = "fedbuff"
"""


@pytest.mark.parametrize("extra, message", [
    ("server.lrr = 1\n", "cell a, method m: "),                       # a typo in a method's key
    ("[comparisons]\n", "must be"),                                    # not an array of tables
    ("[[comparisons]]\na = \"m\"\nb = \"x\"\n", "a and b must name methods"),
    ("[metrics]\nnames = [\"time_to_target\"]\n", "needs target"),
    ("[bogus]\n", "unknown table(s) bogus"),
])
def test_bad_experiment_file_is_one_line(tmp_path, capsys, extra, message):
    path = write(tmp_path / "experiment.toml", BASE + extra)
    with pytest.raises(experiment.ExperimentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        experiment.load_experiment(path)
    assert cli.main(["sweep", "--experiment", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sweep: error: ") and message in err


@pytest.mark.slow
def test_bad_experiment_file_is_one_line_from_the_command_line(tmp_path):
    path = write(tmp_path / "experiment.toml", BASE + "server.lrr = 1\n")
    done = mpi_afl("sweep", "--experiment", str(path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("sweep: error: ")
    assert "cell a, method m: " in done.stderr


def test_points_follow_cells_methods_and_seeds(tmp_path):
    path = write(tmp_path / "experiment.toml", BASE + """server.lr = 0.25
[methods.n]
algorithm = "afl_dw"
seeds = [7]
[cells.b]
data.alpha = 0.1
delays.schedule = "high"
methods = ["m"]
seeds = [1, 2]
[settings]
run.max_virtual_time = 3.0
""")
    e = experiment.load_experiment(path)
    assert [(p.cell, p.method, p.seed) for p in e.points()] == [("a", "m", 0), ("a", "n", 7), ("b", "m", 1),
                                                                ("b", "m", 2)]
    args = e.points()[2].train_args(Path("OUT"), ["--run.threads=1"])
    assert args == ["--run.threads=1", "--preset", "quickstart", "--run.max_virtual_time=3.0", "--data.alpha=0.1",
                    "--delays.schedule=high", "--server.algorithm=fedbuff", "--server.lr=0.25", "--seed", "1",
                    "--out", "OUT/b/m/s1"]


def test_an_out_of_another_experiment_is_refused(tmp_path):
    first = write(tmp_path / "one.toml", BASE)
    second = write(tmp_path / "two.toml", BASE.replace("alpha = 0.5", "alpha = 0.1"))
    experiment.prepare(experiment.load_experiment(first), tmp_path / "out")
    with pytest.raises(experiment.ExperimentError, match="another experiment definition"):
        experiment.prepare(experiment.load_experiment(second), tmp_path / "out")
    text_only = write(tmp_path / "three.toml", BASE.replace("[experiment]", "[experiment]\nquestion = \"why\""))
    experiment.prepare(experiment.load_experiment(text_only), tmp_path / "out")   # wording may change


def test_sweep_help_shows_experiment(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["sweep", "--help"])
    assert done.value.code == 0 and "--experiment FILE" in capsys.readouterr().out
