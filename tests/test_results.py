"""mpi_afl.results on a real run directory: arrays, decoded codes, units in the file, exports without
torch, the run directory's own record (config.toml, command.txt, server.log) and the progress lines."""

import csv
import json

import h5py
import numpy as np
import pytest

from mpi_afl import export, paired_test, results
from mpi_afl.config import parse_args
from mpi_afl.storage.runlog.schema import COLUMN_DOCS, TABLES
from mpi_helpers import export_without_torch



@pytest.fixture
def run_dir(finished_runs):
    """20 FedBuff versions, job 2's update rejected as non-finite, heartbeats (tests/runs.py): shared, read only."""
    return finished_runs("one_rejected").out


def test_load_gives_arrays_decoded_codes_and_units(run_dir):
    run = results.load(run_dir)
    assert run.directory == run_dir and run.label == "fedbuff s0"
    arrivals = run.tables["arrivals"]
    assert set(arrivals) == {name for name, _ in TABLES["arrivals"]}
    assert sorted(set(arrivals["reason"].tolist())) == ["none", "nonfinite"]
    assert (arrivals["reason"] == "nonfinite").sum() == 1 and not arrivals["accepted"][arrivals["reason"] != "none"].any()
    assert run.tables["timings"]["phase"].dtype.kind == "U"
    assert run.units["arrivals"]["virtual_time"] == "vt" and run.units["evals"]["wall_time"] == "s"
    assert run.summary["versions"] == 20 and run.config["run"]["max_versions"] == 20
    # one definition of updates/s: the report's value from run.h5 is summary.json's
    assert results.run_updates_per_second(run) == pytest.approx(run.summary["updates_per_second"], rel=1e-12)


def test_every_column_carries_unit_and_description_in_the_file(run_dir):
    with h5py.File(run_dir / "run.h5", "r", swmr=True) as f:
        for table, fields in TABLES.items():
            for column, _ in fields:
                assert f[table].attrs[f"{column}_unit"] == COLUMN_DOCS[table][column][0]
                assert len(f[table].attrs[f"{column}_description"]) > 10, (table, column)


