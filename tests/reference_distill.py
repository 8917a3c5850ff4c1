"""The plain per-teacher distillation path, kept as the oracle for the batched one (distill/ensemble.py).

One module per teacher, run one after another: the formulation of docs/algorithms.md §3.3 as the research code
writes it. tests/test_ensemble.py holds the batched path to it (logits, L_bn distances, gradients, the distilled
student), and bench/distill_cost.py times both side by side.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mpi_afl.distill.kd import kl_div
from mpi_afl.distill.stats import batch_moments
from mpi_afl.models.flat import load_flat
from mpi_afl.models.layers import NORM_LAYERS, tracked_statistics


def teacher_modules(make_model: Callable[[], nn.Module], stacked: torch.Tensor) -> list[nn.Module]:
    """One eval-mode module per row of `stacked` (c, P), without gradients."""
    modules = []
    for row in stacked:
        m = make_model()
        load_flat(m, row)
        modules.append(m.eval().requires_grad_(False))
    return modules


class FeatureHooks:
    """Records, per forward of one model, each normalisation layer's input moments and their L2 distances
    to the layer's tracked statistics."""

    def __init__(self, model: nn.Module):
        self.distances: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._record) for m in model.modules()
                         if isinstance(m, NORM_LAYERS) and getattr(m, "running_mean", None) is not None]

    def _record(self, module, inputs, output) -> None:
        mean, var = batch_moments(inputs[0])
        target_mean, target_var = tracked_statistics(module)
        self.distances.append((target_var - var).norm(2) + (target_mean - mean).norm(2))

    def loss(self) -> torch.Tensor:
        return sum(self.distances) if self.distances else torch.zeros(())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def logits_and_feature_loss(teachers: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, B, classes) logits and (c,) L_bn distances, one teacher after another."""
    logits, distances = [], []
    for t in teachers:
        hooks = FeatureHooks(t)
        logits.append(t(x))
        distances.append(hooks.loss())
        hooks.remove()
    return torch.stack(logits), torch.stack(distances)


def distill(student: nn.Module, teachers: Sequence[nn.Module], draw: Callable[[int], torch.Tensor], *,
            optimizer: torch.optim.Optimizer, steps: int, temperature: float) -> list[float]:
    """Per-teacher KD: each teacher labels its own batch and the student sees each batch in its own forward."""
    student.train()
    losses = []
    for _ in range(steps):
        total, count = 0.0, 0
        for k, teacher in enumerate(teachers):
            inputs = draw(k)
            with torch.no_grad():
                target = teacher(inputs)
            total = total + kl_div(student(inputs), target, temperature, reduction="sum")
            count += len(inputs)
        loss = total / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


class LoopEnsemble:
    """TeacherEnsemble's interface over one module per teacher, run one after another: the reference path
    for the synthesizer and for bench/distill_cost.py."""

    def __init__(self, make_model: Callable[[], nn.Module], stacked: torch.Tensor):
        from mpi_afl.distill.group import Solo
        self.modules = teacher_modules(make_model, stacked)
        # one rank's share of a group is every teacher (TeacherEnsemble's group attributes)
        self.total, self.owned, self.group = len(self.modules), list(range(len(self.modules))), Solo()

    def __len__(self) -> int:
        return len(self.modules)

    def __call__(self, x: torch.Tensor, per_teacher: bool = False) -> torch.Tensor:
        return torch.stack([m(x[k] if per_teacher else x) for k, m in enumerate(self.modules)])

    def with_feature_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_feature_loss(self.modules, x)
