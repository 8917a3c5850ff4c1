"""Experiments as data: one experiment.toml per research question (experiments/README.md).

    mpi-afl sweep --experiment experiments/smoke/experiment.toml --out DIR [--parallel N] [--slurm FILE]
    mpi-afl report DIR                                  # tables, DIR/results.jsonl, plots
    mpi-afl report experiments/smoke/results.jsonl      # the same tables from the committed rows alone

experiment.toml:

    [experiment]
    name = "smoke"
    question = "..."                 # the research question, one sentence
    preset = "quickstart"            # every run starts from it
    seeds = [0, 1, 2]

    [settings]                       # config keys for every run, as in a preset: sections and keys
    run.max_virtual_time = 10.0

    [cells.A]                        # a cell: the keys that set the conditions (data, delays, budget)
    label = "alpha 0.5, paper delays"
    data.alpha = 0.5
    # optional: methods = ["fedbuff", ...] (default: every method), seeds = [...] (default: the experiment's)

    [methods.fedbuff]                # a method: its algorithm and its full settings
    label = "FedBuff (B 4, lr 0.5)"
    algorithm = "fedbuff"
    server.buffer_size = 4
    # optional: seeds = [...]

    [metrics]
    names = ["final_accuracy", "best_accuracy", "tail_accuracy", "time_to_target"]
    target = 0.8                     # time_to_target: first evaluation at or above it (virtual time)
    tail_share = 0.25                # tail_accuracy: mean of the evaluations in the last quarter of the budget

    [[comparisons]]                  # registered before the runs
    a = "fedrevive"
    b = "afl_dw"
    metrics = ["final_accuracy", "tail_accuracy"]    # default: [metrics] names
    cells = ["A"]                                    # default: every cell that has both
    rule = { metric = "tail_accuracy", min_difference = 0.01, min_ahead = 4 }   # optional: the success rule

A run's options are, in order (the last wins): the preset, [settings], the cell's keys, the method's keys,
then --seed and --out. Runs go to DIR/<cell>/<method>/s<seed>. The sweep copies experiment.toml into DIR
(a DIR holding another experiment's runs is refused), so `mpi-afl report DIR` knows it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import results
from .config import ConfigError, parse_args
from .config.parsing import flatten_toml, tomllib
from .config.schema import toml_value

# Row fields the tables can show; differences of the accuracies are in points (x 100).
METRICS = ("final_accuracy", "best_accuracy", "tail_accuracy", "time_to_target")
LOWER_IS_BETTER = {"time_to_target", "virtual_time_to_fedbuff_final", "kd_loss_change"}
TIMES = {"time_to_target", "virtual_time_to_fedbuff_final"}   # in virtual time units
DEFAULT_METRICS = ["final_accuracy", "best_accuracy", "tail_accuracy"]
RESERVED = {"cells": {"label", "methods", "seeds"}, "methods": {"label", "algorithm", "seeds"}}
# algorithm_stats of summary.json copied into a row (FedRevive's and FedEcho's diagnostics; README "Outputs").
DIAGNOSTICS = ("kd_applied", "kd_norm_ratio", "kd_cosine", "kd_loss_change", "kd_loss_improved", "synth_agreement",
               "echo_target_agreement", "distill_seconds")
RESULTS_FILE = "results.jsonl"
EXPERIMENT_FILE = "experiment.toml"


class ExperimentError(ValueError):
    """A bad experiment.toml or results file: one line naming the file and what is wrong."""


@dataclass
class Comparison:
    a: str
    b: str
    metrics: list[str]
    cells: list[str]
    rule: dict | None = None


@dataclass
class Experiment:
    path: Path
    name: str
    question: str
    preset: str | None
    seeds: list[int]
    settings: dict[str, object]
    cells: dict[str, dict]                 # name -> {"label", "keys", "methods", "seeds"}
    methods: dict[str, dict]               # name -> {"label", "keys", "seeds"}
    metrics: list[str]
    target: float | None
    tail_share: float
    comparisons: list[Comparison] = field(default_factory=list)

    def points(self) -> list[Point]:
        """Every run, seed-major within a cell so the first seeds of every method complete first."""
        out = []
        for cell_name, cell in self.cells.items():
            names = cell["methods"] or list(self.methods)
            seeds = sorted({s for m in names for s in (self.methods[m]["seeds"] or cell["seeds"] or self.seeds)})
            for seed in seeds:
                for m in names:
                    if seed in (self.methods[m]["seeds"] or cell["seeds"] or self.seeds):
                        out.append(Point(self, cell_name, m, seed))
        return out

    def definition(self) -> dict:
        """What decides the runs (not the text, metrics or comparisons): a DIR's runs belong to it."""
        return {"preset": self.preset, "settings": self.settings, "seeds": self.seeds,
                "cells": {k: {**v, "label": None} for k, v in self.cells.items()},
                "methods": {k: {**v, "label": None} for k, v in self.methods.items()}}


