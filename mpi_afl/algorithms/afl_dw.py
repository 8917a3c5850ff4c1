"""AFL-DW: asynchronous down-weighting, FedRevive's ablation baseline.

B = 1 and each arrival is scaled by 1 - beta(tau) with the cosine beta of
Eq. 3:  x_{t+1} = x_t + eta (1 - beta(tau)) Delta_i   (docs/algorithms.md §2).
It is FedBuff with a buffer of one and the cosine discount, so it reuses it.
"""

from .base import Update
from .fedbuff import FedBuff
from .staleness import cosine_beta


class AFLDW(FedBuff):
    name = "afl_dw"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.buffer_size = 1

    def weight(self, update: Update) -> float:
        return 1.0 - cosine_beta(update.staleness, self.cfg.server.s_max)
