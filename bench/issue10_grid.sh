#!/usr/bin/env bash
# Issue 10's decisive experiment (bench/ACCURACY.md): two queues side by side, one per arm, one run at a time
# each, seed-major so the first seeds of both arms complete first; resumable (finished runs are skipped).
cd "$(dirname "$0")/.." && . .venv/bin/activate
OUT=bench/runs/issue10
KD="--override data.kd_fraction=0.1"
queue() {  # queue ALPHA SCHEDULE
  for s in 0 1 2 3 4; do
    python bench/accuracy.py --alphas $1 --schedules $2 --out $OUT $KD --jobs 1 --seeds $s \
      --algorithms fedrevive,dd_fedrevive,afl_dw
  done
  for s in 0 1 2 3 4; do
    python bench/accuracy.py --alphas $1 --schedules $2 --out $OUT $KD --jobs 1 --seeds $s --algorithms fedrevive \
      --override distill.proxy=histogram
    python bench/accuracy.py --alphas $1 --schedules $2 --out $OUT $KD --jobs 1 --seeds $s --algorithms fedbuff,ca2fl
    python bench/accuracy.py --alphas $1 --schedules $2 --out $OUT $KD --jobs 1 --seeds $s --algorithms fedbuff \
      --override server.buffer_size=1 --override server.staleness=none --override server.lr=0.1
  done
}
queue 0.5 paper &
queue 0.1 high &
wait
