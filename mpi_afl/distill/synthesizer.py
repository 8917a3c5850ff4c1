"""Meta-learned synthesis of class-conditional images from teacher models.

docs/algorithms.md §3.3 "Synthesis" (FastDFKD's fast meta-synthesizer, as the
FedRevive research code adapts it to several weighted teachers):

1. labels y ~ Multinomial(mean_k q_k), a batch of `synth_batch` (with `synth_labels = "teacher"`: one
   sub-batch of synth_batch / K per teacher, drawn from its own q_k, and each teacher's L_oh, L_bn and
   L_adv taken on its own sub-batch only: every teacher's statistics then meet its own client's class mix,
   where the research code matches one mixed batch against every teacher's statistics);
2. a fast generator is cloned from the meta-generator; fresh z ~ N(0, I) and
   class embeddings E ~ N(0, I) are trained with it (Adam, betas (0.5, 0.999));
3. each of `synth_steps` steps minimises bn * L_bn + oh * L_oh + adv * L_adv on
   the augmented, normalised images, each term passing an outlier filter;
4. the lowest-loss batch is kept, and the meta-generator takes a Reptile step
   with gradient theta_meta - theta_fast (or, with `meta = "fomaml"`, the sum
   of the fast generator's gradients) through its own Adam;
5. the kept batch joins the FIFO pool.

`Synthesizer.synthesize` is a generator that yields after every generator
step; drive it with `yield from` inside an algorithm, or `drain()` it.
Within a distillation group (distill/group.py) each rank evaluates only the
teachers it owns: the loss terms are summed over the group before the outlier
filters see them and the gradients before the optimizer step, so every rank
keeps the same generator; with one rank the sums are the identity.
Every random draw comes from the synthesizer's own CPU `torch.Generator`,
whose state is in `state_dict()`, so a restored synthesizer continues exactly.
"""

import copy
import math
from collections.abc import Generator as Steps
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from mpi_afl.augment import random_crop_flip
from mpi_afl.config.schema import DistillConfig
from mpi_afl.distill.ensemble import TeacherEnsemble
from mpi_afl.distill.generator import Generator
from mpi_afl.distill.group import sum_gradients
from mpi_afl.distill.kd import OutlierFilter, class_weights, kl_div
from mpi_afl.distill.pool import SyntheticPool

META_EPS = 1e-12


