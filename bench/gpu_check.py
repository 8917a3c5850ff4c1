"""GPU checks that need no MPI: models, local training + server aggregation, FedRevive's KD path, flat-buffer
transfers, and FedRevive's server seconds per update on paper_cifar10 shapes. Run by bench/gpu_check.sh.

    python bench/gpu_check.py [--device cuda] [--only models,train,kd,transfer,fedrevive_speed]

Prints one JSON line per check: {"check": ..., "ok": true/false, ...measurements}. Exit 1 if any check
failed. `--device cpu --small` runs the same code paths on the CPU with small sizes (how it is tested
without a GPU).
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mpi_afl.algorithms.fedrevive import FedRevive
from mpi_afl.algorithms.base import ServerContext, Update
from mpi_afl.config import parse_args
from mpi_afl.models import build_model
from mpi_afl.models.flat import flatten, param_mask
from mpi_afl.slices import drain

RESULTS: list[dict] = []


def report(check: str, ok: bool, **fields) -> None:
    line = {"check": check, "ok": bool(ok), **fields}
    RESULTS.append(line)
    print(json.dumps(line), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_models(device: torch.device, small: bool) -> None:
    """Each model gives the same outputs on the device as on the CPU (TF32 off), and trains a step there."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = {"cnn": (1, 28), "convnet": (1, 28), "resnet18": (3, 32)}
    for name, (channels, size) in shapes.items():
        for norm in ("batchnorm", "stat"):
            torch.manual_seed(0)
            cpu = build_model(name, in_channels=channels, image_size=size, num_classes=10, norm=norm).eval()
            dev = build_model(name, in_channels=channels, image_size=size, num_classes=10, norm=norm)
            dev.load_state_dict(cpu.state_dict())
            dev = dev.to(device).eval()
            x = torch.randn(4 if small else 16, channels, size, size)
            with torch.no_grad():
                diff = (cpu(x) - dev(x.to(device)).cpu()).abs().max().item()
            dev.train()
            loss = torch.nn.functional.cross_entropy(dev(x.to(device)), torch.zeros(len(x), dtype=torch.long,
                                                                                     device=device))
            loss.backward()
            grads_finite = all(torch.isfinite(p.grad).all().item() for p in dev.parameters() if p.grad is not None)
            report("model", diff < 1e-3 and grads_finite, model=name, norm=norm, max_abs_diff=diff,
                   grads_finite=grads_finite)


