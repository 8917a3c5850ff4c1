"""CIFAR ResNet-18 as in the FedRevive research code (docs/algorithms.md §3.3 "Model note").

3x3 stride-1 stem with no max-pool (32x32 inputs stay 32x32 into layer1),
BasicBlocks [2, 2, 2, 2] at 64/128/256/512 channels, bias-free convolutions
each followed by the configurable normalisation layer (the research code uses
StatTracker, i.e. norm="stat"), 1x1-conv + norm shortcuts where the shape
changes, global average pooling and a bias-free linear classifier.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mpi_afl.models.layers import make_norm


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                make_norm(norm, planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, norm: str):
        super().__init__()
        # Three stride-2 stages: the last map is image_size / 8 (4x4 for CIFAR).
        # Global average pooling equals the research code's avg_pool2d(4) at
        # 32x32 and also accepts other sides, so image_size is only checked.
        if image_size < 8:
            raise ValueError(f"resnet18 needs image_size >= 8 (three stride-2 stages), got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm1 = make_norm(norm, 64)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, norm),
                                        BasicBlock(planes, planes, 1, norm)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
