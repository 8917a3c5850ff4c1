#!/usr/bin/env bash
# The ceiling test end to end, resumable: the four FedRevive runs (finished ones are skipped, interrupted ones
# resume), then the probe on each final checkpoint; one JSON line per checkpoint lands in results.jsonl.
#   experiments/synthetic_evidence/run.sh [RUNS_DIR]      (default bench/runs/ceiling; 2 processes at a time)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-bench/runs/ceiling}
HERE=experiments/synthetic_evidence
python bench/accuracy.py --algorithms fedrevive --alphas 0.5 --schedules paper --seeds 0,1 \
    --override data.kd_fraction=0.1 --out "$RUNS" --jobs 2 > "$HERE/arm_a.log" 2>&1
python bench/accuracy.py --algorithms fedrevive --alphas 0.1 --schedules high --seeds 0,1 \
    --override data.kd_fraction=0.1 --out "$RUNS" --jobs 2 > "$HERE/arm_b.log" 2>&1
probe() {
    local run=$1
    grep -qF "\"run\": \"$run\"" "$HERE/results.jsonl" 2>/dev/null && return 0
    python bench/synthetic_images.py "$run" --kd-probe 50 --ceiling "${CEILING_STEPS:-500}" \
        --ceiling-all-steps "${CEILING_ALL_STEPS:-125}" \
        --out "$HERE/plots" >> "$HERE/results.jsonl"
}
runs=$(find "$RUNS" -name checkpoint.h5 -path '*fedrevive*' | sort | xargs -n1 dirname)
for run in $runs; do probe "$run" & while [ "$(jobs -rp | wc -l)" -ge 2 ]; do sleep 5; done; done
wait
