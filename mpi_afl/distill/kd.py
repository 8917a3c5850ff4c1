"""Multi-teacher knowledge distillation and its loss utilities.

docs/algorithms.md §3.3 "Distillation" and §3.4: the student starts at the current
global model; every iteration, each teacher k gets its own batch drawn from
its class proportions q_k, and the loss is
    sum_k T^2 KL(softmax(T_k/T) || softmax(S/T)) summed over its batch,
divided by the total number of samples: a per-teacher KL on a class-matched
batch, never a KL against averaged logits. With equal batch sizes this is also
the research code's DD-FedRevive loss (mean over teachers of batch-mean KL).

`distill` is a generator that yields after every iteration, so the server
loop can poll MPI between slices (algorithms/base.py).
"""

from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from mpi_afl.distill.ensemble import TeacherEnsemble
from mpi_afl.distill.group import Solo, sum_gradients
from mpi_afl.models.flat import load_flat

SOLO = Solo()


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           reduction: str = "sum") -> torch.Tensor:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), per sample ("none"), summed or batch-mean.

    Logits may carry leading dimensions (e.g. teachers x batch); the class
    dimension is the last one."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_sample = (log_t.exp() * (log_t - log_s)).sum(dim=-1) * temperature ** 2
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "batchmean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}; allowed: none, sum, batchmean")


def record_kd(notes: list, kd_delta: torch.Tensor, delta: torch.Tensor) -> None:
    """Note one KD application in `notes` (algorithms/base.py `Outcome.notes`: the server keeps the running
    means) with ||kd_delta|| / ||delta|| and their cosine: `kd_delta` is the change KD made, `delta` the update it joins (FedRevive: the raw client delta
    it is blended with; FedEcho: the backbone's step). Pass trainable parameters only; statistics are
    reset or kept, not distilled.

    A diagnostic, not part of any method: a small ratio means KD barely moves the model next to the
    update (FedRevive's blend is then mostly a shrink of the stale delta, which AFL-DW does without KD;
    experiments/fedrevive_distillation)."""
    delta_norm, kd_norm = float(delta.norm()), float(kd_delta.norm())
    cosine = float(torch.dot(kd_delta, delta)) / max(kd_norm * delta_norm, 1e-30)
    notes.append(("kd_applied", {"kd_norm_ratio": kd_norm / max(delta_norm, 1e-30), "kd_cosine": cosine}))


def held_out_loss(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of the flat model `flat` (loaded into `model`, eval mode) on (x, y)."""
    load_flat(model, flat)
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def loss_check(model: nn.Module, notes: list, without: torch.Tensor, with_kd: torch.Tensor, x: torch.Tensor,
               y: torch.Tensor, group: Solo = SOLO) -> Generator[str, None, tuple[float, float]]:
    """The KD diagnostic of one KD call: held-out losses (before, after) of the flat models `without` and
    `with_kd` (the same step without and with its KD part) on the fixed check images (x, y), noted in `notes`
    (the server's running means over the `kd_checks` calls: kd_loss_change = after - before; kd_loss_improved =
    the share of calls with a negative change). Negative on average: the distilled change carries
    knowledge that generalises; positive: it moves the model away from the data. Read-only for the run:
    `model` is scratch space. Within a distillation group each rank takes its share of the images and the
    group sums the cross-entropies (a generator for the sum's wait; one rank: no yield)."""
    if group.size == 1:
        with record_function("check"):
            before, after = held_out_loss(model, without, x, y), held_out_loss(model, with_kd, x, y)
    else:
        rows = group.rows(len(x))
        sums = []
        for flat in (without, with_kd):
            load_flat(model, flat)
            model.eval()
            with torch.no_grad(), record_function("check"):
                sums.append(F.cross_entropy(model(x[rows]), y[rows], reduction="sum"))
        total = (yield from group.reduce([torch.stack(sums)]))[0]
        before, after = (total / len(x)).tolist()
    notes.append(("kd_checks", {"kd_loss_change": after - before, "kd_loss_improved": float(after < before)}))
    return before, after


def class_weights(proportions: torch.Tensor) -> torch.Tensor:
    """Per-class teacher weights w_k(y) = q_k(y) / sum_j q_j(y) from q of shape (teachers, classes).

    A class no teacher has (column sum 0) gets weight 0 for every teacher."""
    return proportions / proportions.sum(dim=0, keepdim=True).clamp_min(1e-8)


class OutlierFilter:
    """The research code's loss stabiliser (docs/algorithms.md §3.3, last bullet of step 3).

    A loss value that is NaN/inf, or more than `factor` times the mean of the
    last `window` accepted values (once at least `min_history` are known and
    that mean is positive), is dropped for this step: `__call__` returns None.
    Accepted values join the history; dropped ones do not."""

    def __init__(self, window: int = 20, min_history: int = 10, factor: float = 3.0):
        self.window, self.min_history, self.factor = window, min_history, factor
        self.history: list[float] = []

    def __call__(self, loss: torch.Tensor) -> torch.Tensor | None:
        value = float(loss.detach())
        if value != value or value in (float("inf"), float("-inf")):
            return None
        if len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            if mean > 0 and value > self.factor * mean:
                return None
        self.history = (self.history + [value])[-self.window:]
        return loss

    def state_dict(self) -> dict:
        # float64 holds every Python float exactly, so the round trip is exact.
        return {"history": torch.tensor(self.history, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [float(v) for v in torch.as_tensor(state["history"]).tolist()]


def distill(student: nn.Module, teachers: TeacherEnsemble, draw: Callable[[int], torch.Tensor], *,
            optimizer: torch.optim.Optimizer, steps: int, temperature: float,
            outliers: OutlierFilter | None = None) -> Generator[None, None, list[float]]:
    """Train `student` for `steps` iterations on the teachers' soft labels; returns the step losses.

    `draw(k)` gives teacher k's input batch for this iteration (already
    augmented and normalised; every teacher's batch has the same size). The
    teachers label their own batches in one batched call; the student sees
    all batches in one forward, except with BatchNorm, whose train-mode
    normalisation depends on the batch, so it gets one forward per teacher
    batch as in the per-teacher formulation. The student trains in train
    mode, as in the research code; teachers run in eval mode without
    gradients. A step whose loss the `outliers` filter drops is skipped (no
    optimizer step).

    Within a distillation group each rank draws every teacher's batch (the
    random streams stay the same on every rank) but evaluates only its own
    teachers' batches; the student's gradient and the loss are summed over
    the group before the filter and the step (distill/group.py)."""
    per_batch = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    params = [p for p in student.parameters() if p.requires_grad]
    student.train()
    losses = []
    for _ in range(steps):
        with record_function("kd.draw"):
            batches = [draw(k) for k in range(teachers.total)]
            inputs = (torch.stack([batches[k] for k in teachers.owned]) if teachers.owned   # (c', b, ...)
                      else batches[0].new_zeros(0, *batches[0].shape))
        with record_function("kd.teachers"), torch.no_grad():
            targets = teachers(inputs, per_teacher=True)
        with record_function("kd.student"):
            if per_batch:
                logits = torch.stack([student(x) for x in inputs]) if len(inputs) else targets
            else:
                logits = student(inputs.flatten(0, 1)).view(*targets.shape)
            loss = kl_div(logits, targets, temperature, reduction="sum") / (teachers.total * len(batches[0]))
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            loss = yield from sum_gradients(teachers.group, params, loss)
            kept = outliers(loss) if outliers is not None else loss
            if kept is not None:
                optimizer.step()
        losses.append(float(loss.detach()))
        yield
    return losses
