#!/usr/bin/env bash
# Issue 10's decisive experiment (bench/ACCURACY.md): two queues side by side, one per arm, one run at a time
# each, seed-major so the first seeds of both arms complete first; resumable (finished runs are skipped,
# interrupted ones resume from their checkpoints). Tables: python bench/issue10_report.py
cd "$(dirname "$0")/.." && . .venv/bin/activate
OUT=bench/runs/issue10
KD="--override data.kd_fraction=0.1"
# FedEcho with relative weights, the default until the fourth session (expert weights, kd_step 0.3, since)
RELATIVE="fedecho --override server.lr=0.25 --override echo.weighting=relative --override echo.kd_step=0.1"
# FedEcho's first reconstruction, with the lr its FedBuff backbone was tuned to
FIRST="fedecho --override echo.backbone=fedbuff --override echo.weighting=entropy --override echo.staleness_factor=none
  --override echo.kd_step=1 --override echo.kd_share=constant --override server.lr=0.5"
run() {  # run ALPHA SCHEDULE SEED ALGORITHMS [--override KEY=VALUE ...]
  python bench/accuracy.py --alphas $1 --schedules $2 --seeds $3 --algorithms $4 --out $OUT $KD --jobs 1 "${@:5}"
}
queue() {  # queue ALPHA SCHEDULE
  for s in 0 1 2 3 4; do run $1 $2 $s fedrevive,dd_fedrevive,afl_dw; done
  for s in 0 1 2 3 4; do
    run $1 $2 $s fedrevive --override distill.proxy=histogram
    run $1 $2 $s fedrevive --override distill.pool_size=256   # a pool of recent syntheses only
    # C1: DD-FedRevive without its KD term (every update at 0.4 x 0.5 = 0.2, no discount)
    run $1 $2 $s fedbuff --override server.buffer_size=1 --override server.staleness=none --override server.lr=0.2
  done
  for s in 0 1 2 3 4; do run $1 $2 $s fedbuff,ca2fl; done
  # FedEcho's cell of issue 12 shares these runs (same clients and delays): alpha 0.1, high delay.
  if [ "$1" = 0.1 ]; then for s in 0 1 2 3 4; do run $1 $2 $s $RELATIVE; done; fi
  # FedBuff in the research code's form: B = 1, no discount, half FedRevive's lr.
  for s in 0 1 2 3 4; do
    run $1 $2 $s fedbuff --override server.buffer_size=1 --override server.staleness=none --override server.lr=0.1
  done
}
third() {  # the third session's runs (bench/ACCURACY.md), seed-major; SEEDS of one queue
  for s in "$@"; do
    run 0.1 high $s fedrevive,afl_dw --budget 40   # the issue's ~550 versions
    for cell in "0.1 paper" "0.5 high"; do run $cell $s $RELATIVE; run $cell $s ca2fl; done
    run 0.5 paper $s $RELATIVE
    run 0.1 high $s $RELATIVE --override echo.inputs=proxy   # kd_step 0.1, tuned below
  done
  for s in "$@"; do
    run 0.1 high $s fedasync
    run 0.1 high $s $FIRST
  done
}
tune_proxy() {  # FedEcho on real unlabeled inputs: echo.kd_step tuned on held-out seeds 10 and 11
  for s in 10 11; do
    run 0.1 high $s ca2fl
    proxy="fedecho --override server.lr=0.25 --override echo.inputs=proxy --override echo.weighting=relative"
    run 0.1 high $s $proxy --override echo.kd_step=0.1
    run 0.1 high $s $proxy --override echo.kd_step=0.3
    run 0.1 high $s $proxy --override echo.kd_step=1
  done
}
fourth() {  # the fourth session's class-expert FedEcho (bench/ACCURACY.md): kd_step tuned on seeds 10-11, then cells
  expert="fedecho --override server.lr=0.25 --override echo.weighting=expert"
  for s in 10 11; do for k in 0.1 0.3 1; do run 0.1 high $s $expert --override echo.kd_step=$k; done; done
  for cell in "0.1 high" "0.1 paper" "0.5 high" "0.5 paper"; do
    for s in 0 1 2 3 4; do run $cell $s $expert --override echo.kd_step=0.3; done
  done
  # FedBuff and FedRevive in FedEcho's two cells outside the FedRevive experiment's arms
  for s in 0 1 2 3 4; do for cell in "0.1 paper" "0.5 high"; do run $cell $s fedbuff; run $cell $s fedrevive; done; done
}
fifth() {  # the issue's full FedEcho grid: the first reconstruction and FedAsync in all four cells, seed-major
  for s in 0 1 2 3 4; do
    for cell in "0.1 high" "0.1 paper" "0.5 high" "0.5 paper"; do
      run $cell $s $FIRST
    done
  done
  for s in 0 1 2 3 4; do for cell in "0.1 high" "0.1 paper" "0.5 high" "0.5 paper"; do run $cell $s fedasync; done; done
}
queue 0.5 paper &
queue 0.1 high &
wait
tune_proxy
third 0 2 4 &
third 1 3 &
wait
fourth
fifth
