"""Aggregation algorithms, one file each, in a plain dict registry."""

from .afl_dw import AFLDW
from .ca2fl import CA2FL
from .fedasync import FedAsync
from .fedavg import FedAvg
from .fedbuff import FedBuff
from .fedecho import FedEcho
from .fedrevive import DDFedRevive, FedRevive

ALGORITHMS = {
    "fedavg": FedAvg,
    "fedasync": FedAsync,
    "fedbuff": FedBuff,
    "afl_dw": AFLDW,
    "ca2fl": CA2FL,
    "fedrevive": FedRevive,
    "dd_fedrevive": DDFedRevive,
    "fedecho": FedEcho,
}
