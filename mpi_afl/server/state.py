"""The server's state for checkpoint.h5 and its restore, the model's sha256 and model.pt.

A checkpoint holds everything a resumed run needs to continue bit-identically in the virtual clock: the
global model, the version snapshots jobs still reference, the jobs in flight (sent again on resume), the
client sampler, counters, evaluations, algorithm_stats and the algorithm's own state.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models.flat import load_flat
from ..storage.atomic import atomic_write_bytes
from ..storage.checkpoint import CheckpointError
from .evaluator import EvalPoint

if TYPE_CHECKING:
    from .loop import Server

CHECKPOINT_FORMAT = 3   # bump when the server state layout changes (2: FedRevive's teachers keep their versions;
                        # 3: FedEcho keeps its buffered updates' staleness, and a StatTracker's update
                        # count is part of the flat model)


def check_server_format(state: dict) -> None:
    """Refuse a checkpoint whose server state was written with another layout (CheckpointError)."""
    if state.get("server_format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint server state format {state.get('server_format')!r}; "
                              f"this version reads {CHECKPOINT_FORMAT}")


def model_sha256(x: torch.Tensor) -> str:
    """The sha256 of the flat model's float32 bytes: summary.json's `model_sha256`."""
    return hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()


def save_model(path: Path, model: torch.nn.Module, x: torch.Tensor, run_id: str, version: int) -> None:
    """The flat model `x` as a torch state dict of `model` (`model.load_state_dict(torch.load(path)["state_dict"])`),
    written atomically. Serialised in memory first (one model): torch.save into a file that fails half-way
    raises a RuntimeError about stream positions, where a plain write raises the OSError that says why."""
    load_flat(model, x)
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "run_id": run_id, "version": version,
                "model_sha256": model_sha256(x)}, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def state_dict(server: Server) -> dict:
    jobs, versions = server.jobs, server.versions
    return {
        "server_format": CHECKPOINT_FORMAT,
        "config": server.cfg.to_json(),
        "version": server.version,
        "now": jobs.now,
        "next_job": jobs.next_job,
        "wall": server.wall(),
        "global_model": server.x.cpu(),
        "versions": {"versions": sorted(versions.models),
                     "models": [versions.models[v].cpu() for v in sorted(versions.models)]},
        "rng": jobs.rng.bit_generator.state,
        "in_flight": [asdict(job) for _, job in sorted(jobs.in_flight.items())],
        "busy": torch.from_numpy(jobs.busy.copy()),
        "counters": {"received": server.received, "accepted": server.accepted, "rejected": server.rejected,
                     "busy_seconds": server.busy_seconds, "last_arrival_wall": server.last_arrival_wall},
        "evals": [asdict(e) for e in server.evaluator.evals],
        "stats": dict(server.stats),
        "algorithm": server.algorithm.state_dict(),
        "log_counts": server.log.counts(),
        "run_id": server.run_id,
        "nonfinite_streak": server.nonfinite_streak,
        "next_eval_time": server.evaluator.next_eval_time,
    }


def load_state_dict(server: Server, state: dict) -> None:
    """Continue from a checkpoint: every job that was in flight is sent again (workers lost them)."""
    check_server_format(state)
    jobs, evaluator = server.jobs, server.evaluator
    server.version, jobs.now, jobs.next_job = int(state["version"]), float(state["now"]), int(state["next_job"])
    server.t0 = time.perf_counter() - float(state["wall"])
    server.x = state["global_model"].to(server.device)
    models = {int(v): m.to(server.device) for v, m in zip(state["versions"]["versions"], state["versions"]["models"])}
    models[server.version] = server.x
    server.versions.restore(models, server.version)
    jobs.rng.bit_generator.state = state["rng"]
    jobs.busy = state["busy"].numpy().astype(bool)
    jobs.resend(state["in_flight"])
    server.versions.collect()
    c = state["counters"]
    server.received, server.accepted, server.rejected = int(c["received"]), int(c["accepted"]), int(c["rejected"])
    server.busy_seconds = float(c["busy_seconds"])
    server.last_arrival_wall = float(c.get("last_arrival_wall", 0.0))   # absent before 0.1.0's results API
    evaluator.evals = [EvalPoint(**e) for e in state["evals"]]
    server.stats.update(state["stats"])
    evaluator.interval["distill"] = server.stats.get("distill_seconds", 0.0)
    server.checkpoint_version = server.version
    server.algorithm.load_state_dict(state["algorithm"])
    server.nonfinite_streak = int(state.get("nonfinite_streak", 0))
    evaluator.next_eval_time = float(state.get("next_eval_time", server.cfg.run.eval_every_time))
