"""experiment.toml -> `Experiment`: its cells, methods, seeds, metrics and registered comparisons, and every
run as a `Point` (the sweep.GridPoint contract), each checked as `train` would parse it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, parse_args
from ..config.parsing import flatten_toml, tomllib
from ..config.schema import toml_value

DEFAULT_METRICS = ["final_accuracy", "best_accuracy", "tail_accuracy"]
RESERVED = {"cells": {"label", "methods", "seeds"}, "methods": {"label", "algorithm", "seeds"}}
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
