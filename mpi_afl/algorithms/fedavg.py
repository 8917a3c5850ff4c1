"""Synchronous FedAvg: K clients train from x_t, the server waits for all.

    x_{t+1} = x_t + eta * mean_i Delta_i      (sample-weighted mean optional)

`synchronous = True` tells the server to dispatch the K = `server.concurrency`
jobs of a round from one version and to dispatch nothing more until the
round's last update is in (docs/algorithms.md §2).
"""

import torch

from .base import Algorithm, Outcome, ServerContext, Update


class FedAvg(Algorithm):
    name = "fedavg"
    synchronous = True

    def __init__(self, cfg, ctx: ServerContext):
        super().__init__(cfg, ctx)
        self.round_size = cfg.server.concurrency
        self.sum = torch.zeros_like(ctx.global_model)
        self.weights = 0.0
        self.count = 0

    def on_update(self, update: Update, ctx: ServerContext) -> Outcome:
        w = float(update.num_samples) if self.cfg.server.sample_weighted else 1.0
        self.sum.add_(update.delta, alpha=w)
        self.weights += w
        self.count += 1
        if self.count < self.round_size:
            return Outcome(None, weight=w)
        new = ctx.global_model + self.cfg.server.lr * (self.sum / self.weights)
        self.sum.zero_()
        self.weights = 0.0
        self.count = 0
        return Outcome(new, weight=w)

    def state_dict(self) -> dict:
        return {"sum": self.sum, "weights": self.weights, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sum.copy_(state["sum"])
        self.weights = float(state["weights"])
        self.count = int(state["count"])
