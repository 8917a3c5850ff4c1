"""Accuracy of FedRevive / FedEcho against the baselines on Fashion-MNIST (virtual clock).

    python bench/accuracy.py                                          # issue-5 setting, 3 seeds, 2 runs at a time
    python bench/accuracy.py --algorithms fedecho,fedbuff,ca2fl,fedasync,fedrevive --alphas 0.1,0.5 \\
        --schedules paper,high --out bench/runs/accuracy
    python bench/accuracy.py --algorithms afl_dw --seeds 0 --override server.lr=0.5   # one point of an lr sweep

Every run is ONE process, `python -m mpi_afl.train --preset fmnist_cpu ... --out DIR` without mpiexec: the
virtual clock makes the final model and every recorded value except wall times bit-identical for any number
of ranks (README, "The two clocks"), so more ranks would only change the wall time. The runs go through
`mpi_afl.sweep.run_local` (what this script adds is the grid: tuned settings per algorithm, delay schedules,
budgets, and the metrics below): `--jobs` runs that many side by side, a finished run is not run again and an
interrupted one resumes from its checkpoint, so an interrupted grid continues where it stopped and the tables
can be rebuilt from finished runs alone. Console logs go to OUT/logs/, progress lines to stderr. A run that
diverged is finished (its row says so in `stop_reason`) and counts in the means: it is the method's result.

Runs live in OUT/<schedule>-alpha<alpha>/<algorithm>-<server settings>[-budget<B>]-s<seed>/ (the budget part
only when --budget is not the preset's; use a new OUT after changing the preset). The script prints one JSON line per run (fields below), then one per (algorithm,
setting) with the mean and sample std over seeds:

  final_accuracy, best_accuracy         summary.json (test split)
  tail_accuracy                         mean test accuracy of the evaluations in the last quarter of the budget:
                                        less noisy than the last evaluation alone (used to pick the server lrs)
  virtual_time_to_fedbuff_final         virtual time of the first evaluation whose test accuracy >= FedBuff's
                                        final accuracy for the same seed and setting (null: never reached, or
                                        no FedBuff run); the time-to-accuracy measure of the FedRevive paper
  distill_seconds_per_update            server seconds spent in synthesis + KD per accepted update (null when
                                        the algorithm does not distil)
  kd_applied                            updates (FedRevive) or new models (FedEcho) that KD changed
  kd_norm_ratio, kd_cosine              FedRevive: mean ||Delta_KD|| / ||Delta_i|| and mean cosine of the two
                                        over the blended updates (null for older runs and other algorithms)
  kd_loss_change, kd_loss_improved      FedRevive: mean held-out loss change L(x_t + eta beta Delta_KD) - L(x_t) of
                                        the KD calls, and the share of calls where it was negative (KD helped)
  synth_agreement                       FedRevive/FedEcho: share of kept synthetic images the teachers label as
                                        the class they were made for
  echo_target_agreement                 FedEcho on synthetic inputs: share of KD images whose weighted target
                                        has its argmax at the class they were made for (null otherwise)
  staleness_mean, staleness_p90, staleness_max   of the accepted updates (run.h5 arrivals): compare with
                                        server.s_max, which sets FedRevive's and AFL-DW's beta(tau)
  wall_seconds, versions                summary.json
  cpu_seconds                           user + system CPU seconds of the run's process, summed over its
                                        launches (DIR.usage.json, written by the sweep runner)
  stop_reason                           summary.json: max_virtual_time, or diverged
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/accuracy.py` from anywhere

from mpi_afl import results  # noqa: E402
from mpi_afl.config import ConfigError, DelayConfig, load_toml, preset_path  # noqa: E402
from mpi_afl.delays import schedule_from  # noqa: E402
from mpi_afl.sweep import run_local, state, usage_path  # noqa: E402

PRESET = "fmnist_cpu"

# Per-algorithm server settings on top of the preset, tuned by a sweep on seed 0, alpha 0.5, paper schedule,
# the preset's 20-unit budget, picking the best tail_accuracy (mean of the last quarter's evaluations); the
# sweep's lines are bench/results/accuracy_sweep.jsonl (tuned value marked *):
#   fedrevive, afl_dw  B = 1, server.lr in {0.1, 0.2*, 0.5}
#   fedbuff            B = 4 with FedBuff's own 1/sqrt(1 + tau) discount, server.lr in {0.25, 0.5*, 1, 2}
#   ca2fl              B = 4, no discount (the cache replaces it), server.lr in {0.125, 0.25*, 0.5, 1}
#   fedecho            B = 4; CA2FL's lr 0.25 for its CA2FL backbone (kd_step tuned on held-out seeds instead,
#                      bench/ACCURACY.md); the first reconstruction's FedBuff backbone was swept: lr {0.25, 0.5*, 1}
#   fedasync           polynomial s(tau) = (tau + 1)^-0.5, mixing alpha in {0.1, 0.3, 0.6*, 0.9}
#   fedavg             K = 20 clients per round, server.lr in {1.0, 1.4*} (2-3 rounds fit in the budget)
SERVER_SETTINGS: dict[str, dict[str, str]] = {
    "fedrevive": {"server.buffer_size": "1", "server.lr": "0.2"},
    "afl_dw": {"server.buffer_size": "1", "server.lr": "0.2"},
    "fedbuff": {"server.buffer_size": "4", "server.staleness": "sqrt", "server.lr": "0.5"},
    "ca2fl": {"server.buffer_size": "4", "server.lr": "0.25"},
    "fedecho": {"server.buffer_size": "4", "server.lr": "0.25"},
    "fedasync": {"server.staleness": "polynomial", "server.mixing": "0.6"},
    "fedavg": {"server.lr": "1.4"},
    # Not swept: twice FedRevive's lr, as the research code's configs (FEMNIST 0.05 -> 0.1, CIFAR-10 0.1 -> 0.2).
    "dd_fedrevive": {"server.buffer_size": "1", "server.lr": "0.4"},
}


# Delay settings. "paper" is docs/algorithms.md §3.5. "high" has longer and heavier-tailed training times: a
# fifth of the clients average 6 units (the paper's means are <= 1.6) and the Pareto(1.5) tail (infinite
# variance) gives occasional jobs many times their mean. By Little's law the mean staleness stays about K
# (the jobs in flight) whatever the delays; what grows is the tail (stragglers return hundreds of versions
# late) and the skew of participation towards fast clients, which is what FedEcho and CA2FL target.
SCHEDULES: dict[str, DelayConfig] = {
    "paper": DelayConfig(schedule="paper"),
    "high": DelayConfig(schedule="custom", train_shape="pareto", pareto_shape=1.5,
                        train_means=[1.0, 2.0, 6.0], train_probs=[0.5, 0.3, 0.2]),
}


def delay_overrides(cfg: DelayConfig) -> dict[str, str]:
    """`delays.*` overrides that give `cfg`: the schedule, and every field that differs from the default."""
    default = DelayConfig()
    changed = {k: v for k, v in dataclasses.asdict(cfg).items() if k == "schedule" or v != getattr(default, k)}
    return {f"delays.{k}": ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in changed.items()}


def mean_duration(cfg: DelayConfig) -> float:
    """E[download + train + upload] of a job in virtual time units (every train shape keeps its mean)."""
    s = schedule_from(cfg)
    train = sum(m * p for m, p in zip(s.train_means, s.train_probs))
    return s.download + train + sum(s.upload_means) / len(s.upload_means)


@dataclass(frozen=True)
class RunSpec:
    algorithm: str
    seed: int
    alpha: float
    schedule: str
    budget: float              # virtual time of this run (scaled for its schedule)
    overrides: tuple[str, ...]  # extra KEY=VALUE from --override
    budget_tag: str = ""        # "budgetB" when --budget is not the preset's: such runs get their own directories

    @property
    def setting(self) -> str:
        return f"{self.schedule}-alpha{self.alpha:g}"

    @property
    def settings(self) -> dict[str, str]:
        """The algorithm's tuned server settings with the --override values on top."""
        return {**SERVER_SETTINGS[self.algorithm], **dict(o.split("=", 1) for o in self.overrides)}

    def directory(self, out: Path) -> Path:
        # The settings are part of the name, so a sweep point equal to the tuned value is the grid's run
        # (it runs once), and retuning SERVER_SETTINGS never picks up a run made with other values.
        tag = "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in sorted(self.settings.items()))
        suffix = f"-{self.budget_tag}" if self.budget_tag else ""
        return out / self.setting / f"{self.algorithm}-{tag}{suffix}-s{self.seed}"

    def train_args(self, out: Path, extra: list[str]) -> list[str]:
        """mpi_afl.train's options for a fresh run (the sweep.GridPoint contract)."""
        keys = {"data.alpha": f"{self.alpha:g}", "run.max_virtual_time": f"{self.budget:g}",
                **delay_overrides(SCHEDULES[self.schedule]), **self.settings}
        return [*extra, "--preset", PRESET, "--algorithm", self.algorithm, "--seed", str(self.seed),
                *(f"--{k}={v}" for k, v in keys.items()), "--out", str(self.directory(out))]

    def log_name(self) -> str:
        return f"{self.setting}-{self.directory(Path()).name}"


