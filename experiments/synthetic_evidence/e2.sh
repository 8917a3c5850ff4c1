#!/usr/bin/env bash
# E2, teacher-matched synthesis, resumable: every run of experiment.toml (arm B seeds 0-4 at the preset's length
# and at twice it, with default FedRevive and AFL-DW of the same seeds as controls), 2 processes at a time;
# then the tables, with the registered comparisons, and the rows in RUNS_DIR/results.jsonl.
#   experiments/synthetic_evidence/e2.sh [RUNS_DIR]      (default bench/runs/synthetic_evidence)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-bench/runs/synthetic_evidence}
mpi-afl sweep --experiment experiments/synthetic_evidence/experiment.toml --out "$RUNS" --parallel 2
