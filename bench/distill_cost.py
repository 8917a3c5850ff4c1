"""Server-side distillation cost: seconds of one FedRevive / FedEcho update, by phase, against one client job.

    python bench/distill_cost.py                                   # fmnist_cpu, paper_28x28, paper_cifar10
    python bench/distill_cost.py --presets fmnist_cpu --calls 5
    python bench/distill_cost.py --research-settings false          # each preset's own distill settings
    mpiexec -n 2 python bench/distill_cost.py --group --presets fmnist_cpu   # distill.ranks = 1 against 0

For each preset's shapes (data set, model, generator size) and, by default, the FedRevive research code's
distillation settings (synthesis on every KD call, `distill.kd_steps` = 10 KD iterations of
`distill.kd_batch` = 32 images per teacher, 8 teachers), one process measures side by side, on random inputs
of the data set's shape (the cost does not depend on the pixel values):

  client_job_seconds        one client job of the preset (client.iterations x client.batch_size, its optimizer)
  fedrevive_seconds         one FedRevive update past the warm-up with the batched teachers (distill/ensemble.py):
                            a synthesis with L_adv, a Reptile step and the KD iterations, plus the KD diagnostic
  reference_seconds         the same update with the per-teacher path (tests/reference_distill.py: one module per
                            teacher, one after another; the student sees each teacher's batch in its own forward)
  fedecho_seconds           one FedEcho update (its default: CA2FL backbone step excluded, synthesis + KD)
  *_jobs                    each of the above divided by client_job_seconds
  speedup                   reference_seconds / fedrevive_seconds
  phases                    seconds of one FedRevive update per phase, measured under torch.profiler (which adds
                            overhead: compare the shares, not the sum, with fedrevive_seconds):
                            synth.generator (fast generator forward + normalisation), synth.teachers (teacher
                            forward with the L_bn statistics), synth.student (student forward for L_adv),
                            synth.backward (backward through teachers and generator, generator optimizer step),
                            synth.reptile, kd.draw (pool sampling), kd.teachers (teacher forward on the KD batches),
                            kd.student (student forward + backward + Adam step), check (the KD diagnostic's two
                            held-out forwards, kd.loss_check), other (everything else: bookkeeping, loss terms,
                            filters)

With `--group` under `mpiexec -n D+1` (D >= 1 distilling ranks besides rank 0, `distill.ranks`), every
rank builds the same teachers and the bench measures, side by side and interleaved, one FedRevive and one
FedEcho update with rank 0 alone (D = 0; the other ranks wait in their command loop, sleeping) and with the
group (D; rank 0 sends each call as the server does, the others run it in `distill.group.serve`), at the
preset's settings and at the research settings (`--research-settings` picks one), and prints per preset:

  d0_fedrevive_seconds, dD_fedrevive_seconds, fedrevive_ratio     one update, and dD / d0 (target <= 0.6, D = 1)
  d0_fedecho_seconds, dD_fedecho_seconds, fedecho_ratio           the same for FedEcho
  d0_phases, dD_phases                                            rank 0's FedRevive phases (as `phases` above)

Each figure is the median over `--calls` timed calls after one untimed warm-up call. It runs on a GPU unchanged
(`--device cuda`, the default when one is present); on a GPU the phases are CPU-side times of the launches plus
synchronisation, and the totals are synchronised wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the per-teacher reference path lives with the tests

import reference_distill as reference  # noqa: E402

from mpi_afl.algorithms.base import ServerContext  # noqa: E402
from mpi_afl.algorithms.fedecho import FedEcho  # noqa: E402
from mpi_afl.algorithms.fedrevive import FedRevive  # noqa: E402
from mpi_afl.client.local_train import train_job  # noqa: E402
from mpi_afl.transport.messages import JobSpec  # noqa: E402
from mpi_afl.config import Config, parse_args  # noqa: E402
from mpi_afl.names import DATASETS  # noqa: E402
from mpi_afl.models import build_model  # noqa: E402
from mpi_afl.models.flat import flatten, load_flat, param_mask  # noqa: E402
from mpi_afl.slices import drain  # noqa: E402

RESEARCH = ["--distill.synth_every=1", "--distill.kd_steps=10", "--distill.kd_batch=32", "--distill.teachers=8",
            "--echo.teachers=8"]
PHASES = ["synth.generator", "synth.teachers", "synth.student", "synth.backward", "synth.reptile", "kd.draw",
          "kd.teachers", "kd.student", "check"]


def preset_config(name: str, research: bool, device: str) -> Config:
    return parse_args(["--preset", name, *(RESEARCH if research else []), f"--run.device={device}"])[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class Bench:
    """One preset's models, teachers and algorithms, on random data of its shapes."""

    def __init__(self, cfg: Config, device: torch.device, seed: int = 0):
        self.cfg, self.device = cfg, device
        info = DATASETS[cfg.data.dataset]
        self.shape = (info.channels, info.image_size, info.image_size)
        self.classes = info.num_classes

        def make_model() -> torch.nn.Module:
            return build_model(cfg.model.name, in_channels=info.channels, image_size=info.image_size,
                               num_classes=info.num_classes, norm=cfg.model.norm).to(device)

        self.make_model = make_model
        g = torch.Generator().manual_seed(seed)
        n = cfg.data.samples_per_client or 350
        self.x = torch.randn(n, *self.shape, generator=g).to(device)
        self.y = torch.randint(info.num_classes, (n,), generator=g).to(device)
        self.model = make_model()
        self.x0 = flatten(self.model)
        # Teachers = client models: one client job each from x0 (their statistics are real EMAs).
        self.clients = [self.x0 + self.client_job(job) for job in range(cfg.distill.teachers)]
        histograms = np.stack([np.bincount(self.y.cpu().numpy(), minlength=info.num_classes)] * 4)
        self.ctx = ServerContext(
            cfg=cfg, device=device, global_model=self.x0, version=cfg.distill.warmup_versions + 1,
            snapshot=lambda v: self.x0, make_model=make_model, param_mask=param_mask(self.model).to(device),
            num_classes=info.num_classes, image_shape=self.shape, data_mean=info.mean, data_std=info.std,
            client_histograms=histograms, check_x=self.x[:cfg.distill.kd_check_images],
            check_y=self.y[:cfg.distill.kd_check_images])

    def client_job(self, job: int = 0) -> torch.Tensor:
        c = self.cfg.client
        return train_job(self.model, self.x0, self.x, self.y, torch.arange(len(self.x), device=self.device),
                         iterations=c.iterations, batch_size=c.batch_size, optimizer=c.optimizer, lr=c.lr,
                         momentum=c.momentum, weight_decay=c.weight_decay, augment=c.augment, seed=0,
                         job=JobSpec(job, 0, 0, 0.0)).delta

    def fedrevive(self) -> FedRevive:
        alg = FedRevive(self.cfg, self.ctx)
        for k, model in enumerate(self.clients):
            alg.teachers.push(k % 4, 0, model)
        return alg

    def fedrevive_update(self, alg: FedRevive, path: str) -> None:
        """One FedRevive KD call as the algorithm runs it (synthesis, Reptile, KD), plus the KD diagnostic."""
        # a new version per call, so synthesis runs whenever synth_every says (every call: 1)
        self.ctx = ctx = dataclasses.replace(self.ctx, version=self.ctx.version + 1)
        d = self.cfg.distill
        q = alg.teachers.proportions()
        if path == "batched":
            drain(alg.knowledge(ctx, self.x0, share=0.5))   # the KD diagnostic is its last part
            return
        # the same steps with one module per teacher
        stacked = torch.stack(alg.teachers.models)
        teachers = reference.LoopEnsemble(self.make_model, stacked)
        load_flat(alg.student, self.x0)
        if alg.synthesis_due(ctx.version):
            drain(alg.synth.synthesize(teachers, q, alg.student, adversarial=True))
            alg.last_synthesis = ctx.version
        optimizer = torch.optim.Adam(alg.student.parameters(), lr=d.kd_lr, weight_decay=d.kd_weight_decay)
        reference.distill(alg.student, teachers.modules, lambda k: alg.synth.sample(q[k], d.kd_batch)[0],
                          optimizer=optimizer, steps=d.kd_steps, temperature=d.temperature)
        drain(alg.distilled(ctx, self.x0, 0.5, []))

    def fedecho_update(self, alg: FedEcho) -> None:
        self.ctx = dataclasses.replace(self.ctx, version=self.ctx.version + 1)
        drain(alg.distill(self.ctx, self.x0, staleness=10.0))


