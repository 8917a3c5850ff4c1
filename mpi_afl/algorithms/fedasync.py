"""FedAsync (Xie et al. 2019): mix every arrival into the global model.

    x_{t+1} = (1 - a_t) x_t + a_t (x_v + Delta_i),   a_t = alpha * s(tau)

with s(tau) from `server.staleness` (constant, polynomial, hinge, ...) and
alpha = `server.mixing` (docs/algorithms.md §2). The client model is rebuilt from
the snapshot of its base version x_v, so stale models also pull the global
model back towards their base; with tau = 0 this equals FedBuff with B = 1
and eta = alpha.
"""

from .base import Algorithm, Outcome, ServerContext, Update
from .staleness import discount


class FedAsync(Algorithm):
    name = "fedasync"

    def on_update(self, update: Update, ctx: ServerContext) -> Outcome:
        a = self.cfg.server.mixing * discount(self.cfg.server.staleness, update.staleness, self.cfg.server)
        client_model = ctx.snapshot(update.base_version) + update.delta
        return Outcome(ctx.global_model.lerp(client_model, a), weight=a)
