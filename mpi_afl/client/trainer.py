"""Local training as a plug-in: `client.trainer = package.module:Class` replaces the loss of every job.

Contract (docs/extending.md "Local training"): a subclass of `LocalTrainer`, made once per rank as
`Class(cfg)` with the run's Config. For every job the runner calls `train(...)`, which runs the built-in
loop (`local_train.train_job`: `client.iterations` batches of the client's data, `client.optimizer` made
fresh for the job, augmentation) and asks the trainer twice: `start(model, base)` once the job's base model
is loaded (keep what the loss needs, e.g. FedProx's anchor), and `loss(model, logits, targets)` for every
batch (a scalar tensor to minimise). The update sent back is `w_local - x_base` over the flat layout.

Determinism (the virtual clock's promise): a job's result must depend only on its base model, its client's
data and the job's own random stream (run seed, client, job index: the loop's batch order and augmentation),
so a trainer draws no randomness of its own and keeps no state from one job to the next (jobs of one client
run on any rank, in any order). Then checkpoints and `--resume` need nothing from it. The built-in
`LocalTrainer` is plain cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..transport.messages import ClientUpdate, JobSpec
from .local_train import train_job


class LocalTrainer:
    """Cross-entropy local training; subclasses change `start` and `loss`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def start(self, model: nn.Module, base: torch.Tensor) -> None:
        """Called once per job, after the base model (flat `base`) is loaded into `model`."""

    def loss(self, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch loss to minimise."""
        return F.cross_entropy(logits, targets)

    def train(self, model: nn.Module, base: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              indices: torch.Tensor, job: JobSpec) -> ClientUpdate:
        c = self.cfg.client
        return train_job(model, base, x, y, indices, iterations=c.iterations, batch_size=c.batch_size,
                         optimizer=c.optimizer, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                         augment=c.augment, seed=self.cfg.run.seed, job=job, trainer=self)
