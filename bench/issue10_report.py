"""The tables of bench/ACCURACY.md's FedRevive experiment and of FedEcho's grid, which shares its runs.

    python bench/issue10_report.py [--out bench/runs/issue10] [--jsonl bench/results/accuracy_issue10.jsonl]

Reads the finished runs of bench/issue10_grid.sh through `bench/accuracy.py --no-run` (one call per method
variant, as the grid ran them), writes every run's JSON line to --jsonl (keeping
the lines an earlier report wrote for runs whose folders are gone) and prints, per cell (arm A, arm B and
FedEcho's two other cells), a Markdown table of mean ± sample std over the seeds each method has, then paired
per-seed differences (same clients and delays) for the comparisons registered in bench/ACCURACY.md, and last
the per-seed rows of FedEcho's kd_step tuning on the held-out seeds 10 and 11 (not in --jsonl).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/issue10_report.py` from anywhere

from mpi_afl.results import mean_std as _mean_std  # noqa: E402


class Variant(NamedTuple):
    algorithm: str
    overrides: list[str]        # beyond the grid's data.kd_fraction=0.1
    name: str                   # in the tables
    budget: str | None = None   # --budget of bench/accuracy.py (None: the preset's)


# FedEcho's weights before the fourth session made the class-expert ones (kd_step 0.3) the default
RELATIVE = ["server.lr=0.25", "echo.weighting=relative", "echo.kd_step=0.1"]
LONG = "40"  # twice the preset's budget, the length: about 550 versions in arm A, 630 in arm B
VARIANTS = {
    "fedrevive": Variant("fedrevive", [], "FedRevive (probe proxy, lr 0.2)"),
    "fedrevive_hist": Variant("fedrevive", ["distill.proxy=histogram"], "FedRevive (true histograms, lr 0.2)"),
    "fedrevive_fresh": Variant("fedrevive", ["distill.pool_size=256"],
                               "FedRevive (pool of the last 256 images, lr 0.2)"),
    "dd_fedrevive": Variant("dd_fedrevive", [], "DD-FedRevive (real KD split, lr 0.4)"),
    "afl_dw": Variant("afl_dw", [], "AFL-DW (lr 0.2)"),
    "c1": Variant("fedbuff", ["server.buffer_size=1", "server.staleness=none", "server.lr=0.2"],
                  "C1: FedBuff B 1, no discount, lr 0.2"),
    "fedbuff": Variant("fedbuff", [], "FedBuff (tuned: B 4, sqrt discount, lr 0.5)"),
    "fedbuff_paper": Variant("fedbuff", ["server.buffer_size=1", "server.staleness=none", "server.lr=0.1"],
                             "FedBuff, research-code form (B 1, no discount, lr 0.1)"),
    "ca2fl": Variant("ca2fl", [], "CA2FL (B 4, lr 0.25)"),
    "fedecho": Variant("fedecho", RELATIVE, "FedEcho, relative weights (CA2FL backbone, lr 0.25, kd_step 0.1)"),
    "fedecho_proxy": Variant("fedecho", [*RELATIVE, "echo.inputs=proxy"],
                             "FedEcho on real unlabeled inputs (the 10% split, kd_step 0.1 tuned on seeds 10-11)"),
    "fedecho_old": Variant("fedecho", ["echo.backbone=fedbuff", "echo.weighting=entropy",
                                       "echo.staleness_factor=none", "echo.kd_step=1", "echo.kd_share=constant",
                                       "server.lr=0.5"],
                           "FedEcho, first reconstruction (FedBuff backbone, lr 0.5)"),
    "fedecho_expert": Variant("fedecho", ["server.lr=0.25", "echo.weighting=expert", "echo.kd_step=0.3"],
                              "FedEcho, class-expert weights (the default; kd_step 0.3 tuned on seeds 10-11)"),
    "fedasync": Variant("fedasync", [], "FedAsync (mixing 0.6, polynomial)"),
    "fedrevive_long": Variant("fedrevive", [], "FedRevive (probe proxy, lr 0.2), twice the budget", LONG),
    "afl_dw_long": Variant("afl_dw", [], "AFL-DW (lr 0.2), twice the budget", LONG),
}
# FedEcho's kd_step tuned on held-out seeds (alpha 0.1, high delay; bench/ACCURACY.md): table row -> run. The
# runs name every knob they set.
PROXY = ["server.lr=0.25", "echo.inputs=proxy", "echo.weighting=relative"]
EXPERT = ["server.lr=0.25", "echo.weighting=expert"]
TUNING = {"CA2FL": VARIANTS["ca2fl"],
          **{f"proxy inputs, kd_step {k}": Variant("fedecho", PROXY + [f"echo.kd_step={k}"], "")
             for k in ("0.1", "0.3", "1")},
          **{f"expert weights, kd_step {k}": Variant("fedecho", EXPERT + [f"echo.kd_step={k}"], "")
             for k in ("0.1", "0.3", "1")}}
# (title, alpha, schedule): the experiment's two arms, then the two other cells of FedEcho's grid
CELLS = [("Arm A", "0.5", "paper"), ("Arm B", "0.1", "high"), ("FedEcho grid", "0.1", "paper"),
         ("FedEcho grid", "0.5", "high")]
PAIRS = [("fedrevive", "afl_dw"), ("fedrevive_hist", "afl_dw"), ("fedrevive_hist", "fedrevive"),
         ("fedrevive_fresh", "fedrevive"), ("fedrevive_fresh", "afl_dw"),
         ("dd_fedrevive", "afl_dw"), ("dd_fedrevive", "c1"), ("c1", "afl_dw"), ("fedrevive", "fedbuff_paper"),
         ("fedrevive", "ca2fl"), ("dd_fedrevive", "ca2fl"), ("fedecho", "ca2fl"),
         ("fedecho_proxy", "ca2fl"), ("fedecho", "fedecho_old"), ("fedrevive_long", "afl_dw_long"),
         ("fedecho_expert", "ca2fl"), ("fedecho_expert", "fedecho"), ("fedecho_expert", "fedecho_old"),
         ("fedecho_old", "ca2fl")]
COLUMNS = ["final_accuracy", "best_accuracy", "tail_accuracy", "virtual_time_to_fedbuff_final", "kd_loss_change",
           "kd_loss_improved", "kd_norm_ratio", "synth_agreement", "echo_target_agreement",
           "distill_seconds_per_update"]
TUNING_COLUMNS = ["final_accuracy", "best_accuracy", "tail_accuracy", "kd_norm_ratio", "kd_cosine",
                  "kd_loss_change", "kd_loss_improved", "echo_target_agreement"]


def rows_of(out: Path, alpha: str, schedule: str, variant: Variant, seeds: str = "0,1,2,3,4") -> list[dict]:
    cmd = [sys.executable, str(REPO / "bench" / "accuracy.py"), "--no-run", "--out", str(out), "--alphas", alpha,
           "--schedules", schedule, "--seeds", seeds, "--algorithms", variant.algorithm,
           *(["--budget", variant.budget] if variant.budget else []),
           *(f"--override={o}" for o in ["data.kd_fraction=0.1", *variant.overrides])]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [row for row in map(json.loads, text.splitlines()) if row["bench"] == "accuracy"]


def mean_std(values: list) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def tuning_table(out: Path) -> None:
    """Per-seed rows of the held-out tuning runs (seeds 10 and 11, alpha 0.1 / high), CA2FL first."""
    print("\nTuning on seeds 10 and 11: alpha 0.1, high schedule\n")
    print("| run | seed | " + " | ".join(TUNING_COLUMNS) + " |")
    print("|" + " --- |" * (len(TUNING_COLUMNS) + 2))
    for name, variant in TUNING.items():
        for r in sorted(rows_of(out, "0.1", "high", variant, "10,11"), key=lambda r: r["seed"]):
            cells = ["-" if r[c] is None else f"{r[c]:+.4f}" if c == "kd_loss_change" else f"{r[c]:.3f}"
                     for c in TUNING_COLUMNS]
            print(f"| {name} | {r['seed']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "runs" / "issue10")
    parser.add_argument("--jsonl", type=Path, default=REPO / "bench" / "results" / "accuracy_issue10.jsonl")
    args = parser.parse_args()
    # Run folders are scratch (git-ignored) and a lost machine loses them: a run recorded in --jsonl by an
    # earlier report stays in the tables unless its folder is here, in which case the folder's row wins.
    recorded = {}
    if args.jsonl.exists():
        for r in map(json.loads, args.jsonl.read_text().splitlines()):
            recorded.setdefault((r["variant"], r["alpha"], r["schedule"]), {})[r["seed"]] = r
    lines = []
    for title, alpha, schedule in CELLS:
        runs = {}
        for label, variant in VARIANTS.items():
            runs[label] = {**recorded.get((label, float(alpha), schedule), {}),
                           **{r["seed"]: r for r in rows_of(args.out, alpha, schedule, variant)}}
            lines += [{"variant": label, **r} for r in runs[label].values()]
        print(f"\n{title}: alpha {alpha}, {schedule} schedule\n")
        print("| method | seeds | final | best | tail | time to FedBuff final | kd_loss_change | kd_loss_improved "
              "| kd_norm_ratio | synth_agreement | echo_target_agreement | distill s/update |")
        print("|" + " --- |" * (len(COLUMNS) + 2))
        for label, variant in VARIANTS.items():
            if runs[label]:
                members = runs[label].values()
                cells = [mean_std([r[c] for r in members]) for c in COLUMNS]
                # Time to FedBuff's final accuracy: mean over the seeds that reached it (and how many did).
                times = [r["virtual_time_to_fedbuff_final"] for r in members]
                with_fedbuff = sum(r["fedbuff_final_accuracy"] is not None for r in members)
                if with_fedbuff:
                    cells[COLUMNS.index("virtual_time_to_fedbuff_final")] += (
                        f" ({sum(t is not None for t in times)} of {with_fedbuff})")
                print(f"| {variant.name} | {len(runs[label])} | " + " | ".join(cells) + " |")
        print()
        for a, b in PAIRS:
            common = sorted(set(runs[a]) & set(runs[b]))
            if not common:
                continue
            for column in ("final_accuracy", "tail_accuracy"):
                d = [runs[a][s][column] - runs[b][s][column] for s in common]
                print(f"    {a} - {b} {column.split('_')[0]}: {mean_std(d)} over seeds {common}; "
                      f"per seed {[round(x, 3) for x in d]}")
    tuning_table(args.out)
    args.jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"\n{len(lines)} runs -> {args.jsonl}")


if __name__ == "__main__":
    main()