def one_hot_loss(teacher_logits: torch.Tensor, labels: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """L_oh = (1/B) sum_b sum_k w_k(y_b) CE(T_k(x_b), y_b).

    teacher_logits (K, B, C), labels (B,), sample_weights (B, K) = w_k(y_b)."""
    k, b, c = teacher_logits.shape
    ce = F.cross_entropy(teacher_logits.reshape(k * b, c), labels.repeat(k), reduction="none").view(k, b)
    return (sample_weights.T * ce).sum() / b


def feature_loss(per_teacher: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """L_bn = (1/B) sum_k [sum_b w_k(y_b)] * (teacher k's feature-statistics distance), per_teacher (K,)."""
    return (sample_weights.sum(dim=0) * per_teacher).sum() / sample_weights.shape[0]


def adversarial_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                     sample_weights: torch.Tensor) -> torch.Tensor:
    """L_adv = -(1/B) sum_b sum_k w_k(y_b) 1[argmax S = argmax T_k] KL(T_k || S).

    Rewards images where the student agrees with a teacher yet is far from it
    (FastDFKD's adversarial term). teacher_logits (K, B, C), student (B, C)."""
    agree = (student_logits.argmax(dim=-1)[None] == teacher_logits.argmax(dim=-1)).float()
    kl = kl_div(student_logits[None], teacher_logits, reduction="none")  # (K, B)
    return -(sample_weights.T * agree * kl).sum() / student_logits.shape[0]


def own_one_hot_loss(teacher_logits: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
    """L_oh with per-teacher sub-batches (distill.synth_labels = teacher): (1/B) sum_k sum_{b in S_k}
    CE(T_k(x_b), y_b); teacher_logits (K, B/K, C) and labels (K * B/K,) teacher-major, B = `batch` (the
    whole batch: with a group, the K teachers are this rank's share)."""
    return F.cross_entropy(teacher_logits.flatten(0, 1), labels, reduction="sum") / batch


def own_adversarial_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, batch: int) -> torch.Tensor:
    """L_adv with per-teacher sub-batches: each image against its own teacher only; teacher_logits
    (K, B/K, C), student_logits (K * B/K, C) teacher-major, B = `batch`."""
    s = student_logits.view(teacher_logits.shape)
    agree = (s.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float()
    return -(agree * kl_div(s, teacher_logits, reduction="none")).sum() / batch


class Synthesizer:
    """Meta-generator, its optimizer, the synthetic pool and the loss filters of one run."""

    def __init__(self, cfg: DistillConfig, image_shape: tuple[int, int, int], num_classes: int,
                 mean: Sequence[float], std: Sequence[float], device: torch.device | str, generator_seed: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.rng = torch.Generator()
        self.rng.manual_seed(generator_seed)
        # Module initialisation draws from the global CPU RNG; fork it so the
        # generator's initial weights depend on the seed alone and the
        # caller's RNG state is left untouched (torch.manual_seed would also
        # reseed every CUDA device, which the fork does not restore).
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(generator_seed)
            self.generator = Generator(cfg.nz, cfg.ngf, image_shape).to(self.device)
        self.fast = copy.deepcopy(self.generator)
        # The research code's meta-optimizer: Adam at the generator lr (meta_lr = 0, the default),
        # betas (0.5, 0.999), eps 0. eps = 1e-12 instead of 0 only keeps a
        # parameter whose Reptile gradient is exactly zero from 0 / 0; Reptile gradients are ~1e-3,
        # so the step is the research code's to 1e-9.
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.meta_step_lr(), betas=(0.5, 0.999),
                                               eps=META_EPS)
        self.pool = SyntheticPool(cfg.pool_size)
        self.filters = {name: OutlierFilter() for name in ("bn", "oh", "adv")}
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The teachers' view of [0, 1] images: random crop (4-pixel reflect pad) and flip when
        `augment` is on, then the data set's normalisation. Differentiable in `images`."""
        if self.cfg.augment == "true":
            images = random_crop_flip(images, self.rng)
        return (images - self._mean) / self._std

    def sample(self, proportions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A prepared batch of n pool images whose labels follow `proportions` (classes,)."""
        images, labels = self.pool.sample(proportions, n, self.rng)
        return self.prepare(images), labels

    def synthesize(self, teachers: TeacherEnsemble, proportions: torch.Tensor, student: nn.Module | None = None,
                   adversarial: bool = False,
                   notes: list | None = None) -> Steps[None, None, tuple[torch.Tensor, torch.Tensor]]:
        """Synthesise one batch from `teachers` with class proportions `proportions` (K, classes).

        `adversarial` adds L_adv against `student` (after the KD warm-up).
        Returns the kept images in [0, 1] (on the device) and their labels (on
        the CPU), which are also added to the pool. With `notes`, notes the call
        as "syntheses" with "synth_agreement" (algorithms/base.py `add_notes`:
        a running mean), the kept batch's agreement: the fraction of its images whose
        teacher-ensemble (mean logits) argmax is their label, a diagnostic of
        generator quality (experiments/fedrevive_distillation). The student is used in eval
        mode and its mode and requires_grad flags are restored afterwards."""
        cfg = self.cfg
        k, group = teachers.total, teachers.group
        if k == 0 or proportions.shape != (k, self.num_classes):
            raise ValueError(f"need proportions of shape ({k}, {self.num_classes}) for "
                             f"{k} teachers, got {tuple(proportions.shape)}")
        if adversarial and student is None:
            raise ValueError("the adversarial loss needs a student model")
        q = proportions.detach().to(self.device, torch.float32)
        mine = torch.tensor(teachers.owned, dtype=torch.long, device=self.device)   # this rank's teachers
        own = cfg.synth_labels == "teacher"
        if own:   # teacher-major sub-batches, each drawn from its teacher's own q_k
            per = max(1, cfg.synth_batch // k)
            b = k * per
            labels_cpu = torch.multinomial(q.cpu(), per, replacement=True, generator=self.rng).flatten()
            sample_weights = torch.eye(k, device=self.device).repeat_interleave(per, dim=0)   # (B, K): own teacher
        else:
            b = cfg.synth_batch
            labels_cpu = torch.multinomial(q.mean(dim=0).cpu(), b, replacement=True, generator=self.rng)
        labels = labels_cpu.to(self.device)
        z = torch.randn(b, cfg.nz, generator=self.rng).to(self.device).requires_grad_()
        embeddings = torch.randn(self.num_classes, cfg.nz, generator=self.rng).to(self.device).requires_grad_()
        if not own:
            sample_weights = class_weights(q)[:, labels].T  # (B, K) = w_k(y_b)
        # This rank's teachers' columns and sub-batches; one rank keeps the tensors as they are (the same
        # memory layout, so the same summation order and bits as without a group).
        sharded = group.size > 1
        weights_mine = sample_weights[:, mine] if sharded else sample_weights   # (B, this rank's teachers)
        labels_mine = labels.view(k, per)[mine].flatten() if own and sharded else labels

        self.fast.load_state_dict(self.generator.state_dict())
        self.fast.train()
        optimizer = torch.optim.Adam([{"params": self.fast.parameters()},
                                      {"params": [z], "lr": cfg.z_lr},
                                      {"params": [embeddings], "lr": cfg.z_lr}],
                                     lr=cfg.gen_lr, betas=(0.5, 0.999))
        student_flags = None
        if student is not None:
            student_flags = (student.training, [p.requires_grad for p in student.parameters()])
            student.eval()
            student.requires_grad_(False)
        best_cost, best, best_logits = math.inf, None, None
        try:
            for step in range(cfg.synth_steps):
                # record_function labels name the phases for bench/distill_cost.py (free without a profiler).
                with record_function("synth.generator"):
                    images = self.fast(z, labels, embeddings, cfg.embed_weight)
                    inputs = self.prepare(images)
                with record_function("synth.teachers"):
                    if own:   # teacher k on its own sub-batch only
                        split = inputs.view(k, per, *inputs.shape[1:])
                        split = split[mine] if sharded else split
                        if cfg.bn > 0:
                            teacher_logits, per_teacher = teachers.with_feature_loss(split, per_teacher=True)
                        else:
                            teacher_logits = teachers(split, per_teacher=True)
                    elif cfg.bn > 0:
                        teacher_logits, per_teacher = teachers.with_feature_loss(inputs)
                    else:
                        teacher_logits = teachers(inputs)
                # own: teacher_logits (K', B/K, C), each teacher on its sub-batch; else (K', B, C); K' = this
                # rank's teachers, so every term below is this rank's share of the sum over teachers
                oh = (own_one_hot_loss(teacher_logits, labels_mine, b) if own
                      else one_hot_loss(teacher_logits, labels, weights_mine))
                terms = {"oh": (cfg.oh, oh)}
                if cfg.bn > 0:
                    terms["bn"] = (cfg.bn, feature_loss(per_teacher, weights_mine))
                if adversarial and cfg.adv > 0:
                    with record_function("synth.student"):
                        student_logits = student(inputs)
                    if own and sharded:
                        student_logits = student_logits.view(k, per, -1)[mine].flatten(0, 1)
                    terms["adv"] = (cfg.adv, own_adversarial_loss(teacher_logits, student_logits, b) if own
                                    else adversarial_loss(teacher_logits, student_logits, weights_mine))
                # The filters judge each term's sum over the group, so every rank keeps the same terms.
                totals = yield from group.reduce([value.detach() for _, value in terms.values()])
                loss = kept_cost = None
                for (name, (weight, value)), total in zip(terms.items(), totals):
                    if weight > 0 and self.filters[name](total) is not None:
                        loss = weight * value if loss is None else loss + weight * value
                        kept_cost = weight * total if kept_cost is None else kept_cost + weight * total
                cost = float(kept_cost) if kept_cost is not None else math.nan
                if cost < best_cost:
                    best_cost, best, best_logits = cost, images.detach().clone(), teacher_logits.detach()
                with record_function("synth.backward"):
                    optimizer.zero_grad(set_to_none=True)
                    if loss is not None and loss.requires_grad:
                        loss.backward()
                    if loss is not None:
                        yield from sum_gradients(group, [*self.fast.parameters(), z, embeddings], loss)
                    self._fast_step(step, optimizer)
                yield
            if cfg.meta == "reptile":
                with record_function("synth.reptile"):
                    self._reptile_step()
        finally:
            if student is not None:
                training, flags = student_flags
                student.train(training)
                for p, flag in zip(student.parameters(), flags):
                    p.requires_grad_(flag)
        if best is None:  # every step's loss was dropped or NaN: keep the last batch, as the research code
            best, best_logits = images.detach().clone(), teacher_logits.detach()
        self.pool.add(best, labels_cpu)
        if notes is not None:
            if own:   # the same measure as with mean labels: every teacher on the kept images (no augmentation)
                with torch.no_grad():
                    best_logits = teachers((best - self._mean) / self._std)
            if group.size == 1:
                mean_logits = best_logits.mean(0)
            else:   # the mean over all K teachers from every rank's share (only its argmax is used)
                mean_logits = (yield from group.reduce([best_logits.sum(0)]))[0] / k
            agreement = float((mean_logits.argmax(1) == labels).float().mean())
            notes.append(("syntheses", {"synth_agreement": agreement}))
        return best, labels_cpu

    def _fast_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Fast-generator step; with FOMAML, also accumulate its gradients into the meta-generator,
        which steps at the last synthesis step in place of the fast one (research code)."""
        if self.cfg.meta == "fomaml":
            if step == 0:
                self.meta_optimizer.zero_grad(set_to_none=False)
            for meta_p, fast_p in zip(self.generator.parameters(), self.fast.parameters()):
                if meta_p.grad is None:
                    meta_p.grad = torch.zeros_like(meta_p)
                if fast_p.grad is not None:
                    meta_p.grad.add_(fast_p.grad)
            if step == self.cfg.synth_steps - 1:
                self.meta_optimizer.step()
                return
        optimizer.step()

    def _reptile_step(self) -> None:
        """Reptile: the meta-gradient theta_meta - theta_fast moves the meta-generator towards the fast one."""
        self.meta_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for meta_p, fast_p in zip(self.generator.parameters(), self.fast.parameters()):
                meta_p.grad = meta_p - fast_p
        self.meta_optimizer.step()

    def state_dict(self) -> dict:
        return {
            "generator": {k: v.clone() for k, v in self.generator.state_dict().items()},
            "meta_optimizer": copy.deepcopy(self.meta_optimizer.state_dict()),
            "pool": self.pool.state_dict(),
            "filters": {name: f.state_dict() for name, f in self.filters.items()},
            "rng": self.rng.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict({k: torch.as_tensor(v) for k, v in state["generator"].items()})
        self.meta_optimizer.load_state_dict(copy.deepcopy(state["meta_optimizer"]))
        self.pool.load_state_dict(state["pool"], self.device)
        for name, f in self.filters.items():
            f.load_state_dict(state["filters"][name])
        self.rng.set_state(torch.as_tensor(state["rng"]).to(torch.uint8).cpu())
