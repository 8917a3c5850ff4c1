"""The whole model state as one contiguous float32 vector.

Models travel over MPI and are aggregated as flat buffers (docs/design.md "Roles and
messages"). The vector holds the parameters AND the floating-point buffers
(normalisation running_mean/running_var): FedRevive uses each client's running
statistics as its teacher's feature statistics (docs/algorithms.md §1, §3.3), and
they are averaged with the parameters. Entries follow `state_dict()` order, so
every rank agrees on the layout of a given architecture.

Integer buffers (BatchNorm's `num_batches_tracked`) are left out: BatchNorm
updates its running stats with a fixed momentum, so the counter is never read,
and a float vector could not carry an int64 count exactly anyway.
"""

import torch
from torch import nn


def float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every floating-point state entry, in state_dict order.

    `state_dict()` tensors are detached views of the live parameters and
    buffers, so copying into them updates the model in place."""
    return [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]


def flat_size(model: nn.Module) -> int:
    """Number of float32 entries in the model's flat vector."""
    return sum(t.numel() for _, t in float_entries(model))


def flatten(model: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
    """Detached float32 copy of the model state, on the model's device.

    With `out` (1-D float32, `flat_size` entries) the state is written into it
    and `out` is returned, so a preallocated MPI buffer can be reused."""
    entries = float_entries(model)
    if out is None:
        return torch.cat([t.reshape(-1).float() for _, t in entries])
    size = sum(t.numel() for _, t in entries)
    if out.dim() != 1 or out.numel() != size or out.dtype != torch.float32:
        raise ValueError(f"out must be a 1-D float32 tensor of {size} entries, "
                         f"got shape {tuple(out.shape)} dtype {out.dtype}")
    offset = 0
    for _, t in entries:
        n = t.numel()
        out[offset:offset + n].copy_(t.reshape(-1))
        offset += n
    return out


def load_flat(model: nn.Module, vec: torch.Tensor) -> None:
    """Write `vec` (as made by `flatten`) into the model's parameters and buffers in place."""
    entries = float_entries(model)
    size = sum(t.numel() for _, t in entries)
    if vec.dim() != 1 or vec.numel() != size:
        raise ValueError(f"flat vector has shape {tuple(vec.shape)}, model needs ({size},)")
    offset = 0
    with torch.no_grad():
        for _, t in entries:
            n = t.numel()
            t.copy_(vec[offset:offset + n].view_as(t))
            offset += n


def param_mask(model: nn.Module) -> torch.Tensor:
    """Bool vector over the flat layout: True for trainable parameters, False for statistics."""
    trainable = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return torch.cat([torch.full((t.numel(),), name in trainable, dtype=torch.bool, device=t.device)
                      for name, t in float_entries(model)])


def variance_mask(model: nn.Module) -> torch.Tensor:
    """Bool vector over the flat layout: True for normalisation running variances.

    They must stay >= 0, but a delta trained from an old version and added to a
    newer model can push them below zero (measured: -0.51 at version 2 with
    FedBuff on digits), after which BatchNorm evaluates to NaN."""
    return torch.cat([torch.full((t.numel(),), name.endswith("running_var"), dtype=torch.bool, device=t.device)
                      for name, t in float_entries(model)])
