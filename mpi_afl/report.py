"""Plots and summary tables for runs (docs/design.md "Output").

    python -m mpi_afl.report RUN [RUN ...] [--out DIR] [--target ACC] [--format png,pdf,svg] [--json]

RUN is a run directory, its run.h5, or a directory holding runs below it (a sweep). An experiment's sweep
directory (it holds experiment.toml) or its results.jsonl gets the experiment's tables instead
(mpi_afl/experiment/: mean ± std per cell and method, the registered paired comparisons). Runs whose
configs differ only in the seed (and in keys that do not change results: results.NOT_SETTING, and
the distill/echo sections for built-in algorithms that do not read them) form one setting; a
setting with several runs is drawn as its mean with a band of one standard deviation across the
runs, a single run as a plain curve. When a setting has finished runs, its unfinished ones (live,
killed, or stopped by a signal) are listed per run but left out of its mean and band. Writes into DIR (default: the first run's directory):
  accuracy_vs_virtual_time, accuracy_vs_wall_time   test accuracy per evaluation
  staleness_histogram                               staleness of the accepted arrivals (mean per run)
  updates_per_client                                accepted updates per client id (mean per run)
in each requested format (PNG at 200 dpi; PDF and SVG are vector), and prints one summary row per run,
then one mean ± std row per setting, each table at most WIDTH (120) characters wide. Curves carry one marker
and one band hatching per setting; legends name each setting in full (results.setting_label). Reads runs
with mpi_afl.results: no torch.
"""

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works without a display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mpi_afl import experiment  # noqa: E402
from mpi_afl.results import Group, Run, group_by_setting, load, find_runs, mean_std, run_metrics  # noqa: E402

PLOT_NAMES = ("accuracy_vs_virtual_time", "accuracy_vs_wall_time", "staleness_histogram", "updates_per_client")
PLOT_FILES = tuple(f"{name}.png" for name in PLOT_NAMES)
FORMATS = ("png", "pdf", "svg")
PNG_DPI = 200
WIDTH = 120            # no table line is wider: a terminal, a SLURM log, a results.md code block
LEGEND_WIDTH = 90      # characters per legend line before it wraps (the 7-inch figure at fontsize "small")
# One per setting, in order, so curves differ in more than colour (print, colour blindness, ten settings).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
HATCHES = ("//", "\\\\", "||", "--", "xx", "..", "++", "oo")
LINESTYLES = ("-", "--", "-.", ":")


def summarize(run: Run, target: float | None) -> dict:
    """One summary row: the run, its label and results.run_metrics (None where a value does not exist)."""
    return {"run": str(run.directory), "label": run.label, **run_metrics(run, target)}


# (summary key, column header, format); None prints as "-".
COLUMNS = [
    ("label", "run", "{}"),
    ("final_accuracy", "final_acc", "{:.4f}"),
    ("best_accuracy", "best_acc", "{:.4f}"),
    ("virtual_time_to_target", "virt_to_target", "{:.2f}"),
    ("wall_time_to_target", "wall_to_target", "{:.2f}"),
    ("updates_accepted", "accepted", "{}"),
    ("updates_per_second", "updates/s", "{:.1f}"),
    ("mean_staleness", "mean_stale", "{:.2f}"),
    ("max_staleness", "max_stale", "{}"),
    ("updates_rejected", "rejected", "{}"),
]
# Columns of the per-setting table (headers and formats as COLUMNS): mean ± sample std over the setting's runs.
GROUP_KEYS = ["final_accuracy", "best_accuracy", "virtual_time_to_target", "wall_time_to_target",
              "updates_per_second", "mean_staleness"]


def summarize_group(group: Group, rows: list[dict]) -> dict:
    """Mean and sample std of each GROUP_KEYS value over the group's runs (`rows` in the group's order);
    `reached`: how many runs reached the target (the time means are over those; None without a target)."""
    reached = sum(r["virtual_time_to_target"] is not None for r in rows) if rows[0]["target"] is not None else None
    line = {"setting": group.label, "runs": len(rows), "unfinished_left_out": len(group.left_out), "reached": reached}
    for key in GROUP_KEYS:
        line[f"{key}_mean"], line[f"{key}_std"] = mean_std([r[key] for r in rows])
    return line


def _render(header: list[str], cells: list[list[str]]) -> list[str]:
    """Plain-text table lines: first column left-aligned, the others right-aligned."""
    cells = [header, *cells]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return ["  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]).rstrip()
            for line in cells]


