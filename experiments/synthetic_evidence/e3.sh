#!/usr/bin/env bash
# E3, the generator's budget, resumable: every run of e3.toml, 2 processes at a time, then its rows in
# RUNS_DIR/results.jsonl and the tables (`mpi-afl report RUNS_DIR`).
#   experiments/synthetic_evidence/e3.sh [RUNS_DIR]      (default bench/runs/e3)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-bench/runs/e3}
mpi-afl sweep --experiment experiments/synthetic_evidence/e3.toml --out "$RUNS" --parallel 2
