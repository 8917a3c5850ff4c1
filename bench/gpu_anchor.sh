#!/usr/bin/env bash
# The FedRevive GPU anchor, about 8 minutes on one H100: what FedRevive costs and does at the paper's scale.
#   bench/gpu_anchor.sh                  (on a GPU node, mpi_afl installed and its environment active)
#   GPU_ANCHOR_DEVICE=cpu bench/gpu_anchor.sh     (the same steps on the CPU with small sizes: how it is tested)
# 1. bench/distill_cost.py on paper_cifar10 shapes (ResNet-18, the research code's distillation settings):
#    FedRevive server seconds per update and per client job, FedEcho's beside it (JSON lines).
# 2. One short FedRevive run: paper_cifar10 (CIFAR-10 files needed: data.root, $MPI_AFL_DATA or the user cache;
#    without them paper_28x28 on Fashion-MNIST, and the JSON line says so), the true label histograms as the
#    teachers' class proportions, a 10% real KD split, the research code's gates (freeze 50, warm-up 100),
#    up to 450 versions or GPU_ANCHOR_SECONDS (default 300) of wall time, one process on the GPU.
# 3. The KD-input probe on its final checkpoint (experiments/probes/synthetic_images.py --kd-probe 50): the
#    held-out loss change of KD on the real split, on the run's pool and on fresh images.
# Prints JSON lines (the last: {"check": "gpu_anchor", ...}); exit 1 if a step failed. Outputs in
# $GPU_ANCHOR_OUT (default a temporary directory).
set -uo pipefail
DEVICE=${GPU_ANCHOR_DEVICE:-cuda}
OUT=${GPU_ANCHOR_OUT:-$(mktemp -d /tmp/mpi_afl-gpu-anchor-XXXXXX)}
SECONDS_BUDGET=${GPU_ANCHOR_SECONDS:-300}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
status=0
if [ "$DEVICE" = cuda ]; then
    COST=(--presets paper_cifar10 --calls 3)
    VERSIONS=450; GATES=(--distill.freeze_versions=50 --distill.warmup_versions=100); PROBE=50; FRESH=50
    if python -c "from mpi_afl.data.datasets import locate; locate('cifar10')" 2>/dev/null; then
        PRESET=paper_cifar10
    else
        PRESET=paper_28x28
    fi
    SIZES=()
else
    COST=(--presets fmnist_cpu --calls 1 --research-settings false)
    VERSIONS=40; GATES=(--distill.freeze_versions=10 --distill.warmup_versions=20); PROBE=5; FRESH=2
    PRESET=fmnist_cpu; SECONDS_BUDGET=${GPU_ANCHOR_SECONDS:-120}
    SIZES=(--data.num_clients=20)
fi
[ "$DEVICE" = cuda ] && { nvidia-smi -L || status=1; }

python "$HERE/distill_cost.py" "${COST[@]}" --device "$DEVICE" || status=1

run="$OUT/fedrevive-$PRESET"
python -m mpi_afl.train --preset "$PRESET" --algorithm fedrevive --distill.proxy=histogram --data.kd_fraction=0.1 \
    "${GATES[@]}" "${SIZES[@]}" --max-versions "$VERSIONS" --run.max_wall_seconds="$SECONDS_BUDGET" \
    --run.device="$DEVICE" --out "$run" > "$run.log" 2>&1 || status=1
python - "$run" "$PRESET" <<'PY' || status=1
import json, sys
from pathlib import Path
run, preset = Path(sys.argv[1]), sys.argv[2]
if not (run / "summary.json").exists():
    print(json.dumps({"check": "anchor_run", "ok": False, "log": f"{run}.log"}))
    sys.exit(1)
s = json.loads((run / "summary.json").read_text())
stats = s["algorithm_stats"]
print(json.dumps({"check": "anchor_run", "ok": True, "preset": preset,
                  "why_preset": None if preset != "paper_28x28" else "no CIFAR-10 files on this node",
                  "versions": s["versions"], "virtual_time": round(s["virtual_time"], 2),
                  "stop_reason": s["stop_reason"], "wall_seconds": round(s["wall_seconds"], 1),
                  "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"],
                  "distill_seconds_per_version": round(stats.get("distill_seconds", 0.0) / max(s["versions"], 1), 4),
                  **{k: stats.get(k) for k in ("kd_applied", "kd_loss_change", "kd_norm_ratio", "synth_agreement")},
                  "device": s["ranks"][0]["device"]}))
PY
python "$REPO/experiments/probes/synthetic_images.py" "$run" --kd-probe "$PROBE" --kd-probe-fresh "$FRESH" --out "$OUT/images" \
    > "$OUT/probe.jsonl" 2> "$OUT/probe.log" || status=1
python - "$OUT/probe.jsonl" <<'PY' || status=1
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
if not rows or "kd_probe" not in rows[-1]:
    print(json.dumps({"check": "anchor_probe", "ok": False}))
    sys.exit(1)
print(json.dumps({"check": "anchor_probe", "ok": True, "kd_probe": rows[-1]["kd_probe"]}))
PY
echo "{\"check\": \"gpu_anchor\", \"ok\": $([ $status = 0 ] && echo true || echo false), \"device\": \"$DEVICE\", \"out\": \"$OUT\"}"
exit $status
