"""Aggregation algorithms, one file each, in a plain dict registry."""

from .afl_dw import AFLDW
from .fedasync import FedAsync
from .fedavg import FedAvg
from .fedbuff import FedBuff

ALGORITHMS = {
    "fedavg": FedAvg,
    "fedasync": FedAsync,
    "fedbuff": FedBuff,
    "afl_dw": AFLDW,
}
