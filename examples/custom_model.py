"""A plug-in model factory: `--model.name=examples.custom_model:mlp`.

The server calls the factory with keyword arguments `in_channels`, `image_size`, `num_classes`
(from the data set) and `norm` (`model.norm`: "stat", "batchnorm" or "none") and expects a
torch.nn.Module that maps (N, in_channels, image_size, image_size) float images to (N, num_classes)
logits. Every rank builds it after seeding torch identically, so the initial weights agree.
"""

from torch import nn


def mlp(*, in_channels: int, image_size: int, num_classes: int, norm: str, hidden: int = 64) -> nn.Module:
    """Two hidden layers; `norm` = "batchnorm" adds BatchNorm1d, anything else none (an MLP this small
    needs no statistics tracking)."""
    def block(n_in: int, n_out: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Linear(n_in, n_out)]
        if norm == "batchnorm":
            layers.append(nn.BatchNorm1d(n_out))
        return layers + [nn.ReLU()]

    return nn.Sequential(nn.Flatten(), *block(in_channels * image_size * image_size, hidden),
                         *block(hidden, hidden), nn.Linear(hidden, num_classes))