@pytest.mark.slow
def test_export_csv_without_torch(run_dir, tmp_path):
    done = export_without_torch([str(run_dir), "--out", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    run = results.load(run_dir)
    with open(tmp_path / run_dir.name / "evals.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["test_accuracy"]) for r in rows] == run.tables["evals"]["test_accuracy"].tolist()
    with open(tmp_path / run_dir.name / "arrivals.csv") as fh:
        reasons = [r["reason"] for r in csv.DictReader(fh)]
    assert reasons == run.tables["arrivals"]["reason"].tolist()
    with open(tmp_path / run_dir.name / "columns.csv") as fh:
        columns = list(csv.DictReader(fh))
    assert len(columns) == sum(len(fields) for fields in TABLES.values())
    (row,) = [c for c in columns if (c["table"], c["column"]) == ("evals", "virtual_time")]
    assert row["unit"] == "vt" and row["description"] == COLUMN_DOCS["evals"]["virtual_time"][1]


def test_frame_with_pandas(run_dir):
    pytest.importorskip("pandas")
    df = results.load(run_dir).frame("arrivals")
    received = results.load(run_dir).summary["updates_received"]
    assert len(df) == received and df.attrs["units"]["wall_time"] == "s"
    assert df.groupby("reason").size().to_dict() == {"none": received - 1, "nonfinite": 1}


def test_export_tensorboard(run_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert export.main([str(run_dir), "--out", str(tmp_path), "--format", "tensorboard"]) == 0
    acc = EventAccumulator(str(tmp_path / run_dir.name))
    acc.Reload()
    events = acc.Scalars("test/accuracy")
    run = results.load(run_dir)
    assert [e.step for e in events] == run.tables["evals"]["version"].tolist()
    assert [e.value for e in events] == pytest.approx(run.tables["evals"]["test_accuracy"].tolist())
    virtual = acc.Scalars("time/virtual_time")   # virtual time as a scalar of the version step, not a tag hack
    assert [e.step for e in virtual] == [e.step for e in events]
    assert [e.value for e in virtual] == pytest.approx(run.tables["evals"]["virtual_time"].tolist())


def test_run_directory_records_how_it_was_made(run_dir):
    cfg, _ = parse_args(["--config", str(run_dir / "config.toml")])
    stored = results.load(run_dir).config
    stored["run"]["out"] = cfg.run.out   # left out of config.toml so a rerun gets its own directory
    assert cfg.to_dict() == stored
    command = (run_dir / "command.txt").read_text()
    assert "mpi_afl.train" in command and "--fault.kind=nan" in command
    log = (run_dir / "server.log").read_text()
    assert "[server] done (max_versions)" in log and "rejected update: job 2" in log


def test_progress_lines_show_total_eta_and_heartbeat(run_dir):
    log = (run_dir / "server.log").read_text()
    assert "\r" not in log
    lines = [line for line in log.splitlines() if " INFO [server] version " in line]
    assert any("20/20" in line and "100%" in line and "ETA 0:00:00" in line for line in lines), lines
    assert all("/20" in line and "ETA " in line for line in lines), lines
    assert any("heartbeat" in line for line in lines), lines


def test_group_by_setting_and_mean_std(run_dir):
    run = results.load(run_dir)
    other = results.load(run_dir)
    other.config = json.loads(json.dumps(run.config))
    other.config["run"]["seed"] = 5
    third = results.load(run_dir)
    third.config = json.loads(json.dumps(run.config))
    third.config["server"]["lr"] = 0.1
    groups = results.group_by_setting([run, other, third])
    assert [len(g.runs) for g in groups] == [2, 1]
    assert [g.label for g in groups] == [f"fedbuff (server.buffer_size=4, server.lr={lr}, server.staleness=none)"
                                         for lr in (0.5, 0.1)]
    # FedBuff reads no echo key, so an echo default that changed between runs keeps them one setting ...
    other.config["echo"]["kd_step"] = 0.3
    assert [len(g.runs) for g in results.group_by_setting([run, other])] == [2]
    # ... and a seed still running is listed but left out of the setting's statistics.
    assert run.finished
    other.summary = None
    (group,) = results.group_by_setting([run, other])
    assert group.runs == [run] and group.left_out == [other]
    other.summary = {"stop_reason": "signal"}
    assert results.group_by_setting([run, other])[0].left_out == [other]
    assert [len(g.runs) for g in results.group_by_setting([other])] == [1]   # live runs alone: all counted
    mean, std = results.mean_std([0.5, 0.7, None])
    assert mean == pytest.approx(0.6) and std == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_table_rows_of_a_finished_and_a_live_run(run_dir):
    """A run without summary.json (live or killed) has its run.h5 metrics and None for summary.json's columns."""
    run, live = results.load(run_dir), results.load(run_dir)
    live.config = json.loads(json.dumps(run.config))
    live.config["server"]["lr"] = 0.1
    live.summary = None
    done, going = results.table_rows([run, live])
    assert list(done) == list(going) and (done["server.lr"], going["server.lr"]) == (0.5, 0.1)
    assert done["finished"] and done["versions"] == 20 and done["stop_reason"] == "max_versions"
    assert not going["finished"] and going["versions"] is going["stop_reason"] is going["wall_seconds"] is None
    assert going["final_accuracy"] == done["final_accuracy"] == run.summary["final_accuracy"]
    assert (done["updates_received"], done["updates_rejected"]) == (run.summary["updates_received"], 1)
    assert going["setting"] == "fedbuff (server.buffer_size=4, server.lr=0.1, server.staleness=none)"


def test_defining_keys_and_section_readers_name_built_in_algorithms_and_real_keys():
    from mpi_afl.names import ALGORITHMS
    assert set(ALGORITHMS) == set(results.DEFINING_KEYS)
    assert all(readers <= set(ALGORITHMS) for readers in results.SECTION_READERS.values())
    config = parse_args([])[0].to_dict()
    for algorithm, keys in results.DEFINING_KEYS.items():
        for key in keys:   # a config key, in a section the algorithm reads
            section, name = key.split(".")
            assert name in config[section], (algorithm, key)
            assert algorithm in results.SECTION_READERS.get(section, {algorithm}), (algorithm, key)


def test_missing_or_foreign_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="without a run.h5"):
        results.load(tmp_path)
    assert export.main([str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2


def test_tail_accuracy_and_time_to_target():
    t, acc = [1.0, 2.0, 3.0, 4.0], [0.2, 0.5, 0.4, 0.7]
    assert results.tail_accuracy(t, acc, budget=4.0) == pytest.approx(0.55)   # evaluations at t >= 3
    assert results.tail_accuracy(t, acc, budget=40.0) is None
    assert results.time_to_target(t, acc, 0.45) == 2.0 and results.time_to_target(t, acc, 0.9) is None


# Reference values: scipy.stats.t and scipy.special.betainc (scipy 1.17), written down so the test needs no scipy.
@pytest.mark.parametrize("t, df, cdf", [(2.0, 4, 0.9419417382415922), (0.5, 1, 0.6475836176504333),
                                        (3.1, 9, 0.993638772010899), (-1.2, 2, 0.17650168038968475),
                                        (10.0, 3, 0.9989358004707929), (1.96, 1000, 0.9748634075221256),
                                        (0.0, 5, 0.5)])
def test_student_t_cdf_matches_known_values(t, df, cdf):
    assert paired_test.student_t_cdf(t, df) == pytest.approx(cdf, rel=1e-10, abs=1e-13)


def test_regularized_beta_matches_known_values():
    assert paired_test.regularized_beta(2.5, 0.5, 0.3) == pytest.approx(0.018927124071945658, rel=1e-10)
    assert paired_test.regularized_beta(0.5, 0.5, 0.9) == pytest.approx(0.7951672353008665, rel=1e-10)
    assert paired_test.regularized_beta(3.0, 2.0, 0.0) == 0.0 and paired_test.regularized_beta(3.0, 2.0, 1.0) == 1.0


def test_paired_comparison_is_the_paired_t_test():
    a = {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.5, 4: 0.4, 9: 0.9}
    b = {0: 0.0, 1: 0.1, 2: 0.25, 3: 0.2, 4: 0.1, 5: 0.3}   # seeds 5 and 9 have one side only
    c = paired_test.paired_comparison(a, b)
    assert c["seeds"] == [0, 1, 2, 3, 4]
    assert c["positive"] == 4 and c["negative"] == 1
    assert c["mean"] == pytest.approx(0.17)
    assert c["p_value"] == pytest.approx(0.062449600206163, rel=1e-9)   # scipy.stats.ttest_rel
    assert paired_test.paired_comparison({0: 1.0}, {0: 0.5})["p_value"] is None
    assert paired_test.paired_comparison({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})["p_value"] == 0.0
    assert paired_test.paired_comparison({0: 1.0}, {1: 1.0}) is None
