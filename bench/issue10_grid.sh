#!/usr/bin/env bash
# Issue 10's decisive experiment (bench/ACCURACY.md): resumable; each call skips finished runs.
cd /work/main && . .venv/bin/activate
OUT=bench/runs/issue10
KD="--override data.kd_fraction=0.1"
arm() { python bench/accuracy.py --alphas $1 --schedules $2 --out $OUT $KD "${@:3}"; }
for s in 0 1 2 3 4; do
  for a in "0.5 paper" "0.1 high"; do set -- $a
    arm $1 $2 --algorithms fedrevive,dd_fedrevive,afl_dw --seeds $s
  done
done
for s in 0 1 2 3 4; do
  for a in "0.5 paper" "0.1 high"; do set -- $a
    arm $1 $2 --algorithms fedrevive --seeds $s --override distill.proxy=histogram
    arm $1 $2 --algorithms fedbuff,ca2fl --seeds $s
    arm $1 $2 --algorithms fedbuff --seeds $s --override server.buffer_size=1 --override server.staleness=none --override server.lr=0.1
  done
done