def _table(header: list[str], cells: list[list[str]], width: int = WIDTH) -> str:
    """`_render`'s table, or, when a line would be wider than `width`, a numbered key of the first column's
    names (wrapped) and the table with the numbers in their place, its other columns split into blocks (a
    blank line between) that fit, each block repeating the numbers."""
    lines = _render(header, cells)
    if max(map(len, lines)) <= width:
        return "\n".join(lines)
    numbers = [f"[{i}]" for i in range(1, len(cells) + 1)]
    key = [textwrap.fill(f"{n} {line[0]}", width, subsequent_indent=" " * (len(n) + 1))
           for n, line in zip(numbers, cells)]

    def block(columns: list[int]) -> list[str]:
        return _render([header[0]] + [header[c] for c in columns],
                       [[n] + [line[c] for c in columns] for n, line in zip(numbers, cells)])

    blocks = [[1]]
    for column in range(2, len(header)):
        if max(map(len, block(blocks[-1] + [column]))) <= width:
            blocks[-1].append(column)
        else:
            blocks.append([column])
    return "\n".join(key) + "\n" + "\n\n".join("\n".join(block(columns)) for columns in blocks)


def format_table(rows: list[dict]) -> str:
    return _table([header for _, header, _ in COLUMNS],
                  [["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows])


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return "-"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def format_group_table(lines: list[dict]) -> str:
    """The per-setting table: COLUMNS' headers, each cell "mean ± sample std" over the setting's runs."""
    columns = {key: (header, fmt) for key, header, fmt in COLUMNS}
    header = ["setting", "runs", "reached", *(columns[key][0] for key in GROUP_KEYS)]
    cells = [[line["setting"],
              str(line["runs"]) + (f" (+{line['unfinished_left_out']} unfinished)" if line["unfinished_left_out"] else ""),
              "-" if line["reached"] is None else str(line["reached"]),
              *(_pm(line[f"{key}_mean"], line[f"{key}_std"], columns[key][1]) for key in GROUP_KEYS)]
             for line in lines]
    return _table(header, cells)


def band(runs: list[Run], clock: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times, mean, std) of test accuracy over `runs` on the union of their evaluation times, within the
    span every run covers (each run linearly interpolated between its evaluations); std is 0 for one run."""
    return band_of_curves([(r.tables["evals"][f"{clock}_time"], r.tables["evals"]["test_accuracy"]) for r in runs])


def band_of_curves(curves: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`band` for (times, accuracies) pairs, e.g. the evaluations kept in an experiment's result rows."""
    curves = [(np.asarray(t, dtype=float), np.asarray(a, dtype=float)) for t, a in curves if len(t)]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    lo, hi = max(t[0] for t, _ in curves), min(t[-1] for t, _ in curves)
    grid = np.unique(np.concatenate([t for t, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    values = np.array([np.interp(grid, t, a) for t, a in curves])
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(grid))
    return grid, values.mean(axis=0), std


def draw_band(ax: plt.Axes, index: int, times: np.ndarray, mean: np.ndarray, std: np.ndarray | None,
              label: str) -> None:
    """Curve number `index` of a plot: the mean with the index's marker (about a dozen along it) and, with
    `std`, the band mean ± std hatched with the index's pattern and outlined in the curve's colour, so that
    overlapping bands stay apart (translucent fills of several colours blend into one)."""
    (line,) = ax.plot(times, mean, marker=MARKERS[index % len(MARKERS)], markersize=4,
                      markevery=max(1, len(times) // 12), label=label)
    if std is not None:
        ax.fill_between(times, mean - std, mean + std, facecolor="none", edgecolor=line.get_color(),
                        hatch=HATCHES[index % len(HATCHES)], linewidth=0.6, alpha=0.5)


def legend_label(group: Group, statistic: str = "mean ± std") -> str:
    """The setting's full label (results.setting_label) and what its curve is: one run's seed, or the
    `statistic` over several runs."""
    if len(group.runs) > 1:
        return f"{group.label}: {statistic} of {len(group.runs)} runs"
    seed = group.runs[0].value("run.seed")
    return group.label if seed is None else f"{group.label}, seed {seed}"


def plot_accuracy(groups: list[Group], clock: str, target: float | None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, group in enumerate(groups):
        times, mean, std = band(group.runs, clock)
        draw_band(ax, index, times, mean, std if len(group.runs) > 1 else None, legend_label(group))
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("wall time (s)" if clock == "wall" else "virtual time (delay-model units)")
    ax.set_ylabel("test accuracy")
    bands = "; hatched: ± one sample std over a setting's runs" if any(len(g.runs) > 1 for g in groups) else ""
    ax.set_title(f"Test accuracy vs {clock} time{bands}", fontsize="medium")
    return _finish(fig, ax)


def plot_staleness(groups: list[Group]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    stale = [[r.tables["arrivals"]["staleness"][r.tables["arrivals"]["accepted"]] for r in g.runs] for g in groups]
    top = max((int(s.max()) for runs in stale for s in runs if len(s)), default=0)
    edges = np.arange(-0.5, top + 1.5)  # one bin per integer staleness
    for index, (group, runs) in enumerate(zip(groups, stale)):
        values = np.concatenate(runs)
        ax.hist(values, bins=edges, weights=np.full(len(values), 1.0 / len(runs)), histtype="step", linewidth=1.5,
                linestyle=LINESTYLES[index % len(LINESTYLES)],
                label=f"{legend_label(group, 'mean')} ({len(values) / len(runs):g} accepted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("staleness (versions)")
    ax.set_ylabel("accepted updates (mean per run)")
    ax.set_title("Staleness of accepted updates")
    return _finish(fig, ax)


def plot_participation(groups: list[Group]) -> plt.Figure:
    """Accepted updates per client id, averaged over a setting's runs; clients that never got through
    show as zeros (the number of clients comes from the config's data.num_clients when present)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, group in enumerate(groups):
        clients = [r.tables["arrivals"]["client"][r.tables["arrivals"]["accepted"]] for r in group.runs]
        n = max([r.config.get("data", {}).get("num_clients", 0) for r in group.runs]
                + [int(c.max()) + 1 for c in clients if len(c)])
        counts = np.mean([np.bincount(c, minlength=n) for c in clients], axis=0)
        ax.step(np.arange(n), counts, where="mid", linewidth=1.5, marker=MARKERS[index % len(MARKERS)],
                markersize=4, markevery=max(1, n // 12), label=legend_label(group, "mean"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)  # counts compare from zero
    ax.set_xlabel("client id")
    ax.set_ylabel("accepted updates (mean per run)")
    ax.set_title("Updates per client")
    return _finish(fig, ax)


def _finish(fig: plt.Figure, ax: plt.Axes) -> plt.Figure:
    """Grid, and the legend below the axes (full setting labels are long; inside they would hide the curves),
    its entries wrapped at LEGEND_WIDTH characters; the figure grows by the legend's lines."""
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    labels = [textwrap.fill(label, LEGEND_WIDTH, break_long_words=False) for label in labels]
    ax.legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.12), frameon=False)
    lines = sum(label.count("\n") + 1 for label in labels)
    fig.set_size_inches(7, 4.5 + 0.17 * lines)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, out: Path, name: str, formats: list[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, dpi=PNG_DPI if fmt == "png" else None, bbox_inches="tight")   # the legend below
        paths.append(path)
    plt.close(fig)
    return paths


def _formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad or text!r}; allowed: {', '.join(FORMATS)}")
    return formats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mpi-afl report",
        description="Plot and summarise mpi_afl runs. Writes " + ", ".join(PLOT_FILES)
                    + " (or the --format of your choice) and prints one summary row per run and one "
                      "mean ± std row per setting (runs that differ only in the seed).")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="run directories, their RUN.h5 files, or directories holding runs (a sweep)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="directory for the plots (created if missing; default: the first run's directory)")
    parser.add_argument("--target", type=float, metavar="ACC",
                        help="test accuracy (a fraction, e.g. 0.8) whose first crossing gives the "
                             "virt_to_target and wall_to_target columns; without it they print '-'")
    parser.add_argument("--format", type=_formats, default=["png"], metavar="FMT[,FMT]",
                        help=f"plot file formats, comma-separated: {', '.join(FORMATS)} (default: png)")
    parser.add_argument("--json", action="store_true",
                        help="after the tables, also print one JSON object per run and per setting (null for '-')")
    parser.add_argument("--experiment", type=Path, metavar="FILE",
                        help="the experiment.toml of an experiment's sweep directory or results.jsonl (default: "
                             "the one in the directory / beside the file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if len(args.runs) == 1 and (experiment.is_experiment(args.runs[0]) or args.experiment):
        try:   # an experiment (mpi_afl/experiment/): its tables, paired comparisons, rows and plots
            return experiment.report(args.runs[0], args.out, args.format, args.experiment)
        except (OSError, ValueError) as e:
            print(f"mpi_afl.report: error: {e}", file=sys.stderr)
            return 2
    try:
        runs = [load(path) for path in find_runs(args.runs)]
    except (OSError, ValueError) as e:  # missing file, not HDF5, not a run file
        print(f"mpi_afl.report: error: {e}", file=sys.stderr)
        return 2
    labels = [run.label for run in runs]
    for run in runs:  # table rows must tell runs apart
        if labels.count(run.label) > 1:
            run.label = f"{run.label} [{run.directory}]"
    groups = group_by_setting(runs)
    left_out = sum(len(g.left_out) for g in groups)
    if left_out:
        print(f"mpi_afl.report: {left_out} unfinished run(s) (no summary.json, or stopped by a signal) are in the "
              "per-run table but not in their settings' means and bands", file=sys.stderr)
    out = args.out or runs[0].directory
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in zip(PLOT_NAMES, (plot_accuracy(groups, "virtual", args.target),
                                      plot_accuracy(groups, "wall", args.target),
                                      plot_staleness(groups), plot_participation(groups))):
        written += save(fig, out, name, args.format)
    rows = {id(run): summarize(run, args.target) for run in runs}
    print(format_table(list(rows.values())))
    group_lines = [summarize_group(g, [rows[id(r)] for r in g.runs]) for g in groups]
    print()
    print(format_group_table(group_lines))
    if args.json:
        for row in [*rows.values(), *group_lines]:
            print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}))
    print(f"plots: {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