def _round4(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def run_row(spec: RunSpec, out: Path) -> dict | None:
    """The JSON line of one finished run (None when the run has not met its stop rule)."""
    directory = spec.directory(out)
    if state(directory) != "done":
        return None
    summary = json.loads((directory / "summary.json").read_text())
    # The tuned FedBuff of the same seed and setting, with this run's overrides of the setting (e.g. a KD split),
    # not those of the algorithm (server.*, distill.*, echo.*).
    shared = tuple(o for o in spec.overrides if o.split(".", 1)[0] not in ("server", "distill", "echo"))
    reference = RunSpec("fedbuff", spec.seed, spec.alpha, spec.schedule, spec.budget, shared,
                        spec.budget_tag).directory(out)
    fedbuff_final = None
    if state(reference) == "done":
        fedbuff_final = json.loads((reference / "summary.json").read_text())["final_accuracy"]
    stats = summary.get("algorithm_stats", {})
    times = [e["virtual_time"] for e in summary["evals"]]
    accuracies = [e["test_accuracy"] for e in summary["evals"]]
    arrivals = results.load(directory).tables["arrivals"]
    staleness = arrivals["staleness"][arrivals["accepted"].astype(bool)]
    distill = stats.get("distill_seconds")
    usage = usage_path(directory)
    cpu_seconds = json.loads(usage.read_text())["cpu_seconds"] if usage.exists() else None
    return {
        "bench": "accuracy", "algorithm": spec.algorithm, "seed": spec.seed, "alpha": spec.alpha,
        "schedule": spec.schedule, "settings": spec.settings,
        "final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
        "tail_accuracy": _round4(results.tail_accuracy(times, accuracies, spec.budget)),
        "fedbuff_final_accuracy": fedbuff_final,
        "virtual_time_to_fedbuff_final": (results.time_to_target(times, accuracies, fedbuff_final)
                                          if fedbuff_final is not None else None),
        "distill_seconds_per_update": (round(distill / summary["updates_accepted"], 4)
                                       if distill is not None else None),
        "kd_applied": stats.get("kd_applied"),
        "kd_norm_ratio": stats.get("kd_norm_ratio"),
        "kd_cosine": stats.get("kd_cosine"),
        "kd_loss_change": stats.get("kd_loss_change"),
        "kd_loss_improved": stats.get("kd_loss_improved"),
        "synth_agreement": stats.get("synth_agreement"),
        "echo_target_agreement": stats.get("echo_target_agreement"),
        "staleness_mean": round(float(staleness.mean()), 2), "staleness_p90": float(np.percentile(staleness, 90)),
        "staleness_max": int(staleness.max()),
        "wall_seconds": round(summary["wall_seconds"], 1), "cpu_seconds": cpu_seconds,
        "versions": summary["versions"], "stop_reason": summary["stop_reason"],
        "updates": summary["updates_accepted"], "virtual_time": round(summary["virtual_time"], 2),
        "budget": spec.budget, "ranks": 1,
    }


def _mean_std(values: list) -> tuple[float | None, float | None]:
    return tuple(None if v is None else round(v, 4) for v in results.mean_std(values))


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per (algorithm, alpha, schedule, settings): mean and sample std over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = json.dumps([r["algorithm"], r["alpha"], r["schedule"], r["settings"]], sort_keys=True)
        groups.setdefault(key, []).append(r)
    lines = []
    for members in groups.values():
        first = members[0]
        line = {"bench": "accuracy_mean", **{k: first[k] for k in ("algorithm", "alpha", "schedule", "settings")},
                "seeds": sorted(r["seed"] for r in members)}
        for field in ("final_accuracy", "best_accuracy", "tail_accuracy", "virtual_time_to_fedbuff_final",
                      "distill_seconds_per_update", "kd_norm_ratio", "kd_cosine", "kd_loss_change",
                      "kd_loss_improved", "synth_agreement", "echo_target_agreement", "staleness_mean",
                      "wall_seconds", "cpu_seconds", "versions"):
            line[f"{field}_mean"], line[f"{field}_std"] = _mean_std([r[field] for r in members])
        line["reached_fedbuff_final"] = sum(r["virtual_time_to_fedbuff_final"] is not None for r in members)
        lines.append(line)
    return lines


def markdown(lines: list[dict]) -> str:
    """The accuracy_mean lines as a table: a row per algorithm setting, a column per (schedule, alpha) cell,
    each entry "final mean ± std (best mean)" over the seeds, with the seed count when it is not 3."""
    cells = sorted({(m["schedule"], m["alpha"]) for m in lines}, key=lambda c: (list(SCHEDULES).index(c[0]), c[1]))
    rows: dict[str, dict] = {}
    for m in lines:
        settings = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in m["settings"].items())
        entry = f"{m['final_accuracy_mean']:.3f}"
        if m["final_accuracy_std"] is not None:
            entry += f" ± {m['final_accuracy_std']:.3f}"
        entry += f" ({m['best_accuracy_mean']:.3f})"
        if len(m["seeds"]) != 3:
            entry += f" [seeds {', '.join(map(str, m['seeds']))}]"
        rows.setdefault(f"{m['algorithm']} ({settings})", {})[(m["schedule"], m["alpha"])] = entry
    header = "| algorithm | " + " | ".join(f"{s}, alpha {a}" for s, a in cells) + " |"
    table = [header, "|" + " --- |" * (len(cells) + 1)]
    for name, entries in rows.items():
        table.append(f"| {name} | " + " | ".join(entries.get(c, "-") for c in cells) + " |")
    return "\n".join(table)


