"""Everything a config can name by a built-in name: algorithms, models and data sets, in one place.

The config's allowed values (mpi_afl/config/schema.py), the look-ups of algorithms/__init__.py,
models/__init__.py and data/datasets.py and the run reader (results.py) all use these tables. No torch:
algorithms and models are given as import paths 'module:attribute', imported only when one is used
(`builtin`), so that parsing a config and reading results stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# name -> the Algorithm subclass (mpi_afl/algorithms/base.py) that implements it
ALGORITHMS = {
    "fedavg": "mpi_afl.algorithms.fedavg:FedAvg",
    "fedasync": "mpi_afl.algorithms.fedasync:FedAsync",
    "fedbuff": "mpi_afl.algorithms.fedbuff:FedBuff",
    "afl_dw": "mpi_afl.algorithms.afl_dw:AFLDW",
    "ca2fl": "mpi_afl.algorithms.ca2fl:CA2FL",
    "fedrevive": "mpi_afl.algorithms.fedrevive:FedRevive",
    "dd_fedrevive": "mpi_afl.algorithms.fedrevive:DDFedRevive",
    "fedecho": "mpi_afl.algorithms.fedecho:FedEcho",
}

# name -> the model class, called with in_channels, image_size, num_classes and norm (mpi_afl/models)
MODELS = {
    "cnn": "mpi_afl.models.cnn:CNN",
    "convnet": "mpi_afl.models.convnet:ConvNet",
    "resnet18": "mpi_afl.models.resnet:ResNet18",
}


def builtin(path: str):
    """The object an entry of ALGORITHMS or MODELS names."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class DatasetInfo:
    """What models and the distillation generator need to know about a data set.

    ``mean``/``std`` are per channel, for pixels scaled to [0, 1]. ``torchvision_class`` names the
    loader in ``torchvision.datasets`` (None: bundled with scikit-learn); ``debian_package`` is the
    Debian package that installs the files under ``/usr/share/datasets/<name>``, if any.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str | None = None
    debian_package: str | None = None


# name -> its DatasetInfo; data/datasets.py finds and loads the files
DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    # Pixel statistics of load_digits() scaled by 1/16, computed over all 1797 images.
    DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3760,)),
    DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,),
                torchvision_class="FashionMNIST", debian_package="dataset-fashion-mnist"),
    DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), torchvision_class="MNIST"),
    # CIFAR statistics as in the FedRevive reference code (utils/data_utils.py DATASET_SPECS), so
    # that synthetic images live in the same normalised space as in the paper's experiments.
    DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                torchvision_class="CIFAR10"),
    DatasetInfo("cifar100", 100, 3, 32, (0.507, 0.487, 0.441), (0.268, 0.257, 0.276),
                torchvision_class="CIFAR100"),
)}
