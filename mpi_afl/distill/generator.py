"""The class-conditional image generator of data-free distillation.

docs/algorithms.md §3.3 "Generator": the DCGAN-style generator of FastDFKD as the
FedRevive research code adapts it. The class enters additively: the input is
`z + weight * E[y]`, with the class-embedding table `E` passed in by the
caller, because it is drawn afresh and trained together with `z` in every
synthesis (it belongs to the synthesis, not to the generator's weights).
"""

import torch
from torch import nn


class Generator(nn.Module):
    """Linear(nz -> 2ngf (s/4)^2) -> BN -> Up2 -> Conv3x3 -> BN -> LReLU -> Up2 -> Conv3x3 -> BN -> LReLU
    -> Conv3x3(ngf -> channels) -> Sigmoid, producing images in [0, 1] of shape `image_shape`."""

    def __init__(self, nz: int, ngf: int, image_shape: tuple[int, int, int]):
        super().__init__()
        channels, height, width = image_shape
        if height % 4 or width % 4 or height < 4 or width < 4:
            raise ValueError(f"the generator upsamples twice by 2, so image sides must be positive multiples of 4; "
                             f"got {height}x{width}")
        self.nz = nz
        self.init_size = (height // 4, width // 4)
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size[0] * self.init_size[1])
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor,
                embed_weight: float) -> torch.Tensor:
        """Images for noise `z` (B, nz) and `labels` (B,), class table `embeddings` (classes, nz)."""
        h = self.l1(z + embed_weight * embeddings[labels])
        return self.blocks(h.view(h.shape[0], -1, *self.init_size))
