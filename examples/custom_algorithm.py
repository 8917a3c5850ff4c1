"""A plug-in aggregation algorithm: clipped asynchronous SGD on the server.

Run it with `--server.algorithm=examples.custom_algorithm:ClippedAsync` (from the repository root,
or with the directory holding `examples/` on PYTHONPATH). The contract is mpi_afl/algorithms/base.py:
`on_update` gets one accepted update at a time and returns an `Outcome`: the new flat model, or None
while it only buffers, and the weight it gave the update (logged in run.h5); everything kept between calls is in `state_dict()`, so checkpoints and `--resume`
cover it. The config is the run's typed Config: a plug-in reuses existing keys (here server.lr and
server.buffer_size) rather than adding its own.
"""

import torch

from mpi_afl.algorithms.base import Algorithm, Outcome, ServerContext, Update


class ClippedAsync(Algorithm):
    """Average `server.buffer_size` updates, each clipped to the median norm seen so far, then step
    x + lr * mean. Clipping to a running median keeps a single huge (stale or faulty) update from
    dominating the step."""

    name = "clipped_async"

    def __init__(self, cfg, ctx: ServerContext):
        super().__init__(cfg, ctx)
        self.buffer = torch.zeros_like(ctx.global_model)
        self.count = 0
        self.norms: list[float] = []          # every update norm seen: state, so resume clips alike

    def on_update(self, update: Update, ctx: ServerContext) -> Outcome:
        norm = float(update.delta.norm())
        self.norms.append(norm)
        limit = float(torch.tensor(self.norms).median())
        weight = min(1.0, limit / norm) if norm > 0 else 1.0
        self.buffer.add_(update.delta, alpha=weight)   # delta is borrowed: add_ copies it
        self.count += 1
        if self.count < self.cfg.server.buffer_size:
            return Outcome(None, weight=weight)
        new = ctx.global_model + self.cfg.server.lr / self.count * self.buffer
        self.buffer.zero_()
        self.count = 0
        return Outcome(new, weight=weight)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "count": self.count, "norms": torch.tensor(self.norms, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.copy_(state["buffer"])
        self.count = int(state["count"])
        self.norms = state["norms"].tolist()
