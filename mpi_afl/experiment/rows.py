"""Result rows: one per finished run of an experiment, with its metrics and diagnostics (DIR/results.jsonl)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import results
from .definition import Experiment, ExperimentError, Point

# algorithm_stats of summary.json copied into a row (FedRevive's and FedEcho's diagnostics; README "Outputs").
DIAGNOSTICS = ("kd_applied", "kd_norm_ratio", "kd_cosine", "kd_loss_change", "kd_loss_improved", "synth_agreement",
               "echo_target_agreement", "distill_seconds")
RESULTS_FILE = "results.jsonl"


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_row(experiment: Experiment, point: Point, out: Path) -> dict | None:
    """The result row of one finished run (None when it has not met its stop rule)."""
    from ..sweep import state, usage_path
    directory = point.directory(out)
    if state(directory) != "done":
        return None
    run = results.load(directory)
    evals = run.tables["evals"]
    times, accuracy = evals["virtual_time"].tolist(), evals["test_accuracy"].tolist()
    budget = results.budget(run)
    summary = run.summary or {}
    stats = summary.get("algorithm_stats", {})
    usage = usage_path(directory)
    return {
        "experiment": experiment.name, "cell": point.cell, "method": point.method, "seed": point.seed,
        "algorithm": run.value("server.algorithm"),
        "commit": run.attrs.get("git_commit") or None, "package_version": run.attrs.get("package_version"),
        "config_sha256": _sha256(directory / "config.toml"),
        "final_accuracy": summary.get("final_accuracy"), "best_accuracy": summary.get("best_accuracy"),
        "tail_accuracy": results.tail_accuracy(times, accuracy, budget, experiment.tail_share),
        "target": experiment.target,
        "time_to_target": (results.time_to_target(times, accuracy, experiment.target)
                           if experiment.target is not None else None),
        "eval_every_time": run.value("run.eval_every_time"), "budget": budget,
        **{k: stats.get(k) for k in DIAGNOSTICS},
        "versions": summary.get("versions"), "updates_accepted": summary.get("updates_accepted"),
        "virtual_time": summary.get("virtual_time"), "stop_reason": summary.get("stop_reason"),
        "wall_seconds": summary.get("wall_seconds"),
        "cpu_seconds": json.loads(usage.read_text())["cpu_seconds"] if usage.is_file() else None,
        "run": str(directory.relative_to(out)) if directory.is_relative_to(out) else str(directory),
        "evals": {"virtual_time": [round(t, 6) for t in times], "test_accuracy": [round(a, 6) for a in accuracy]},
    }


def collect(experiment: Experiment, out: Path) -> tuple[list[dict], int]:
    """The rows of the finished runs under `out`, and how many of the experiment's runs are not finished."""
    rows = [run_row(experiment, p, out) for p in experiment.points()]
    return [r for r in rows if r is not None], sum(r is None for r in rows)


def write_rows(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ExperimentError(f"{path}:{n}: not a JSON line: {e}") from None
    missing = [n for n, r in enumerate(rows, 1) if not {"cell", "method", "seed"} <= set(r)]
    if missing:
        raise ExperimentError(f"{path}: row(s) {missing[:5]} lack cell, method or seed: not an experiment's rows")
    return rows