def phase_seconds(update, calls: int, device: torch.device) -> dict[str, float]:
    """Per-phase CPU seconds of one `update()` under torch.profiler (record_function labels in the code)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            update()
        sync(device)
        total = (time.perf_counter() - start) / calls
    sums = {name: 0.0 for name in PHASES}
    for event in prof.key_averages():
        if event.key in sums:
            sums[event.key] += event.cpu_time_total / 1e6 / calls
    sums = {k: round(v, 4) for k, v in sums.items()}
    sums["other"] = round(max(total - sum(sums.values()), 0.0), 4)
    sums["profiled_total"] = round(total, 4)
    return sums


def interleaved_medians(runs: dict, calls: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each of `runs` (name -> function) over `calls` timed calls after one untimed warm-up
    call, interleaved so that a change in machine load hits every measure alike."""
    for fn in runs.values():  # warm-up: first-call allocations, the pool gets its first batch
        fn()
    times = {k: [] for k in runs}
    for _ in range(calls):
        for k, fn in runs.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(name: str, research: bool, calls: int, device: torch.device) -> dict:
    cfg = preset_config(name, research, str(device))
    bench = Bench(cfg, device)
    revive, reference_alg = bench.fedrevive(), bench.fedrevive()
    echo_cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, algorithm="fedecho"))
    echo = FedEcho(echo_cfg, bench.ctx)
    for k, model in enumerate(bench.clients):
        echo.teachers.push(k, 0, model)
    runs = {"client_job": lambda: bench.client_job(),
            "fedrevive": lambda: bench.fedrevive_update(revive, "batched"),
            "reference": lambda: bench.fedrevive_update(reference_alg, "reference"),
            "fedecho": lambda: bench.fedecho_update(echo)}
    med = interleaved_medians(runs, calls, device)
    job = med["client_job"]
    d = cfg.distill
    return {
        "bench": "distill_cost", "preset": name, "device": str(device), "model": cfg.model.name,
        "settings": {"research": research, "synth_every": d.synth_every, "synth_steps": d.synth_steps,
                     "synth_batch": d.synth_batch, "ngf": d.ngf, "nz": d.nz, "kd_steps": d.kd_steps,
                     "kd_batch": d.kd_batch, "teachers": d.teachers, "client_iterations": cfg.client.iterations,
                     "client_batch": cfg.client.batch_size},
        "calls": calls,
        "client_job_seconds": round(job, 4),
        "fedrevive_seconds": round(med["fedrevive"], 4), "fedrevive_jobs": round(med["fedrevive"] / job, 2),
        "reference_seconds": round(med["reference"], 4), "reference_jobs": round(med["reference"] / job, 2),
        "speedup": round(med["reference"] / med["fedrevive"], 2),
        "fedecho_seconds": round(med["fedecho"], 4), "fedecho_jobs": round(med["fedecho"] / job, 2),
        "phases": phase_seconds(lambda: bench.fedrevive_update(revive, "batched"), max(1, calls // 2), device),
    }


def measure_group(name: str, research: bool, calls: int, device: torch.device, comm) -> dict | None:
    """D = 0 against D = comm size - 1 (see the module docstring); the row on rank 0, None elsewhere."""
    from mpi_afl.distill.group import Group, drive, in_group, serve, share_state
    cfg = preset_config(name, research, str(device))
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, ranks=comm.Get_size() - 1))
    echo_cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, algorithm="fedecho"))
    bench, group = Bench(cfg, device), Group(comm)
    solo_ctx = bench.ctx
    group_ctx = dataclasses.replace(solo_ctx, group=group)
    if group.rank:   # a member: serve FedRevive's calls, then FedEcho's (each loop ends at rank 0's stop)
        for algorithm in (FedRevive(cfg, group_ctx), FedEcho(echo_cfg, group_ctx)):
            serve(group, algorithm, group_ctx)
        return None
    algs = {}
    for label, ctx in (("d0", solo_ctx), ("dD", group_ctx)):
        revive, echo = FedRevive(cfg, ctx), FedEcho(echo_cfg, ctx)
        for k, model in enumerate(bench.clients):
            revive.teachers.push(k % 4, 0, model)
            echo.teachers.push(k, 0, model)
        algs[label] = (revive, echo, ctx)
    d0_revive, d0_echo, _ = algs["d0"]
    dd_revive, dd_echo, _ = algs["dD"]
    share_state(dd_revive, group)
    ctxs = {label: ctx for label, (_, _, ctx) in algs.items()}

    def next_version(label: str) -> ServerContext:
        """A new version per call, so synthesis runs whenever synth_every says."""
        ctxs[label] = dataclasses.replace(ctxs[label], version=ctxs[label].version + 1)
        return ctxs[label]

    def revive_update(alg: FedRevive, label: str) -> None:
        drive(in_group(alg, "knowledge", next_version(label), bench.x0, share=0.5))   # with the KD diagnostic

    def echo_update(alg: FedEcho, label: str) -> None:
        drive(in_group(alg, "distill", next_version(label), bench.x0, staleness=10.0))

    revive = interleaved_medians({"d0": lambda: revive_update(d0_revive, "d0"),
                                  "dD": lambda: revive_update(dd_revive, "dD")}, calls, device)
    phases = {"d0_phases": phase_seconds(lambda: revive_update(d0_revive, "d0"), max(1, calls // 2), device),
              "dD_phases": phase_seconds(lambda: revive_update(dd_revive, "dD"), max(1, calls // 2), device)}
    group.stop()   # the members move on to FedEcho
    share_state(dd_echo, group)
    echo = interleaved_medians({"d0": lambda: echo_update(d0_echo, "d0"),
                                "dD": lambda: echo_update(dd_echo, "dD")}, calls, device)
    group.stop()
    d = cfg.distill
    return {"bench": "distill_cost_group", "preset": name, "device": str(device), "model": cfg.model.name,
            "distill_ranks": group.size - 1, "settings": {"research": research, "synth_every": d.synth_every,
            "synth_steps": d.synth_steps, "synth_batch": d.synth_batch, "kd_steps": d.kd_steps,
            "kd_batch": d.kd_batch, "teachers": d.teachers, "echo_teachers": cfg.echo.teachers},
            "calls": calls,
            "d0_fedrevive_seconds": round(revive["d0"], 4), "dD_fedrevive_seconds": round(revive["dD"], 4),
            "fedrevive_ratio": round(revive["dD"] / revive["d0"], 3),
            "d0_fedecho_seconds": round(echo["d0"], 4), "dD_fedecho_seconds": round(echo["dD"], 4),
            "fedecho_ratio": round(echo["dD"] / echo["d0"], 3), **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="fmnist_cpu,paper_28x28,paper_cifar10")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per measure (median); the ResNet-18 "
                        "preset gets max(1, calls // 3) on a CPU")
    parser.add_argument("--research-settings", default="true", choices=["true", "false"],
                        help="the research code's distillation settings (default) or the preset's own")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--group", action="store_true", help="under mpiexec -n D+1: D = 0 against D = R-1 distilling "
                        "ranks (distill.ranks), at --research-settings (both when 'both')")
    parser.add_argument("--settings", default="both", choices=["both", "preset", "research"],
                        help="with --group: which distillation settings to measure")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a server rank under mpiexec on shared cores
    device = torch.device(args.device)
    if args.group:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        if device.type == "cuda":
            device = torch.device(f"cuda:{comm.Get_rank() % torch.cuda.device_count()}")
        for name in [p for p in args.presets.split(",") if p]:
            for research in {"both": (False, True), "preset": (False,), "research": (True,)}[args.settings]:
                row = measure_group(name, research, args.calls, device, comm)
                if row is not None:
                    print(json.dumps(row), flush=True)
        return
    for name in [p for p in args.presets.split(",") if p]:
        calls = max(1, args.calls // 3) if name == "paper_cifar10" and device.type == "cpu" else args.calls
        print(json.dumps(measure(name, args.research_settings == "true", calls, device)), flush=True)


if __name__ == "__main__":
    main()
