"""Plots and a summary table for one or more run files (DESIGN.md "Output").

    python -m mpi_afl.report RUN.h5 [RUN2.h5 ...] [--out DIR] [--target ACC] [--json]

Writes into DIR (default: the first run's directory):
  accuracy_vs_virtual_time.png, accuracy_vs_wall_time.png   test accuracy per evaluation, one curve per run
  staleness_histogram.png                                   staleness of the accepted arrivals
  updates_per_client.png                                    accepted updates per client id (participation)
and prints one summary row per run.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works without a display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mpi_afl.storage.runlog import read_run  # noqa: E402

PLOT_FILES = ("accuracy_vs_virtual_time.png", "accuracy_vs_wall_time.png", "staleness_histogram.png",
              "updates_per_client.png")


@dataclass
class Run:
    path: Path
    label: str
    config: dict
    arrivals: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]


def load_run(path: Path) -> Run:
    """Read a run file; the label is its `label` attribute, else "<algorithm> seed <seed>", else the file name."""
    data = read_run(path)
    attrs = data["attrs"]
    config = json.loads(attrs.get("config", "{}"))
    algorithm = config.get("server", {}).get("algorithm")
    seed = config.get("run", {}).get("seed")
    label = attrs.get("label") or (f"{algorithm} seed {seed}" if algorithm else path.stem)
    return Run(path, label, config, data["arrivals"], data["evals"])


def summarize(run: Run, target: float | None) -> dict:
    """One summary row; values that do not exist (no evals, target not reached) are None."""
    acc = run.evals["test_accuracy"]
    accepted = run.arrivals["accepted"]
    staleness = run.arrivals["staleness"][accepted]
    n_accepted = int(accepted.sum())
    last_wall = float(run.arrivals["wall_time"].max()) if len(accepted) else 0.0
    reached = np.flatnonzero(acc >= target) if target is not None else np.array([], dtype=int)
    first = reached[0] if len(reached) else None
    return {
        "run": str(run.path),
        "label": run.label,
        "final_accuracy": float(acc[-1]) if len(acc) else None,
        "best_accuracy": float(np.nanmax(acc)) if len(acc) else None,
        "target": target,
        "virtual_time_to_target": float(run.evals["virtual_time"][first]) if first is not None else None,
        "wall_time_to_target": float(run.evals["wall_time"][first]) if first is not None else None,
        "updates_accepted": n_accepted,
        "updates_per_second": n_accepted / last_wall if last_wall > 0 else None,
        "mean_staleness": float(staleness.mean()) if n_accepted else None,
        "max_staleness": int(staleness.max()) if n_accepted else None,
        "rejected": int(len(accepted) - n_accepted),
    }


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
    ("rejected", "rejected", "{}"),
]


def format_table(rows: list[dict]) -> str:
    """Plain-text table: label column left-aligned, numbers right-aligned."""
    cells = [[header for _, header, _ in COLUMNS]]
    for row in rows:
        cells.append(["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for line in cells:
        parts = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def plot_accuracy(runs: list[Run], clock: str, target: float | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ax.plot(run.evals[f"{clock}_time"], run.evals["test_accuracy"], marker=".", label=run.label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("wall time (s)" if clock == "wall" else "virtual time (delay-model units)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Test accuracy vs {clock} time")
    _finish(fig, ax, path)


def plot_staleness(runs: list[Run], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    stale = [run.arrivals["staleness"][run.arrivals["accepted"]] for run in runs]
    top = max((int(s.max()) for s in stale if len(s)), default=0)
    edges = np.arange(-0.5, top + 1.5)  # one bin per integer staleness
    for run, s in zip(runs, stale):
        ax.hist(s, bins=edges, histtype="step", linewidth=1.5, label=f"{run.label} ({len(s)} accepted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("staleness (versions)")
    ax.set_ylabel("accepted updates")
    ax.set_title("Staleness of accepted updates")
    _finish(fig, ax, path)


def plot_participation(runs: list[Run], path: Path) -> None:
    """Accepted updates per client id; clients that never got through show as zeros
    (the number of clients comes from the config's data.num_clients when present)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        clients = run.arrivals["client"][run.arrivals["accepted"]]
        n = max(run.config.get("data", {}).get("num_clients", 0), int(clients.max()) + 1 if len(clients) else 0)
        counts = np.bincount(clients, minlength=n)
        ax.step(np.arange(n), counts, where="mid", linewidth=1.5, label=run.label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)  # counts compare from zero
    ax.set_xlabel("client id")
    ax.set_ylabel("accepted updates")
    ax.set_title("Updates per client")
    _finish(fig, ax, path)


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mpi_afl.report",
        description="Plot and summarise mpi_afl run files (the run.h5 written by rank 0). Writes "
                    + ", ".join(PLOT_FILES) + " and prints one summary row per run.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN.h5", help="run files to compare")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="directory for the PNG files (created if missing; default: the first run's directory)")
    parser.add_argument("--target", type=float, metavar="ACC",
                        help="test accuracy (a fraction, e.g. 0.8) whose first crossing gives the "
                             "virt_to_target and wall_to_target columns; without it they print '-'")
    parser.add_argument("--json", action="store_true",
                        help="after the table, also print one JSON object per run (null for '-')")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    for path in args.runs:
        try:
            runs.append(load_run(path))
        except (OSError, ValueError) as e:  # missing file, not HDF5, not a run file
            print(f"mpi_afl.report: error: {e}", file=sys.stderr)
            return 2
    labels = [run.label for run in runs]
    for run in runs:  # legends must tell runs apart
        if labels.count(run.label) > 1:
            run.label = f"{run.label} [{run.path}]"
    out = args.out or args.runs[0].parent
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(runs, "virtual", args.target, out / PLOT_FILES[0])
    plot_accuracy(runs, "wall", args.target, out / PLOT_FILES[1])
    plot_staleness(runs, out / PLOT_FILES[2])
    plot_participation(runs, out / PLOT_FILES[3])
    rows = [summarize(run, args.target) for run in runs]
    print(format_table(rows))
    if args.json:
        for row in rows:
            print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}))
    print(f"plots: {', '.join(str(out / name) for name in PLOT_FILES)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
