"""mpi_afl.sweep: a small local grid run in parallel, resumed, summarised; the SLURM array script."""

import json
import subprocess

import pytest

from mpi_afl.sweep import Point, grid, main, slurm_script, state
from mpi_helpers import FAST

def test_grid_order_and_directories(tmp_path):
    points = grid(["fedbuff", "afl_dw"], [0, 1], ["server.lr=0.1,0.5"])
    assert len(points) == 8 and points[0] == Point("fedbuff", (("server.lr", "0.1"),), 0)
    assert points[1].directory(tmp_path) == tmp_path / "fedbuff-lr=0.1" / "s1"
    assert "--server.lr=0.5" in points[2].train_args(tmp_path, [])


@pytest.mark.slow
def test_local_sweep_runs_resumes_and_prints_mean_std(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--algorithms", "fedbuff,fedasync", "--seeds", "0,1", "--parallel", "2",
            "--", *FAST, "--max-versions", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 already done, 4 to run" in out
    # the full setting names are too wide for a row of the table: a numbered key above it (runs found in name order)
    assert "[1] fedasync (server.mixing=0.6, server.staleness=none)\n[2] fedbuff (server.buffer_size=4, " in out
    table = out[out.index("setting  runs"):].splitlines()
    assert [line.split()[:3] for line in table[1:]] == [["[1]", "2", "-"], ["[2]", "2", "-"]]
    assert "±" in table[1]
    summaries = {p: json.loads((p / "summary.json").read_text()) for p in tmp_path.glob("*/s?")}
    assert len(summaries) == 4 and {s["versions"] for s in summaries.values()} == {4}
    usage = json.loads((tmp_path / "fedbuff" / "s0.usage.json").read_text())
    assert usage["cpu_seconds"] > 0 and usage["launches"] == 1

    # Interrupted sweep: one run lost its summary (it has its checkpoint): only it runs again, resumed.
    lost = tmp_path / "fedasync" / "s1"
    before = summaries[lost]["model_sha256"]
    (lost / "summary.json").unlink()
    assert main(args) == 0
    assert "4 runs, 3 already done, 1 to run" in capsys.readouterr().out
    assert "--resume" in (tmp_path / "logs" / "fedasync-s1.log").read_text()
    assert json.loads((lost / "summary.json").read_text())["model_sha256"] == before
    assert json.loads((tmp_path / "fedasync" / "s1.usage.json").read_text())["launches"] == 2   # CPU of both

    # A finished run whose run.h5 was damaged is named in one line and run again from the start (the
    # virtual clock repeats it exactly); the table then reads every run.
    damaged = tmp_path / "fedbuff" / "s1"
    log = damaged / "run.h5"
    log.write_bytes(log.read_bytes()[:4096])
    assert state(damaged) == "damaged"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"sweep: {damaged} finished but is damaged (run log {log}" in out and "1 to run" in out
    assert json.loads((damaged / "summary.json").read_text())["model_sha256"] == summaries[damaged]["model_sha256"]
    assert state(damaged) == "done" and "±" in out[out.index("setting"):]


def test_state_resumes_a_run_stopped_by_a_signal(tmp_path):
    assert state(tmp_path) == "start"
    (tmp_path / "summary.json").write_text(json.dumps({"stop_reason": "signal"}))
    assert state(tmp_path) == "start"       # stopped before its first checkpoint: nothing to resume
    (tmp_path / "checkpoint.h5").touch()
    assert state(tmp_path) == "resume"
    (tmp_path / "summary.json").write_text(json.dumps({"stop_reason": "signal"}))
    assert state(tmp_path) == "resume"      # pre-empted: its summary is not a result
    (tmp_path / "summary.json").write_text(json.dumps({"stop_reason": "max_versions"}))
    assert state(tmp_path) == "damaged"     # finished, but no readable run.h5 to report from
    (tmp_path / "summary.json").write_text("{truncated")
    assert state(tmp_path) == "damaged"


def test_slurm_script_lists_every_point(tmp_path):
    points = grid(["fedbuff", "examples.custom_algorithm:ClippedAsync"], [0, 1, 2], [])
    text = slurm_script(points, tmp_path, ["--preset", "quickstart"], ranks=5, time_limit="01:00:00", parallel=4)
    assert "#SBATCH --array=0-5%4" in text and "#SBATCH --ntasks=5" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    # Task 4's arguments, as the script expands them (everything up to the exec line, then print them).
    probe = text.split("exec ")[0] + 'printf "%s\\n" "${DIRS[$SLURM_ARRAY_TASK_ID]}" "$@"\n'
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True,
                          env={"SLURM_ARRAY_TASK_ID": "4", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(tmp_path / "ClippedAsync" / "s1")
    assert lines[1:] == ["--preset", "quickstart", "--algorithm", "examples.custom_algorithm:ClippedAsync",
                         "--seed", "1", "--out", lines[0]]


def test_bad_set_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path), "--algorithms", "fedbuff", "--set", "lr=0.1"])
    assert stop.value.code == 2
    assert "expected section.key=VALUE" in capsys.readouterr().err


def test_version_budget_over_different_buffer_sizes_warns(tmp_path, capsys):
    from mpi_afl.sweep import grid as make_grid, unequal_work
    points = make_grid(["fedbuff", "afl_dw"], [0], [])
    line = unequal_work(points, tmp_path, ["--max-versions", "20"])
    assert "afl_dw 1, fedbuff 4" in line and "--run.max_updates" in line
    assert unequal_work(points, tmp_path, ["--run.max_updates=80"]) == ""
    assert unequal_work(make_grid(["fedasync", "afl_dw"], [0], []), tmp_path, ["--max-versions", "20"]) == ""
    axis = unequal_work(make_grid(["fedbuff"], [0], ["server.buffer_size=1,8"]), tmp_path, ["--max-versions", "20"])
    assert "fedbuff 1, fedbuff 8" in axis
    assert main(["--out", str(tmp_path), "--algorithms", "fedbuff,afl_dw", "--slurm", str(tmp_path / "a.sbatch"),
                 "--", "--max-versions", "20"]) == 0
    assert "unequal work" in capsys.readouterr().err
