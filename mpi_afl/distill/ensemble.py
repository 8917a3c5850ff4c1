"""The teachers as one batched model.

Synthesis, KD and FedEcho's weighting run the same c teacher models (one
architecture, c flat vectors) on small batches. Running them one after another
costs c module calls per layer; here their parameters and buffers are stacked
along a leading teacher dimension and one `torch.func.vmap` over
`functional_call` evaluates all of them at once (convolutions become grouped
convolutions, linear layers batched matmuls), which is what removes the
per-teacher overhead on a CPU and the kernel-launch overhead on a GPU.

The feature-statistics distance of L_bn (docs/algorithms.md §3.3) is computed
inside the same batched call: forward hooks on the template model's
normalisation layers read the layer input and, under `functional_call`, the
layer's buffers are the current teacher's, so each teacher's input moments are
compared with its own `tracked_statistics`.

The teachers always run in eval mode (running statistics are read, never
updated). The per-teacher loop that this replaces is kept in
tests/reference_distill.py as the oracle the tests compare against.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from mpi_afl.distill.stats import batch_moments
from mpi_afl.models.flat import float_entries
from mpi_afl.models.layers import NORM_LAYERS, tracked_statistics


class TeacherEnsemble:
    """Teachers of `template`'s architecture, loaded as stacked flat vectors (c, P) with `load`.

    `ensemble(x)` gives logits (c, B, classes) for inputs shared by every
    teacher (B, ...) or one batch per teacher (c, B, ...) with `per_teacher=True`;
    `with_feature_loss(x)` also gives each teacher's L_bn distance (c,).
    Gradients flow to the inputs, never to the teachers. The template is
    owned by the ensemble (its hooks stay on it); make one ensemble per run
    and `load` new teachers into it.

    Within a distillation group (distill/group.py) the ensemble holds only
    this rank's share: `owned` are the buffer positions of the loaded
    teachers, `total` the buffer's length K and `group` the group whose sums
    combine the shares; with one rank `owned` is every position. A share may
    be empty (more group ranks than teachers): calls then give (0, B, classes)."""

    def __init__(self, template: nn.Module):
        self.template = template.eval().requires_grad_(False)
        self._entries = [(name, t.shape, t.numel()) for name, t in float_entries(template)]
        self.size = 0
        self.owned: list[int] = []
        self.total = 0
        self.group = None
        self.state: dict[str, torch.Tensor] = {}
        self._distances: list[torch.Tensor] | None = None
        for m in template.modules():
            if isinstance(m, NORM_LAYERS) and getattr(m, "running_mean", None) is not None:
                m.register_forward_hook(self._record)

    def load(self, stacked: torch.Tensor, owned: list[int] | None = None, total: int | None = None,
             group=None) -> TeacherEnsemble:
        """Use the c flat vectors `stacked` (c, P) as the teachers (views, not copies); returns self.
        `owned`, `total`, `group`: this rank's share of a group's buffer (default: all of one rank's)."""
        from .group import Solo
        width = sum(n for _, _, n in self._entries)
        if stacked.dim() != 2 or stacked.shape[1] != width:
            raise ValueError(f"teachers must be given as (c, {width}) flat vectors, got {tuple(stacked.shape)}")
        self.owned = list(range(stacked.shape[0])) if owned is None else owned
        self.total = stacked.shape[0] if total is None else total
        self.group = Solo() if group is None else group
        self.size, self.state, offset = stacked.shape[0], {}, 0
        for name, shape, n in self._entries:
            self.state[name] = stacked[:, offset:offset + n].reshape(self.size, *shape)
            offset += n
        return self

    def __len__(self) -> int:
        return self.size

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._distances is None:  # a plain forward: nothing asked for the statistics
            return
        mean, var = batch_moments(inputs[0])
        target_mean, target_var = tracked_statistics(module)
        self._distances.append((target_var - var).norm(2) + (target_mean - mean).norm(2))

    def _one(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(self.template, state, (x,))
        distances = self._distances
        total = torch.stack(distances).sum() if distances else logits.new_zeros(())
        if distances is not None:
            distances.clear()
        return logits, total

    def _run(self, x: torch.Tensor, per_teacher: bool, feature_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if per_teacher and x.shape[0] != self.size:
            raise ValueError(f"per-teacher inputs need a leading dimension of {self.size}, got {tuple(x.shape)}")
        if self.size == 0:   # an empty share: only the shape of the logits is needed
            with torch.no_grad():
                classes = self.template(x[:1].flatten(0, 1) if per_teacher else x[:1]).shape[-1]
            batch = x.shape[1] if per_teacher else x.shape[0]
            return x.new_zeros(0, batch, classes), x.new_zeros(0)
        self._distances = [] if feature_loss else None
        try:
            return vmap(self._one, in_dims=(0, 0 if per_teacher else None), randomness="error")(self.state, x)
        finally:
            self._distances = None

    def __call__(self, x: torch.Tensor, per_teacher: bool = False) -> torch.Tensor:
        return self._run(x, per_teacher, feature_loss=False)[0]

    def with_feature_loss(self, x: torch.Tensor, per_teacher: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (c, B, classes) on the shared inputs (or, `per_teacher`, teacher k on x[k]) and each
        teacher's feature-statistics distance (c,) on its inputs: sum over its normalisation layers of
        ||var_l - sigma^2_l(x)||_2 + ||mean_l - mu_l(x)||_2."""
        return self._run(x, per_teacher=per_teacher, feature_loss=True)
