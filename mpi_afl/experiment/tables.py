"""`mpi-afl report` of an experiment: per cell a table of mean ± std per method, the registered paired
comparisons with their rules' verdicts, and accuracy-over-virtual-time plots."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import results
from ..paired_test import paired_comparison
from .definition import EXPERIMENT_FILE, Experiment, ExperimentError, load_experiment
from .rows import RESULTS_FILE, collect, read_rows, write_rows

# Differences of the accuracies are in points (x 100).
LOWER_IS_BETTER = {"time_to_target", "virtual_time_to_fedbuff_final", "kd_loss_change"}
TIMES = {"time_to_target", "virtual_time_to_fedbuff_final"}   # in virtual time units


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
                pair = paired_comparison(_values(rows, cell, c.a, metric), _values(rows, cell, c.b, metric))
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
    from ..report import band_of_curves, draw_band, plt, save, _finish
    written = []
    for cell_name, cell in experiment.cells.items():
        members = [r for r in rows if r["cell"] == cell_name and r.get("evals")]
        if not members:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for index, (name, method) in enumerate(experiment.methods.items()):
            curves = [(r["evals"]["virtual_time"], r["evals"]["test_accuracy"]) for r in members
                      if r["method"] == name]
            if not curves:
                continue
            times, mean, std = band_of_curves(curves)
            draw_band(ax, index, times, mean, std if len(curves) > 1 else None,
                      f"{method['label']} ({len(curves)} seeds)")
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