def _cli_value(value) -> str:
    if isinstance(value, list):
        return ",".join(_cli_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else toml_value(value)


@dataclass(frozen=True)
class Point:
    """One run of an experiment (the sweep.GridPoint contract)."""
    experiment: Experiment
    cell: str
    method: str
    seed: int

    def directory(self, out: Path) -> Path:
        return out / self.cell / self.method / f"s{self.seed}"

    def log_name(self) -> str:
        return f"{self.cell}-{self.method}-s{self.seed}"

    def keys(self) -> dict[str, object]:
        e = self.experiment
        return {**e.settings, **e.cells[self.cell]["keys"], **e.methods[self.method]["keys"]}

    def train_args(self, out: Path, extra: list[str]) -> list[str]:
        preset = ["--preset", self.experiment.preset] if self.experiment.preset else []
        return [*extra, *preset, *(f"--{k}={_cli_value(v)}" for k, v in self.keys().items()),
                "--seed", str(self.seed), "--out", str(self.directory(out))]


def _table(data: dict, key: str, source: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ExperimentError(f"{source}: '{key}' must be a table ([{key}])")
    return value


def _seeds(value, source: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in value):
        raise ExperimentError(f"{source}: seeds must be a list of non-negative integers, got {value!r}")
    return value


def _entries(data: dict, kind: str, source: str) -> dict[str, dict]:
    """The [cells.X] or [methods.X] tables: reserved keys, and the config keys flattened to dotted ones."""
    entries = {}
    for name, body in _table(data, kind, source).items():
        where = f"{source}: [{kind}.{name}]"
        if not isinstance(body, dict):
            raise ExperimentError(f"{where} must be a table")
        reserved = {k: v for k, v in body.items() if k in RESERVED[kind]}
        try:
            keys = flatten_toml({k: v for k, v in body.items() if k not in RESERVED[kind]}, where)
        except ConfigError as e:
            raise ExperimentError(str(e)) from None
        if kind == "methods":
            if not isinstance(reserved.get("algorithm"), str):
                raise ExperimentError(f"{where}: needs algorithm = \"NAME\" (a built-in or package.module:Class)")
            keys = {"server.algorithm": reserved["algorithm"], **keys}
        entry = {"label": str(reserved.get("label", name)), "keys": keys,
                 "seeds": _seeds(reserved.get("seeds"), where)}
        if kind == "cells":
            entry["methods"] = reserved.get("methods", [])
        entries[name] = entry
    if not entries:
        raise ExperimentError(f"{source}: no [{kind}.NAME] table")
    return entries


def load_experiment(path: str | Path, check_configs: bool = True) -> Experiment:
    """Read and check experiment.toml; with `check_configs` every run's options are parsed as `train` would
    (an unknown key or a bad value is an ExperimentError naming the cell and method)."""
    path = Path(path)
    source = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"experiment file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExperimentError(f"{source}: cannot read it: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{source} is not valid TOML: {e}") from None
    unknown = set(data) - {"experiment", "settings", "cells", "methods", "metrics", "comparisons"}
    if unknown:
        raise ExperimentError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}; allowed: experiment, "
                              "settings, cells, methods, metrics, comparisons")
    head = _table(data, "experiment", source)
    seeds = _seeds(head.get("seeds"), f"{source}: [experiment]")
    if not seeds:
        raise ExperimentError(f"{source}: [experiment] needs seeds = [S, ...]")
    try:
        settings = flatten_toml(_table(data, "settings", source), f"{source}: [settings]")
    except ConfigError as e:
        raise ExperimentError(str(e)) from None
    cells, methods = _entries(data, "cells", source), _entries(data, "methods", source)
    for name, cell in cells.items():
        bad = [m for m in cell["methods"] if m not in methods]
        if bad:
            raise ExperimentError(f"{source}: [cells.{name}] methods: unknown method(s) {', '.join(bad)}; "
                                  f"defined: {', '.join(methods)}")
    metrics_table = _table(data, "metrics", source)
    metrics = metrics_table.get("names", DEFAULT_METRICS)
    target = metrics_table.get("target")
    if "time_to_target" in metrics and not isinstance(target, (int, float)):
        raise ExperimentError(f"{source}: [metrics] names time_to_target, so it needs target = ACCURACY")
    comparisons = []
    if not isinstance(data.get("comparisons", []), list):
        raise ExperimentError(f"{source}: comparisons must be an array of tables ([[comparisons]])")
    for i, c in enumerate(data.get("comparisons", [])):
        where = f"{source}: comparison {i + 1}"
        if not isinstance(c, dict) or c.get("a") not in methods or c.get("b") not in methods:
            raise ExperimentError(f"{where}: a and b must name methods ({', '.join(methods)})")
        bad = [x for x in c.get("cells", []) if x not in cells]
        if bad:
            raise ExperimentError(f"{where}: unknown cell(s) {', '.join(bad)}; defined: {', '.join(cells)}")
        rule = c.get("rule")
        if rule is not None and not (isinstance(rule, dict) and {"metric", "min_difference", "min_ahead"} <= set(rule)):
            raise ExperimentError(f"{where}: rule needs metric, min_difference and min_ahead")
        comparisons.append(Comparison(c["a"], c["b"], list(c.get("metrics", metrics)), list(c.get("cells", cells)),
                                      rule))
    experiment = Experiment(path, str(head.get("name", path.parent.name)), str(head.get("question", "")),
                            head.get("preset"), seeds, settings, cells, methods, list(metrics),
                            None if target is None else float(target), float(metrics_table.get("tail_share", 0.25)),
                            comparisons)
    if check_configs:
        checked = set()
        for point in experiment.points():
            if (point.cell, point.method) in checked:
                continue
            checked.add((point.cell, point.method))
            try:
                parse_args(point.train_args(Path("DIR"), []))
            except ConfigError as e:
                raise ExperimentError(f"{source}: cell {point.cell}, method {point.method}: {e}") from None
    return experiment


