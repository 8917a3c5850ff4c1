"""Tables of the synthetic-evidence experiment from its committed rows alone (no run directories needed).

    python experiments/synthetic_evidence/analyze.py [--collect-e3 bench/runs/e3]

E1 (results.jsonl, one experiments/probes/synthetic_images.py line per checkpoint): the held-out KD gain of each input
source, the ceiling's share of the real split's gain and the label-prior control. E2 (e2-budget*.jsonl and
control-budget*.jsonl, run rows of the earlier grid front end): teacher-matched FedRevive against AFL-DW and default FedRevive
of the same seeds: mean ± sample std, paired differences with a paired t-test p value and the seeds ahead.
E3 (e3.jsonl, rows of `mpi-afl sweep --experiment e3.toml`): FedRevive with the generator budget against the
same controls.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy import stats

HERE = Path(__file__).resolve().parent
SOURCES = ("kd_split", "pool_histogram", "ceiling_all", "ceiling_experts", "noise")


def rows(pattern: str) -> list[dict]:
    out = []
    for path in sorted(HERE.glob(pattern)):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return out


def arm(run: str) -> str:
    return "A" if "paper-alpha0.5" in run else "B" if "high-alpha0.1" in run else "?"


def e1_table() -> list[str]:
    lines = ["| arm | seed | settings | " + " | ".join(f"gain {s}" for s in SOURCES) + " | ceiling / real |",
             "| --- | --- | --- |" + " --- |" * (len(SOURCES) + 1)]
    verdict = {"dd": [], "fedrevive": []}
    for r in rows("results.jsonl"):
        probe, seed = r["kd_probe"], r["run"].rstrip("/").split("-s")[-1]
        for settings in ("dd", "fedrevive"):
            gain = {s: -probe[f"{s}/{settings}"]["loss_change"] for s in SOURCES if f"{s}/{settings}" in probe}
            real, best = gain.get("kd_split", 0.0), max(gain.get("ceiling_all", 0.0), gain.get("ceiling_experts", 0.0))
            share = best / real if real > 0 else None
            verdict[settings].append(share)
            lines.append(f"| {arm(r['run'])} | {seed} | {settings} | "
                         + " | ".join(f"{gain[s]:+.4f}" if s in gain else "-" for s in SOURCES)
                         + f" | {'unreadable' if share is None else f'{share:.2f}'} |")
    lines.append("")
    for settings, shares in verdict.items():
        readable = [s for s in shares if s is not None]
        lines.append(f"- {settings} settings: ceiling / real = {', '.join(f'{s:.2f}' for s in readable)}; "
                     f"< 0.25 on {sum(s < 0.25 for s in readable)}, >= 0.5 on {sum(s >= 0.5 for s in readable)} "
                     f"of {len(shares)} checkpoints ({len(shares) - len(readable)} unreadable)")
    lines += ["", "| arm | seed | expert agreement: pool | noise | pool, permuted labels | same label by chance |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in rows("results.jsonl"):
        c = r["label_prior_control"]
        lines.append(f"| {arm(r['run'])} | {r['run'].rstrip('/').split('-s')[-1]} | {c['pool']:.3f} | "
                     f"{c['noise']:.3f} | {c['pool_permuted_labels']:.3f} | {c['chance_by_label_prior']:.3f} |")
    return lines


def _key(r: dict) -> str:
    if r["algorithm"] == "fedrevive" and r["settings"].get("distill.synth_labels") == "teacher":
        return "teacher"
    return r["algorithm"]


def controls() -> dict[tuple[float, str, int], dict]:
    """(budget, method, seed) -> row: the arm-B runs of E2's rows (teacher-matched, default FedRevive, AFL-DW)."""
    runs = {}
    for r in rows("e2-budget*.jsonl") + rows("control-budget*.jsonl"):
        if r.get("bench") == "accuracy" and r["schedule"] == "high" and r["alpha"] == 0.1:
            runs[(r["budget"], _key(r), r["seed"])] = r
    return runs


def e3_runs() -> dict[tuple[float, str, int], dict]:
    """(budget, "budget", seed) -> row: E3's runs (e3.jsonl, rows of `mpi-afl sweep --experiment e3.toml`)."""
    return {(r["budget"], "budget", r["seed"]): r for r in rows("e3.jsonl") if r["method"] == "fedrevive_budget"}


def comparison_table(runs: dict, treated: str, metric: str = "tail_accuracy") -> list[str]:
    """Per budget: mean ± std and diagnostics of `treated`, default FedRevive and AFL-DW, and `treated` minus
    each of the other two on paired seeds (points, paired t-test, seeds ahead, seeds >= +2)."""
    lines = []
    for budget in sorted({b for b, k, _ in runs if k == treated}):
        have = {m: {s: r for (b, k, s), r in runs.items() if b == budget and k == m}
                for m in (treated, "fedrevive", "afl_dw")}
        lines += [f"Budget {budget:g} virtual units ({metric}):", "",
                  "| method | seeds | mean ± std | synth_agreement | kd_loss_change | kd_norm_ratio |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for m, by_seed in have.items():
            values = [r[metric] for r in by_seed.values()]
            if not values:
                continue
            diag = [statistics.mean(r[k] for r in by_seed.values()) if all(r.get(k) is not None for r in by_seed.values())
                    else None for k in ("synth_agreement", "kd_loss_change", "kd_norm_ratio")]
            spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
            lines.append(f"| {m} | {len(values)} | {statistics.mean(values):.4f}{spread} | "
                         + " | ".join("-" if d is None else f"{d:.4f}" for d in diag) + " |")
        lines.append("")
        for other in ("afl_dw", "fedrevive"):
            seeds = sorted(set(have[treated]) & set(have[other]))
            if len(seeds) < 2:
                continue
            diffs = [100 * (have[treated][s][metric] - have[other][s][metric]) for s in seeds]
            p = stats.ttest_rel([have[treated][s][metric] for s in seeds], [have[other][s][metric] for s in seeds]).pvalue
            lines.append(f"- {treated} minus {other}, points, seeds {seeds}: "
                         f"{', '.join(f'{d:+.1f}' for d in diffs)}; mean {statistics.mean(diffs):+.2f} ± "
                         f"{statistics.stdev(diffs):.2f}, ahead on {sum(d > 0 for d in diffs)} of {len(diffs)}, "
                         f">= +2 on {sum(d >= 2 for d in diffs)}, paired t-test p = {p:.3f}")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect-e3", type=Path, metavar="RUNS_DIR",
                        help="first write the finished runs of e3.toml under RUNS_DIR into e3.jsonl")
    args = parser.parse_args()
    if args.collect_e3:
        from mpi_afl.experiment.definition import load_experiment
        from mpi_afl.experiment.rows import collect, write_rows
        found, unfinished = collect(load_experiment(HERE / "e3.toml"), args.collect_e3)
        write_rows(found, HERE / "e3.jsonl")
        print(f"e3.jsonl: {len(found)} finished runs, {unfinished} not finished")
    runs = controls()
    e3 = {**runs, **e3_runs()}
    print("\n".join(["## E1, the ceiling test", "", *e1_table(), "", "## E2, teacher-matched synthesis", "",
                     *comparison_table(runs, "teacher"), *comparison_table(runs, "teacher", "final_accuracy"),
                     "## E3, the generator's budget", "", *comparison_table(e3, "budget"),
                     *comparison_table(e3, "budget", "final_accuracy")]))


if __name__ == "__main__":
    main()
