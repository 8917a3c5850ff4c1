"""Model registry: `build_model(name, ...)` for every model a config can name."""

from typing import Callable

from torch import nn

from mpi_afl.models.cnn import CNN
from mpi_afl.models.convnet import ConvNet
from mpi_afl.models.resnet import ResNet18

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": CNN,
    "convnet": ConvNet,
    "resnet18": ResNet18,
}


def build_model(name: str, *, in_channels: int, image_size: int, num_classes: int, norm: str) -> nn.Module:
    """Build model `name`; `norm` is "batchnorm", "stat" (StatTracker) or "none"."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    return MODELS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes, norm=norm)