def prepare(experiment: Experiment, out: Path) -> None:
    """Copy experiment.toml into `out`, refusing an `out` that holds the runs of a different definition."""
    copy = out / EXPERIMENT_FILE
    if copy.is_file() and copy.resolve() != experiment.path.resolve():
        try:
            old = load_experiment(copy, check_configs=False).definition()
        except ExperimentError:
            old = None
        if old != experiment.definition():
            raise ExperimentError(f"{out} holds the runs of another experiment definition ({copy}: its preset, "
                                  "settings, seeds, cells or methods differ); use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if copy.resolve() != experiment.path.resolve():
        shutil.copyfile(experiment.path, copy)


# ------------------------------------------------------------------ rows
def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_row(experiment: Experiment, point: Point, out: Path) -> dict | None:
    """The result row of one finished run (None when it has not met its stop rule)."""
    from .sweep import state, usage_path
    directory = point.directory(out)
    if state(directory) != "done":
        return None
    run = results.load(directory)
    evals = run.tables["evals"]
    times, accuracy = evals["virtual_time"].tolist(), evals["test_accuracy"].tolist()
    budget = run.value("run.max_virtual_time") or (times[-1] if times else 0.0)
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


# ------------------------------------------------------------------ tables
def _is_accuracy(metric: str) -> bool:
    return metric.endswith("_accuracy")


def _fmt(value: float | None, metric: str, difference: bool = False) -> str:
    if value is None:
        return "-"
    if _is_accuracy(metric):
        return f"{100 * value:+.1f}" if difference else f"{value:.3f}"
    digits = 2 if metric in TIMES else 4
    return f"{value:+.{digits}f}" if difference else f"{value:.{digits}f}"


def _unit(metric: str) -> str:
    return " points" if _is_accuracy(metric) else " virtual time units" if metric in TIMES else ""


def _values(rows: list[dict], cell: str, method: str, metric: str) -> dict[int, float | None]:
    return {r["seed"]: r.get(metric) for r in rows if r["cell"] == cell and r["method"] == method}


def summary_table(experiment: Experiment, rows: list[dict], cell: str) -> list[str]:
    """A Markdown table of one cell: a row per method with mean ± sample std of each metric over its seeds
    (time to target: over the seeds that reached it, and how many did)."""
    lines = ["| method | seeds | " + " | ".join(experiment.metrics) + " |",
             "| --- | --- |" + " --- |" * len(experiment.metrics)]
    for name, method in experiment.methods.items():
        members = [r for r in rows if r["cell"] == cell and r["method"] == name]
        if not members:
            continue
        cells = []
        for metric in experiment.metrics:
            values = [r.get(metric) for r in members]
            mean, std = results.mean_std(values)
            text = _fmt(mean, metric) + (f" ± {_fmt(std, metric)}" if std is not None else "")
            if metric in TIMES:
                text += f" ({sum(v is not None for v in values)} of {len(values)})"
            cells.append(text)
        lines.append(f"| {method['label']} | {len(members)} | " + " | ".join(cells) + " |")
    return lines


def comparison_lines(experiment: Experiment, rows: list[dict]) -> list[str]:
    """Every registered comparison, per cell and metric: the paired per-seed difference a - b (points for
    accuracies), mean ± sample std, the seeds where a is ahead, the paired t-test's p value, and the rule's
    verdict when one is registered."""
    lines = []
    for c in experiment.comparisons:
        for cell in c.cells:
            title = f"{c.a} - {c.b}, {cell}"
            verdict_parts = []
            for metric in c.metrics:
                pair = results.paired_comparison(_values(rows, cell, c.a, metric), _values(rows, cell, c.b, metric))
                if pair is None:
                    lines.append(f"{title}, {metric}: no seed with both")
                    continue
                ahead = pair["negative"] if metric in LOWER_IS_BETTER else pair["positive"]
                unit = _unit(metric)
                std = f" ± {_fmt(pair['std'], metric, True).lstrip('+')}" if pair["std"] is not None else ""
                p = "-" if pair["p_value"] is None else f"{pair['p_value']:.3g}"
                lines.append(f"{title}, {metric}: {_fmt(pair['mean'], metric, True)}{std}{unit}, {c.a} ahead on "
                             f"{ahead} of {len(pair['seeds'])} seeds, p = {p} (paired t-test; seeds "
                             f"{','.join(map(str, pair['seeds']))})")
                if c.rule and c.rule["metric"] == metric:
                    sign = -1 if metric in LOWER_IS_BETTER else 1
                    met = (sign * pair["mean"] >= c.rule["min_difference"] and ahead >= c.rule["min_ahead"])
                    verdict_parts.append(f"rule {metric} {'<=' if sign < 0 else '>='} "
                                         f"{_fmt(sign * c.rule['min_difference'], metric, True)}{unit} on the mean "
                                         f"and ahead on >= {c.rule['min_ahead']} seeds: "
                                         f"{'met' if met else 'not met'}")
            lines += [f"{title}: {v}" for v in verdict_parts]
    return lines


def report_text(experiment: Experiment, rows: list[dict], unfinished: int = 0) -> str:
    parts = [f"# {experiment.name}: {experiment.question}".rstrip(": ")]
    if unfinished:
        parts.append(f"({unfinished} run(s) of the experiment not finished: not in the tables)")
    target = f"; time_to_target: virtual time of the first evaluation >= {experiment.target:g}" \
        if experiment.target is not None else ""
    parts.append(f"mean ± sample std over seeds; tail = mean of the evaluations in the last "
                 f"{experiment.tail_share:g} of the budget{target}")
    for cell_name, cell in experiment.cells.items():
        if any(r["cell"] == cell_name for r in rows):
            parts += ["", f"{cell_name}: {cell['label']}", "", *summary_table(experiment, rows, cell_name)]
    comparisons = comparison_lines(experiment, rows)
    if comparisons:
        parts += ["", "registered comparisons (a - b, paired by seed):", *comparisons]
    commits = sorted({r.get("commit") or "unknown" for r in rows})
    parts += ["", f"rows: {len(rows)}; commit(s): {', '.join(commits)}"]
    return "\n".join(parts)


def plot(experiment: Experiment, rows: list[dict], out: Path, formats: list[str]) -> list[Path]:
    """accuracy_vs_virtual_time-<cell> per cell, from the rows' evaluations: each method's mean ± std band."""
    from .report import band_of_curves, plt, save, _finish
    written = []
    for cell_name, cell in experiment.cells.items():
        members = [r for r in rows if r["cell"] == cell_name and r.get("evals")]
        if not members:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, method in experiment.methods.items():
            curves = [(r["evals"]["virtual_time"], r["evals"]["test_accuracy"]) for r in members
                      if r["method"] == name]
            if not curves:
                continue
            times, mean, std = band_of_curves(curves)
            (line,) = ax.plot(times, mean, label=f"{method['label']} ({len(curves)} seeds)")
            ax.fill_between(times, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        if experiment.target is not None:
            ax.axhline(experiment.target, color="grey", linestyle="--", linewidth=1,
                       label=f"target {experiment.target:g}")
        ax.set_xlabel("virtual time (delay-model units)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{experiment.name}, {cell['label']}: mean ± std over seeds")
        out.mkdir(parents=True, exist_ok=True)
        written += save(_finish(fig, ax), out, f"accuracy_vs_virtual_time-{cell_name}", formats)
    return written


def report(path: Path, out: Path | None, formats: list[str], experiment_file: Path | None = None) -> int:
    """`mpi-afl report` on an experiment's sweep directory (rows from its runs, written to DIR/results.jsonl)
    or on a results.jsonl (the experiment.toml beside it, or `experiment_file`): prints the tables, writes the
    plots into `out` (default: DIR/plots, or the plots/ folder beside the results file)."""
    if path.is_dir():
        experiment = load_experiment(experiment_file or path / EXPERIMENT_FILE, check_configs=False)
        rows, unfinished = collect(experiment, path)
        write_rows(rows, path / RESULTS_FILE)
        written_rows = path / RESULTS_FILE
    else:
        experiment = load_experiment(experiment_file or path.parent / EXPERIMENT_FILE, check_configs=False)
        rows, unfinished, written_rows = read_rows(path), 0, None
    known = {(c, m) for c in experiment.cells for m in experiment.methods}
    strangers = sorted({(r["cell"], r["method"]) for r in rows} - known)
    if strangers:
        raise ExperimentError(f"{path}: rows of cell/method {strangers[:3]} are not in {experiment.path}")
    print(report_text(experiment, rows, unfinished))
    plots = plot(experiment, rows, out or (path if path.is_dir() else path.parent) / "plots", formats)
    if written_rows:
        print(f"rows: {written_rows}", file=sys.stderr)
    if plots:
        print(f"plots: {', '.join(map(str, plots))}", file=sys.stderr)
    return 0


def is_experiment(path: Path) -> bool:
    """A path `mpi-afl report` reads as an experiment: a results .jsonl file or a directory with experiment.toml."""
    return (path.is_file() and path.suffix == ".jsonl") or (path.is_dir() and (path / EXPERIMENT_FILE).is_file())

