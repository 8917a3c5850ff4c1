"""Runs one client job: load the base model, train locally, form the update, straggle.

The same `JobRunner` serves MPI workers and the one-process path, so a job's
result depends only on (seed, client, job index) and never on the rank that
ran it (docs/algorithms.md §1).
"""

import time

import torch

from ..config import Config
from ..models.flat import flat_size
from ..plugins import trainer_class
from ..transport.messages import ClientUpdate, JobSpec


class JobRunner:
    def __init__(self, cfg: Config, model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                 parts: list[torch.Tensor]):
        self.cfg = cfg
        self.model = model
        self.train_x, self.train_y = train_x, train_y
        self.parts = parts
        self.size = flat_size(model)
        self.trainer = trainer_class(cfg.client.trainer)(cfg)

    def run(self, job: JobSpec, base: torch.Tensor) -> ClientUpdate:
        kind, at = self.cfg.fault.kind, self.cfg.fault.job
        fault = kind if job.job_index == at or (kind == "nan_from" and job.job_index >= at) else "none"
        if fault == "raise":
            raise RuntimeError(f"injected fault: worker raises on job {job.job_index} (fault.kind = raise)")
        update = self.trainer.train(self.model, base, self.train_x, self.train_y, self.parts[job.client_id], job)
        # Malformed updates for the failure tests: the server must reject them.
        if fault in ("nan", "nan_from"):
            update.delta[0] = float("nan")
        elif fault == "huge":   # finite, but the aggregation overflows: the global model turns non-finite
            update.delta[0] = 3e38
        elif fault == "bad_size":
            update.delta = torch.cat([update.delta, torch.zeros(3, dtype=update.delta.dtype,
                                                                device=update.delta.device)])
        elif fault == "bad_client":
            update.client_id = self.cfg.data.num_clients + 5
        if job.sleep_seconds > 0:   # injected straggling (wall clock, delays.wall_scale), after the measured training
            time.sleep(job.sleep_seconds)
        return update
