"""Batched image augmentation on device tensors (no per-sample Python loop).

Random crop with reflect padding and horizontal flip, as the FedRevive code
applies to client batches on CIFAR and to synthetic images (docs/algorithms.md §3.3).
All randomness comes from the caller's `torch.Generator`, so a job's stream
depends only on (seed, client, job) and a server slice only on its own RNG.
"""

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Augment a batch `x` of shape (B, C, H, W); returns a new tensor."""
    b, _, h, w = x.shape
    gen_device = generator.device
    padded = F.pad(x, (padding, padding, padding, padding), mode="reflect")
    # One crop offset per sample: gather the window with advanced indexing.
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_device).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, generator=generator, device=gen_device).to(x.device) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out.contiguous()
