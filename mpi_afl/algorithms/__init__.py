"""Aggregation algorithms, one file each, in a plain dict registry; plug-ins by import path."""

from ..plugins import algorithm_class as plugin_class
from ..plugins import is_import_path

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


def algorithm_class(name: str) -> type:
    """The class of a built-in algorithm, or of a plug-in named 'package.module:Class'."""
    if is_import_path(name):
        return plugin_class(name)
    return ALGORITHMS[name]
