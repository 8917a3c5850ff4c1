"""The table of many runs (results.runs_table / evals_table, `mpi-afl export` runs.csv and runs_evals.csv) and
`mpi-afl report` on a real sweep: five short runs, two settings of FedBuff x two seeds and one AFL-DW run."""

import csv
import re
from pathlib import Path

import pytest

from mpi_afl import results
from mpi_afl.report import WIDTH, main as report_main
from mpi_afl.sweep import main as sweep_main
from mpi_helpers import FAST, export_without_torch

REPO = Path(__file__).resolve().parents[1]
pandas = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "sweep"
    short = ["--", *FAST, "--run.eval_every=2", "--max-versions", "6"]
    assert sweep_main(["--out", str(out), "--algorithms", "fedbuff", "--seeds", "0,1", "--set",
                       "server.lr=0.2,0.5", "--parallel", "2", *short]) == 0
    assert sweep_main(["--out", str(out), "--algorithms", "afl_dw", "--seeds", "0", *short]) == 0
    return out


def test_runs_table_has_one_row_per_run_with_the_settings_that_differ(sweep):
    df = results.runs_table(sweep, target=0.15).sort_values(["algorithm", "server.lr", "seed"])
    runs = {str(run.directory): run for run in results.load_many([sweep])}
    assert len(df) == 5 and set(df["run"]) == set(runs)
    assert df[["algorithm", "server.lr", "seed"]].values.tolist() == [
        ["afl_dw", 0.5, 0], ["fedbuff", 0.2, 0], ["fedbuff", 0.2, 1], ["fedbuff", 0.5, 0], ["fedbuff", 0.5, 1]]
    # the only config key that differs is server.lr: no run.seed / run.out (not settings), no equal keys
    assert [c for c in df.columns if "." in c and not c.startswith("algorithm_stats.")] == ["server.lr"]
    assert df["setting"].nunique() == 3
    assert df["setting"].iloc[1] == "fedbuff (server.buffer_size=4, server.lr=0.2, server.staleness=none)"
    for _, row in df.iterrows():
        run = runs[row["run"]]
        evals = run.tables["evals"]
        assert row["finished"] and row["stop_reason"] == "max_versions" and row["versions"] == 6
        assert row["final_accuracy"] == run.summary["final_accuracy"] == evals["test_accuracy"][-1]
        assert row["best_accuracy"] == run.summary["best_accuracy"]
        assert row["tail_accuracy"] == results.tail_accuracy(evals["virtual_time"], evals["test_accuracy"],
                                                             float(evals["virtual_time"][-1]))
        reached = results.time_to_target(evals["virtual_time"], evals["test_accuracy"], 0.15)
        assert row["virtual_time_to_target"] == reached or (reached is None and pandas.isna(row["virtual_time_to_target"]))
        for key in ("virtual_time", "wall_seconds", "updates_received", "updates_accepted", "updates_rejected",
                    "server_busy_fraction", "model_sha256"):
            assert row[key] == run.summary[key], key
        assert row["updates_per_second"] == pytest.approx(run.summary["updates_per_second"], rel=1e-12)
        assert row["evaluations"] == len(evals["version"]) == 3
    assert df["virtual_time_to_target"].notna().any() and df["virtual_time_to_target"].isna().any()
    # a pandas user's first question: mean final accuracy per setting
    means = df.groupby(["algorithm", "server.lr"])["final_accuracy"].mean()
    assert means[("fedbuff", 0.2)] == pytest.approx(df["final_accuracy"].iloc[1:3].mean())


def test_runs_table_columns_are_documented(sweep):
    """docs/design.md lists every column runs_table writes (config keys and algorithm_stats.* as patterns)."""
    text = (REPO / "docs" / "design.md").read_text()
    table = text[text.index("**runs_table**"):text.index("## Progress")]
    documented = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    fixed = [c for c in results.runs_table(sweep).columns if "." not in c]
    assert fixed == [c for c in documented if "<" not in c]   # in the table's order
    assert {"`<section>.<key>`", "`algorithm_stats.<key>`"} <= {f"`{c}`" for c in documented}


def test_evals_table_is_the_curves_in_long_form(sweep):
    df = results.evals_table(sweep)
    runs = results.load_many([sweep])
    assert len(df) == sum(len(r.tables["evals"]["version"]) for r in runs) == 15
    assert list(df.columns[:5]) == ["run", "setting", "algorithm", "seed", "server.lr"]
    for run in runs:
        mine = df[df["run"] == str(run.directory)]
        for column, values in run.tables["evals"].items():
            assert mine[column].tolist() == values.tolist(), column


def test_export_writes_the_table_of_all_runs_without_torch(sweep, tmp_path):
    done = export_without_torch([str(sweep), "--out", str(tmp_path), "--target", "0.15"])
    assert done.returncode == 0, done.stderr
    assert f"5 run(s) -> {tmp_path / 'runs.csv'}, {tmp_path / 'runs_evals.csv'}" in done.stdout
    with open(tmp_path / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    expected = results.runs_table(sweep, target=0.15)
    assert len(rows) == 5 and list(rows[0]) == list(expected.columns)
    assert [r["worker_idle_fraction"] for r in rows] == [""] * 5   # None: one process, no workers
    read = pandas.read_csv(tmp_path / "runs.csv")
    for column in ("final_accuracy", "tail_accuracy", "virtual_time_to_target", "server.lr", "wall_seconds"):
        assert read[column].equals(expected[column].astype(float)), column   # exact: floats as repr, None NaN
    assert read["seed"].tolist() == expected["seed"].tolist() and read["finished"].all()
    evals = pandas.read_csv(tmp_path / "runs_evals.csv")
    assert evals["test_accuracy"].tolist() == results.evals_table(sweep)["test_accuracy"].tolist()
    assert len(list(tmp_path.glob("*/evals.csv"))) == 5   # and each run's own tables, as before


def test_report_of_a_real_sweep_fits_120_columns(sweep, tmp_path, capsys):
    assert report_main([str(sweep), "--out", str(tmp_path), "--target", "0.15"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) > 10 and max(map(len, lines)) <= WIDTH, max(lines, key=len)
    # The duplicate run labels carry their directories, too long for a row: they are in the numbered key.
    assert "] fedbuff s0 [" in out and "setting  runs  reached" in out
    for label in ("fedbuff (server.buffer_size=4, server.lr=0.2, server.staleness=none)",
                  "afl_dw (server.lr=0.5, server.s_max=75)"):
        assert label in out
