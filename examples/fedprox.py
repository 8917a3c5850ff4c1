"""A plug-in local trainer: FedProx (Li et al., MLSys 2020), the proximal term that keeps each client's
local model near the global model it started from.

Run it with `--client.trainer=examples.fedprox:FedProx` (from the repository root, or with the directory
holding `examples/` on PYTHONPATH), with any server algorithm:

    mpiexec -n 3 python -m mpi_afl.train --client.trainer=examples.fedprox:FedProx --fedprox.mu=0.1 --algorithm fedbuff

The contract is mpi_afl/client/trainer.py: `start` runs once per job after the base model is loaded,
`loss` replaces the cross-entropy of every batch. Nothing is random and nothing is kept from one job to the
next, so runs stay bit-identical for any rank count and `--resume` needs nothing from the trainer.

The strength mu is a config key of the trainer's own section, declared by `config_section`: `--fedprox.mu=0.1`
on the command line, `[fedprox]` with `mu = 0.1` in a TOML file, validated, shown by `--print-config` and
stored with the run like the built-in keys (docs/extending.md "Configuration").
"""

from dataclasses import dataclass

import torch.nn.functional as F

from mpi_afl.client.trainer import LocalTrainer
from mpi_afl.config import opt


@dataclass
class FedProxConfig:
    mu: float = opt(0.01, "FedProx: strength of the proximal term (mu / 2) ||w - w_base||^2", min=0)


class FedProx(LocalTrainer):
    """Cross-entropy + (mu / 2) ||w - w_base||^2 over the trainable parameters, mu = fedprox.mu."""

    config_section = ("fedprox", FedProxConfig)

    def start(self, model, base):
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def loss(self, model, logits, targets):
        proximal = sum((p - a).square().sum() for p, a in zip(model.parameters(), self.anchor))
        return F.cross_entropy(logits, targets) + 0.5 * self.cfg.fedprox.mu * proximal