def run_trainer(args: list[str], out: Path, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mpi_afl.train", *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer exit {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def check_train(device: torch.device, small: bool, tmp: Path) -> None:
    """One process: local training and server aggregation on the device, learning something."""
    s = run_trainer(["--dataset", "digits", f"--run.device={device.type}", "--max-versions", "10" if small else "60",
                     "--server.concurrency=4"], tmp / "train")
    r0 = s["ranks"][0]
    ok = r0["device"].startswith(device.type) and s["final_accuracy"] > (0.1 if small else 0.5)
    if device.type == "cuda":
        ok = ok and r0["peak_gpu_bytes"] > 0
    report("local_train", ok, final_accuracy=s["final_accuracy"], versions=s["versions"], rank0=r0)


def check_kd(device: torch.device, small: bool, tmp: Path) -> None:
    """FedRevive's server path (synthesis, KD, blend) on the device: KD is applied to stale updates."""
    s = run_trainer(["--dataset", "digits", "--algorithm", "fedrevive", "--model.norm=stat",
                     f"--run.device={device.type}", "--max-versions", "12" if small else "60",
                     "--server.concurrency=4", "--data.num_clients=12", "--distill.freeze_versions=2",
                     "--distill.warmup_versions=4"], tmp / "kd")
    stats = s["algorithm_stats"]
    ok = stats.get("kd_applied", 0) > 0 and np.isfinite(s["final_accuracy"])
    report("server_kd", ok, kd_applied=stats.get("kd_applied"), distill_seconds=stats.get("distill_seconds"),
           kd_norm_ratio=stats.get("kd_norm_ratio"), final_accuracy=s["final_accuracy"], rank0=s["ranks"][0])


def check_transfer(device: torch.device, small: bool) -> None:
    """Flat float32 buffers host -> device -> host: exact round trip, bandwidth pageable and pinned."""
    n = 1_000_000 if small else 11_173_962   # ResNet-18 (paper_cifar10) in floats
    host = torch.randn(n)
    for pinned in (False, True):
        src = host.pin_memory() if pinned and device.type == "cuda" else host
        times = []
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            on_dev = src.to(device, non_blocking=pinned)
            back = on_dev.to("cpu")
            sync(device)
            times.append(time.perf_counter() - t0)
        best = min(times)
        report("flat_transfer", torch.equal(back, host), floats=n, pinned=pinned,
               round_trip_seconds=round(best, 5), gb_per_second=round(2 * 4 * n / best / 1e9, 2))


def check_fedrevive_speed(device: torch.device, small: bool) -> None:
    """FedRevive's server seconds per update with paper_cifar10's model and distillation settings (ResNet-18 on
    3x32x32, the preset's generator, KD steps and teachers), past the freeze/warm-up gates, on stale updates."""
    cfg, _ = parse_args(["--preset", "paper_cifar10", "--distill.freeze_versions=0", "--distill.warmup_versions=0"])
    if small:
        cfg.model.name = "cnn"
        d = cfg.distill
        d.nz, d.ngf, d.synth_batch, d.synth_steps, d.pool_size, d.kd_steps = 16, 8, 8, 2, 32, 2
    clients, classes = cfg.data.num_clients, 10
    shape = (3, 32, 32)

    def make_model():
        return build_model(cfg.model.name, in_channels=3, image_size=32, num_classes=classes,
                           norm=cfg.model.norm).to(device)

    torch.manual_seed(0)
    x0 = flatten(make_model()).to(device)
    snapshots = {0: x0}
    hist = np.random.default_rng(0).multinomial(350, np.full(classes, 1 / classes), size=clients)
    ctx = ServerContext(cfg=cfg, device=device, global_model=x0, version=0, snapshot=snapshots.__getitem__,
                        make_model=make_model, param_mask=param_mask(make_model()).to(device), num_classes=classes,
                        image_shape=shape, data_mean=(0.49, 0.48, 0.45), data_std=(0.25, 0.24, 0.26),
                        client_histograms=hist, kd_x=None, kd_y=None)
    alg = FedRevive(cfg, ctx)
    rng = np.random.default_rng(1)
    updates = 4 if small else 30
    seconds, kd = [], 0
    for i in range(updates + 2):
        base = max(0, ctx.version - int(rng.integers(0, 20)))   # stale: the KD path
        delta = 1e-3 * torch.randn(len(x0), device=device)
        update = Update(client_id=int(rng.integers(clients)), job_index=i, base_version=base,
                        staleness=ctx.version - base, delta=delta, num_samples=350, loss=1.0)
        sync(device)
        t0 = time.perf_counter()
        outcome = alg.on_update(update, ctx)
        outcome = drain(outcome) if hasattr(outcome, "__next__") else outcome
        sync(device)
        if i >= 2:                       # the first two build the generator and the pool
            seconds.append(time.perf_counter() - t0)
        kd += sum(count == "kd_applied" for count, _ in outcome.notes)
        if outcome.model is not None:
            ctx = dataclasses.replace(ctx, version=ctx.version + 1, global_model=outcome.model)
            snapshots[ctx.version] = outcome.model
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    report("fedrevive_server_speed", kd > 0 and all(np.isfinite(seconds)), model=cfg.model.name,
           params=len(x0), updates=len(seconds), seconds_per_update_median=round(float(np.median(seconds)), 4),
           seconds_per_update_max=round(float(np.max(seconds)), 4), kd_applied=kd, peak_gpu_bytes=int(peak))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="small sizes (for a CPU run of the code paths)")
    p.add_argument("--only", default="models,train,kd,transfer,fedrevive_speed")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        report("cuda_available", False, error="torch sees no GPU (torch.version.cuda = "
                                              f"{torch.version.cuda}); check the driver and CUDA_VISIBLE_DEVICES")
        return 1
    if device.type == "cuda":
        report("cuda_available", True, gpus=torch.cuda.device_count(), name=torch.cuda.get_device_name(device),
               torch=torch.__version__, cuda=torch.version.cuda)
    tmp = Path(tempfile.mkdtemp(prefix="mpi_afl-gpu-check-"))
    checks = {"models": lambda: check_models(device, args.small),
              "train": lambda: check_train(device, args.small, tmp),
              "kd": lambda: check_kd(device, args.small, tmp),
              "transfer": lambda: check_transfer(device, args.small),
              "fedrevive_speed": lambda: check_fedrevive_speed(device, args.small)}
    for name in args.only.split(","):
        try:
            checks[name]()
        except Exception as e:   # a check that crashes is a failed check; the others still run
            report(name, False, error=f"{type(e).__name__}: {e}"[:2000])
    return 0 if all(r["ok"] for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
