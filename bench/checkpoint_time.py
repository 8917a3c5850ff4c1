"""How long the server's checkpoint takes, against SLURM's KillWait.

A pre-empted or time-limited job must write checkpoint.h5 between the signal and
the SIGKILL that follows KillWait seconds later (30 s by default). What the
checkpoint holds grows with the model and with K: the global model, every
version snapshot still referenced by a job in flight (up to K of them with
B = 1), and the algorithm's state (FedRevive: 8 teacher models, the generator,
the synthetic pool). This writes checkpoints of that layout with
storage/checkpoint.py (the server's own writer: HDF5, checksums, fsync, atomic
rename) into --dir and prints one JSON line per size:

    {"params": 11173962, "snapshots": 100, "teachers": 8, "bytes": ..., "write_seconds": ...,
     "mb_per_second": ..., "dir": "..."}

Run it on the file system your runs write to (`--dir` under the run directory's
parent): a parallel file system under load is what decides the bound.

    python bench/checkpoint_time.py --dir /scratch/$USER/ckpt-test
    python bench/checkpoint_time.py --params 11173962 --snapshots 1,25,100 --teachers 8
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mpi_afl.storage.checkpoint import save_checkpoint

RESNET18_CIFAR = 11_173_962   # paper_cifar10's model (models/resnet.py, 10 classes), in floats
GENERATOR = 1_000_000         # FedRevive's meta-generator, order of magnitude (paper presets)
POOL = 2_000 * 3 * 32 * 32    # synthetic image pool, order of magnitude


def state(params: int, snapshots: int, teachers: int) -> dict:
    """A server state with the checkpoint's layout and sizes (values are random: compression is off)."""
    def model() -> torch.Tensor:
        return torch.randn(params)

    return {
        "server_format": 0, "version": snapshots, "global_model": model(),
        "versions": {"versions": list(range(snapshots)), "models": [model() for _ in range(snapshots)]},
        "algorithm": {"teachers": [model() for _ in range(teachers)],
                      "generator": torch.randn(GENERATOR) if teachers else torch.zeros(0),
                      "pool": torch.randn(POOL) if teachers else torch.zeros(0)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=RESNET18_CIFAR, help="model size in floats")
    p.add_argument("--snapshots", default="1,10,50,100", help="version snapshots referenced by jobs in flight")
    p.add_argument("--teachers", type=int, default=8, help="FedRevive/FedEcho teacher models (0: a baseline)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory under /tmp)")
    p.add_argument("--repeats", type=int, default=2, help="writes per size; the median is printed")
    args = p.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mpi_afl-ckpt-"))
    base.mkdir(parents=True, exist_ok=True)
    for snapshots in (int(s) for s in args.snapshots.split(",")):
        s = state(args.params, snapshots, args.teachers)
        path = base / "checkpoint.h5"
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            save_checkpoint(path, s)
            times.append(time.perf_counter() - t0)
        size = path.stat().st_size
        path.unlink()
        seconds = sorted(times)[len(times) // 2]
        print(json.dumps({"params": args.params, "snapshots": snapshots, "teachers": args.teachers, "bytes": size,
                          "write_seconds": round(seconds, 3), "mb_per_second": round(size / seconds / 1e6, 1),
                          "dir": str(base)}), flush=True)
        del s


if __name__ == "__main__":
    main()
