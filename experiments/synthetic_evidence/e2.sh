#!/usr/bin/env bash
# E2, teacher-matched synthesis, resumable: arm B seeds 0-4 at the preset's length, then at twice it; each
# run's JSON line lands in e2.jsonl (bench/accuracy.py's fields). 2 processes at a time.
#   experiments/synthetic_evidence/e2.sh [RUNS_DIR]      (default bench/runs/e2)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-bench/runs/e2}
HERE=experiments/synthetic_evidence
CONTROLS=${2:-bench/runs/ceiling}   # default FedRevive and AFL-DW of the same seeds (the ceiling test's runs too)
# --budget is the paper schedule's: 20 (the preset's) gives the high schedule 32.5 virtual units, 40 gives 65.
for budget in 20 40; do
    python bench/accuracy.py --algorithms fedrevive --alphas 0.1 --schedules high --seeds 0,1,2,3,4 \
        --budget "$budget" --override data.kd_fraction=0.1 --override distill.synth_labels=teacher \
        --out "$RUNS" --jobs 2 > "$HERE/e2-budget$budget.jsonl" 2> "$HERE/e2-budget$budget.log"
    python bench/accuracy.py --algorithms fedrevive,afl_dw --alphas 0.1 --schedules high --seeds 0,1,2,3,4 \
        --budget "$budget" --override data.kd_fraction=0.1 \
        --out "$CONTROLS" --jobs 2 > "$HERE/control-budget$budget.jsonl" 2> "$HERE/control-budget$budget.log"
done
