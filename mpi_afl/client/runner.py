"""Runs one client job: load the base model, train locally, form the update.

The same `JobRunner` serves MPI workers and the one-process path, so a job's
result depends only on (seed, client, job index) and never on the rank that
ran it (docs/algorithms.md §1).
"""

from dataclasses import dataclass

import torch

from ..config import Config
from ..models.flat import flat_size
from ..plugins import trainer_class


@dataclass
class JobSpec:
    """What a worker needs to know about a job (the header of a job message)."""
    job_index: int
    client_id: int
    base_version: int
    sleep_seconds: float


@dataclass
class JobOutput:
    """What goes back to the server (the header and payload of an update)."""
    job_index: int
    client_id: int
    base_version: int
    num_samples: int
    loss: float
    compute_seconds: float
    delta: torch.Tensor


class JobRunner:
    def __init__(self, cfg: Config, model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                 parts: list[torch.Tensor]):
        self.cfg = cfg
        self.model = model
        self.train_x, self.train_y = train_x, train_y
        self.parts = parts
        self.size = flat_size(model)
        self.trainer = trainer_class(cfg.client.trainer)(cfg)

    def run(self, job: JobSpec, base: torch.Tensor) -> JobOutput:
        kind, at = self.cfg.fault.kind, self.cfg.fault.job
        fault = kind if job.job_index == at or (kind == "nan_from" and job.job_index >= at) else "none"
        if fault == "raise":
            raise RuntimeError(f"injected fault: worker raises on job {job.job_index} (fault.kind = raise)")
        result = self.trainer.train(self.model, base, self.train_x, self.train_y, self.parts[job.client_id],
                                    client_id=job.client_id, job_index=job.job_index)
        out = JobOutput(job.job_index, job.client_id, job.base_version, result.num_samples, result.loss,
                        result.seconds, result.delta)
        # Malformed updates for the failure tests: the server must reject them.
        if fault in ("nan", "nan_from"):
            out.delta[0] = float("nan")
        elif fault == "huge":   # finite, but the aggregation overflows: the global model turns non-finite
            out.delta[0] = 3e38
        elif fault == "bad_size":
            out.delta = torch.cat([out.delta, torch.zeros(3, dtype=out.delta.dtype, device=out.delta.device)])
        elif fault == "bad_client":
            out.client_id = self.cfg.data.num_clients + 5
        return out
