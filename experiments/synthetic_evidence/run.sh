#!/usr/bin/env bash
# The ceiling test end to end, resumable: the experiment's runs (finished ones are skipped, interrupted ones
# resume), then the probe on the final checkpoint of FedRevive's seeds 0 and 1 in both arms; one JSON line per
# checkpoint lands in results.jsonl.
#   experiments/synthetic_evidence/run.sh [RUNS_DIR]      (default bench/runs/synthetic_evidence; 2 processes at a time)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-bench/runs/synthetic_evidence}
HERE=experiments/synthetic_evidence
mpi-afl sweep --experiment "$HERE/experiment.toml" --out "$RUNS" --parallel 2 > "$HERE/runs.log" 2>&1
probe() {
    local run=$1
    grep -qF "\"run\": \"$run\"" "$HERE/results.jsonl" 2>/dev/null && return 0
    python experiments/probes/synthetic_images.py "$run" --kd-probe 50 --ceiling "${CEILING_STEPS:-500}" \
        --ceiling-all-steps "${CEILING_ALL_STEPS:-125}" \
        --out "$HERE/plots" >> "$HERE/results.jsonl"
}
for run in "$RUNS"/alpha0.5-paper/fedrevive/s{0,1} "$RUNS"/alpha0.1-high/fedrevive/s{0,1}; do
    probe "$run" & while [ "$(jobs -rp | wc -l)" -ge 2 ]; do sleep 5; done
done
wait
