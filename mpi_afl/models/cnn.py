"""Small CNN for quick runs on CPU (sklearn digits 8x8, MNIST-like 28x28, CIFAR 32x32).

Two conv3x3 blocks (padding 1, so any side >= 4 works) and a two-layer head.
Not from a paper: it is the fast default model of the quick-start configs.
"""

import torch
from torch import nn

from mpi_afl.models.layers import make_norm


class CNN(nn.Module):
    """conv3x3(32)-norm-relu-maxpool, conv3x3(64)-norm-relu-maxpool, fc128-relu, fc(classes)."""

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, norm: str):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"cnn needs image_size >= 4 (two 2x2 max-pools), got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1)
        self.norm1 = make_norm(norm, 32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.norm2 = make_norm(norm, 64)
        self.pool = nn.MaxPool2d(2)
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.norm1(self.conv1(x))))
        x = self.pool(torch.relu(self.norm2(self.conv2(x))))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
