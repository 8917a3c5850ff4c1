"""The FedRevive research code's ConvNet for 28x28 data (FEMNIST), after FedDyn.

docs/algorithms.md §3.3 "Model note": three unpadded conv3x3(64) layers, each followed
by a normalisation/stat layer and ReLU, max-pool after the second and the third,
then FC 200-100-classes. With 28x28 inputs the maps go 26 -> 24 -> 12 -> 10 -> 5.
"""

import torch
from torch import nn

from mpi_afl.models.layers import make_norm


def _final_side(image_size: int) -> int:
    """Side of the last feature map: two valid convs, pool, valid conv, pool."""
    return ((image_size - 4) // 2 - 2) // 2


class ConvNet(nn.Module):
    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, norm: str):
        super().__init__()
        side = _final_side(image_size)
        if side < 1:
            raise ValueError(f"convnet needs image_size >= 12 (designed for 28), got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3)
        self.norm1 = make_norm(norm, 64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3)
        self.norm2 = make_norm(norm, 64)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.norm3 = make_norm(norm, 64)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(64 * side * side, 200)
        self.fc2 = nn.Linear(200, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        x = self.pool(torch.relu(self.norm2(self.conv2(x))))
        x = self.pool(torch.relu(self.norm3(self.conv3(x))))
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)
