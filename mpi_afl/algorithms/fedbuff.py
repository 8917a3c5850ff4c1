"""FedBuff (Nguyen et al. 2022): buffered asynchronous aggregation.

Arrivals are summed into a buffer, each discounted by s(tau)
(`server.staleness`, FedBuff's own choice is 'sqrt' = 1/sqrt(1+tau)); after
B = `server.buffer_size` arrivals

    x_{t+1} = x_t + eta * (sum_i s(tau_i) Delta_i) / B        (docs/algorithms.md §2)

with optional server momentum mu: m <- mu m + v, x <- x + eta m. Returns
no new model while the buffer fills.
"""

import torch

from .base import Algorithm, Outcome, ServerContext, Update
from .staleness import discount


class FedBuff(Algorithm):
    name = "fedbuff"

    def __init__(self, cfg, ctx: ServerContext):
        super().__init__(cfg, ctx)
        self.buffer_size = cfg.server.buffer_size
        self.staleness = cfg.server.staleness
        self.buffer = torch.zeros_like(ctx.global_model)
        self.count = 0
        self.momentum = torch.zeros_like(ctx.global_model) if cfg.server.momentum > 0 else None

    def weight(self, update: Update) -> float:
        return discount(self.staleness, update.staleness, self.cfg.server)

    def on_update(self, update: Update, ctx: ServerContext) -> Outcome:
        weight = self.weight(update)
        self.buffer.add_(update.delta, alpha=weight)
        self.count += 1
        if self.count < self.buffer_size:
            return Outcome(None, weight=weight)
        step = self.buffer.div_(self.buffer_size)
        if self.momentum is not None:
            step = self.momentum.mul_(self.cfg.server.momentum).add_(step)
        new = ctx.global_model + self.cfg.server.lr * step
        self.buffer.zero_()
        self.count = 0
        return Outcome(new, weight=weight)

    def state_dict(self) -> dict:
        state = {"buffer": self.buffer, "count": self.count}
        if self.momentum is not None:
            state["momentum"] = self.momentum
        return state

    def load_state_dict(self, state: dict) -> None:
        self.buffer.copy_(state["buffer"])
        self.count = int(state["count"])
        if self.momentum is not None:
            self.momentum.copy_(state["momentum"])
