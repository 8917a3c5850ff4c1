"""Run under `mpiexec -n 2` by tests/test_distill_group.py: the distillation group's sums against one rank.

Every rank builds the same 4 teachers, a TeacherBuffer with the group (rank 0 owns 2, rank 1 owns 2) and one
without (every teacher, computed locally), and compares, for each quantity the group sums, the group's result
with the one-rank computation:

  logits      FedEcho's all-teacher logits (each rank fills its own teachers' rows, the group adds zeros)
  generator   the fast generator's gradient after one synthesis step (L_oh + L_bn + L_adv)
  student     the change of the student's parameters after one KD iteration with SGD(lr = 1): minus its
              gradient (its stat trackers' running statistics record only the rank's own batches; FedRevive
              resets them after every aggregation, §3.1 step 5, and FedEcho keeps x''s)

Prints one JSON line per quantity on rank 0: its relative norm-wise difference and the rounding bound it
must stay within (tests/numerics.py).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from mpi4py import MPI  # noqa: E402

from mpi_afl.algorithms.fedecho import all_teacher_logits  # noqa: E402
from mpi_afl.config.schema import DistillConfig  # noqa: E402
from mpi_afl.distill import kd  # noqa: E402
from mpi_afl.distill.group import Group, drive  # noqa: E402
from mpi_afl.distill.proxy import ProbeProxy  # noqa: E402
from mpi_afl.distill.synthesizer import Synthesizer  # noqa: E402
from mpi_afl.distill.teachers import TeacherBuffer  # noqa: E402
from mpi_afl.models import build_model  # noqa: E402
from mpi_afl.models.flat import flatten, load_flat, param_mask  # noqa: E402
from numerics import gamma, reduction_bound, rel_diff  # noqa: E402

CLASSES, SHAPE, K = 10, (1, 8, 8), 4
torch.set_num_threads(1)
group = Group(MPI.COMM_WORLD)


def make_model() -> torch.nn.Module:
    return build_model("cnn", in_channels=1, image_size=8, num_classes=CLASSES, norm="stat")


def teacher_models() -> list[torch.Tensor]:
    """K different models whose stat trackers have seen data (so L_bn has targets)."""
    models = []
    for k in range(K):
        torch.manual_seed(100 + k)
        m = make_model().train()
        m(torch.randn(32, *SHAPE) * (1 + k))   # the trackers record statistics
        models.append(flatten(m))
    return models


def buffer(with_group: bool) -> TeacherBuffer:
    q = np.stack([np.bincount(np.arange(CLASSES), minlength=CLASSES)] * K)
    b = TeacherBuffer(K, make_model, torch.device("cpu"), q, ProbeProxy(SHAPE, CLASSES, 8, 0.8),
                      proportions="uniform", distinct=False, generator=torch.Generator().manual_seed(0),
                      group=group if with_group else None)
    for k, model in enumerate(teacher_models()):
        b.push(k, 0, model)
    if with_group:   # a member keeps only its own models, as after a call (distill/group.py)
        b.adopt(b.view(), {})
    return b


def report(name: str, group_value: torch.Tensor, solo_value: torch.Tensor, bound: float) -> None:
    if group.rank == 0:
        print(json.dumps({"quantity": name, "rel_diff": rel_diff(group_value, solo_value), "bound": bound}),
              flush=True)


solo, shared = buffer(False), buffer(True)
assert len(shared.ensemble()) == K // 2 and shared.ensemble().owned == [i for i in range(K) if (K - 1 - i) % 2 == group.rank]
x = torch.randn(48, *SHAPE, generator=torch.Generator().manual_seed(1))
teacher = make_model().eval()
# Each teacher's forward is the same computation on both paths; what changes is the sum over teachers (K terms
# against two partial sums plus one cross-rank addition) and the vmap over K or K/2 stacked teachers.
bound = reduction_bound(teacher, x) + 2 * gamma(K)

with torch.no_grad():
    report("logits", drive(all_teacher_logits(shared.ensemble(), x)), solo.ensemble()(x), bound)

cfg = DistillConfig(synth_steps=1, synth_batch=16, nz=8, ngf=8, bn=0.1, adv=0.5, augment="false")
student = make_model()
grads = {}
for name, teachers in (("solo", solo), ("group", shared)):
    synth = Synthesizer(cfg, SHAPE, CLASSES, (0.5,), (0.25,), "cpu", generator_seed=7)
    drive(synth.synthesize(teachers.ensemble(), teachers.proportions(), student, adversarial=True))
    grads[name] = torch.cat([p.grad.flatten() for p in synth.fast.parameters()])


class Generated(torch.nn.Module):
    """The fast generator as a one-input module, for reduction_bound: its backward is the same computation on
    both paths and only passes on the difference of the images' gradient, plus its own sums' rounding."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, z):
        return self.generator(z, torch.zeros(len(z), dtype=torch.long), torch.zeros(CLASSES, cfg.nz), 0.0)


report("generator", grads["group"], grads["solo"], bound + reduction_bound(Generated(synth.fast), torch.randn(16, 8)))

changes = {}
x0 = flatten(student)
for name, teachers in (("solo", solo), ("group", shared)):
    load_flat(student, x0)
    draws = torch.randn(K, 8, *SHAPE, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    drive(kd.distill(student, teachers.ensemble(), lambda k: draws[k], optimizer=optimizer, steps=1,
                     temperature=2.0))
    changes[name] = (flatten(student) - x0)[param_mask(student)]
report("student", changes["group"], changes["solo"], bound + reduction_bound(student, draws.flatten(0, 1)))
