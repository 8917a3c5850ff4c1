#!/usr/bin/env bash
# GPU check of a node, in a few minutes: run it on a GPU node (an interactive allocation, or inside a job)
# with mpi_afl installed and its environment active.
#   bench/gpu_check.sh [RANKS]          (default 17 ranks for the shared-GPU run)
# 1. bench/gpu_check.py: models on CUDA vs CPU, local training + aggregation on CUDA, FedRevive's KD path on
#    CUDA, flat-buffer host<->device transfers, FedRevive server seconds/update on paper_cifar10 shapes;
# 2. a RANKS-rank mpiexec run sharing the node's GPUs (digits, run.device=cuda), then the same with
#    run.placement=server_gpu; checks every rank's device and peak GPU memory from summary.json's `ranks`;
# 3. distillation over a group of ranks (distill.ranks = 1 against 0): per update, then a whole FedRevive run.
# Prints JSON lines; exit 1 if any check failed. Set MPIEXEC to your launcher (default: mpiexec on PATH;
# under SLURM e.g. MPIEXEC="srun --mpi=pmi2"); results go to $GPU_CHECK_OUT (default a temporary directory).
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU with small sizes (how the script is tested without a GPU).
set -uo pipefail
RANKS=${1:-17}
MPIEXEC=${MPIEXEC:-mpiexec}
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/mpi_afl-gpu-check-XXXXXX)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
VERSIONS=200
[ "$DEVICE" = cpu ] && VERSIONS=30
HERE=$(cd "$(dirname "$0")" && pwd)
status=0

if [ "$DEVICE" = cuda ]; then
    nvidia-smi -L || echo '{"check": "nvidia-smi", "ok": false}'
    python "$HERE/gpu_check.py" --device cuda || status=1
else
    python "$HERE/gpu_check.py" --device cpu --small || status=1
fi

for placement in shared server_gpu; do
    dir="$OUT/mpiexec-$placement"
    if [ "$MPIEXEC" = mpiexec ]; then launch=(mpiexec -n "$RANKS"); else read -r -a launch <<< "$MPIEXEC -n $RANKS"; fi
    "${launch[@]}" python -m mpi_afl.train --dataset digits --run.device="$DEVICE" --run.placement=$placement \
        --server.concurrency=$((RANKS - 1)) --max-versions=$VERSIONS --out "$dir" > "$dir.log" 2>&1
    rc=$?
    python - "$dir" "$placement" "$RANKS" "$rc" "$DEVICE" "$VERSIONS" <<'EOF' || status=1
import json, sys
from collections import Counter
from pathlib import Path
import torch
out, placement, ranks, rc, device, versions = (Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                               sys.argv[5], int(sys.argv[6]))
if rc != 0 or not (out / "summary.json").exists():
    print(json.dumps({"check": f"mpiexec_{placement}", "ok": False, "exit": rc, "log": f"{out}.log"}))
    sys.exit(1)
s = json.loads((out / "summary.json").read_text())
rec = s["ranks"]
per_device = Counter((r["host"], r["device"]) for r in rec)
ok = (len(rec) == ranks and s["versions"] == versions
      and all(r["device"].startswith(device) and (r["peak_gpu_bytes"] > 0 or device == "cpu") for r in rec))
gpus = torch.cuda.device_count() if device == "cuda" else 0
if placement == "server_gpu" and gpus > 1:   # rank 0 alone on its device
    ok = ok and per_device[(rec[0]["host"], rec[0]["device"])] == 1
print(json.dumps({"check": f"mpiexec_{placement}", "ok": ok, "ranks": len(rec), "gpus": gpus,
                  "ranks_per_device": {f"{h} {d}": n for (h, d), n in sorted(per_device.items())},
                  "peak_gpu_mb": [round(r["peak_gpu_bytes"] / 2**20, 1) for r in rec],
                  "updates_per_second": round(s["updates_per_second"], 1),
                  "final_accuracy": s["final_accuracy"]}))
sys.exit(0 if ok else 1)
EOF
done
# 3. Distillation over a group of ranks (distill.ranks, bench/README.md): per FedRevive and FedEcho update,
#    D = 1 against D = 0 (bench/distill_cost.py --group, JSON lines), then a whole FedRevive run with D = 0
#    against D = 1 on 3 ranks (bench/distill_group_run.py; its last line has the speedup and idle fractions).
if [ "$MPIEXEC" = mpiexec ]; then group=(mpiexec -n 2); else read -r -a group <<< "$MPIEXEC -n 2"; fi
if [ "$DEVICE" = cuda ]; then
    "${group[@]}" python "$HERE/distill_cost.py" --group --presets paper_cifar10 --calls 3 --device cuda || status=1
    python "$HERE/distill_group_run.py" --ranks 3 --distill-ranks 1 --max-versions 120 --repeats 1 \
        -- --run.device=cuda || status=1
else
    "${group[@]}" python "$HERE/distill_cost.py" --group --presets fmnist_cpu --calls 1 --settings preset \
        --device cpu || status=1
    python "$HERE/distill_group_run.py" --ranks 3 --distill-ranks 1 --max-versions 30 --repeats 1 || status=1
fi

echo "{\"check\": \"all\", \"ok\": $([ $status = 0 ] && echo true || echo false), \"out\": \"$OUT\"}"
exit $status