def _csv(text: str, cast) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="fedrevive,fedbuff,afl_dw,fedasync,fedavg",
                        help=f"comma-separated, from {', '.join(SERVER_SETTINGS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    parser.add_argument("--alphas", default="0.5", help="comma-separated Dirichlet alphas")
    parser.add_argument("--schedules", default="paper", help=f"comma-separated, from {', '.join(SCHEDULES)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="virtual time of a paper-schedule run (default: the preset's run.max_virtual_time); "
                             "other schedules get the budget with the same expected number of updates")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, on top of the tuned settings (repeatable; "
                             "part of the run directory name)")
    parser.add_argument("--out", default=str(REPO / "bench" / "runs" / "accuracy"),
                        help="root of the run directories (default bench/runs/accuracy, git-ignored)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2 = the cores of a small box)")
    parser.add_argument("--no-run", action="store_true", help="only report the runs that exist")
    parser.add_argument("--markdown", action="store_true",
                        help="print the per-setting means as a Markdown table instead of JSON lines")
    args = parser.parse_args()

    algorithms = _csv(args.algorithms, str)
    schedules = _csv(args.schedules, str)
    for kind, names, allowed in (("algorithm", algorithms, SERVER_SETTINGS), ("schedule", schedules, SCHEDULES)):
        bad = [n for n in names if n not in allowed]
        if bad:
            parser.error(f"unknown {kind} {', '.join(bad)}; allowed: {', '.join(allowed)}")
    bad = [o for o in args.override if "=" not in o]
    if bad:
        parser.error(f"--override needs KEY=VALUE, got {bad}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        preset_budget = load_toml(preset_path(PRESET))["run.max_virtual_time"]
    except (ConfigError, KeyError) as e:
        parser.error(f"no budget: {e}")
    budget = args.budget if args.budget is not None else preset_budget
    out = Path(args.out).resolve()
    paper = mean_duration(SCHEDULES["paper"])
    # Setting by setting, seed by seed, so the first settings/seeds complete first; within one, the
    # slowest algorithms (the distilling ones) start first.
    budget_tag = f"budget{budget:g}" if budget != preset_budget else ""
    specs = [RunSpec(a, seed, alpha, s, round(budget * mean_duration(SCHEDULES[s]) / paper, 3), tuple(args.override),
                     budget_tag)
             for s in schedules for alpha in _csv(args.alphas, float) for seed in _csv(args.seeds, int)
             for a in sorted(algorithms, key=lambda a: a not in ("fedrevive", "fedecho"))]

    failed = [] if args.no_run else run_local(specs, out, [], args.jobs, ranks=1, log=sys.stderr)
    rows = [row for row in (run_row(s, out) for s in specs) if row is not None]
    if args.markdown:
        print(markdown(aggregate(rows)))
    else:
        for line in rows + aggregate(rows):
            print(json.dumps(line), flush=True)
    for spec in failed:
        print(f"error: {spec.directory(out)} did not finish (see its log above)", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
