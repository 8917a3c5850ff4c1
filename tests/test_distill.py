"""Data-free distillation building blocks (mpi_afl/distill, docs/algorithms.md §3.3)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpi_afl.config.schema import DistillConfig
from mpi_afl.distill import kd
from mpi_afl.distill.ensemble import TeacherEnsemble
from mpi_afl.distill.generator import Generator
from mpi_afl.distill.pool import SyntheticPool, sample_by_class
from mpi_afl.distill.proxy import ProbeProxy, histogram_proportions, probe_proportions
from mpi_afl.distill.synthesizer import Synthesizer, adversarial_loss, feature_loss, one_hot_loss
from mpi_afl.models.flat import flatten
from mpi_afl.models.layers import StatTracker, make_norm
from mpi_afl.slices import drain

torch.set_num_threads(1)

SHAPE = (1, 8, 8)
CLASSES = 10


class Tiny(nn.Module):
    """conv3x3(4) -> norm -> relu -> 2x2 average pool -> linear: a teacher/student for 8x8 images."""

    def __init__(self, norm: str = "batchnorm", seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(SHAPE[0], 4, 3, padding=1)
            self.norm = make_norm(norm, 4)
            self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1))


def tiny_cfg(**overrides) -> DistillConfig:
    cfg = DistillConfig(nz=8, ngf=8, synth_batch=8, synth_steps=2, pool_size=20, kd_batch=4)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_synth(cfg: DistillConfig | None = None, seed: int = 3) -> Synthesizer:
    return Synthesizer(cfg or tiny_cfg(), SHAPE, CLASSES, (0.5,), (0.25,), "cpu", seed)


def ensemble_of(*modules: nn.Module) -> TeacherEnsemble:
    """The modules (one architecture) as a batched teacher ensemble."""
    return TeacherEnsemble(copy.deepcopy(modules[0])).load(torch.stack([flatten(m) for m in modules]))


def teachers_and_q():
    teachers = ensemble_of(Tiny("batchnorm", seed=1), Tiny("batchnorm", seed=2))
    q = torch.full((2, CLASSES), 0.02)
    q[0, :5], q[1, 5:] = 0.18, 0.18
    return teachers, q


# ---------------------------------------------------------------- generator


def test_generator_shape_range_and_class_conditioning():
    gen = Generator(nz=8, ngf=8, image_shape=(3, 8, 8))
    z, emb = torch.randn(4, 8), torch.randn(CLASSES, 8)
    with torch.no_grad():
        a = gen(z, torch.tensor([0, 1, 2, 3]), emb, 0.2)
        b = gen(z, torch.tensor([4, 1, 2, 3]), emb, 0.2)
    assert a.shape == (4, 3, 8, 8)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # Only the first sample's class changed, and its image changed with it.
    assert not torch.allclose(a[0], b[0], atol=1e-4)
    with pytest.raises(ValueError, match="multiples of 4"):
        Generator(nz=8, ngf=8, image_shape=(1, 10, 10))


# ------------------------------------------------------------------ losses


def test_one_hot_loss_hand_value():
    # Teacher 1 says [2, 0], teacher 2 is undecided; labels 0 and 1.
    logits = torch.tensor([[[2.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # (K=2, B=2, C=2)
    q = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    w = kd.class_weights(q)
    assert torch.allclose(w, q)  # columns already sum to 1
    labels = torch.tensor([0, 1])
    sw = w[:, labels].T
    ln2 = math.log(2)
    expected = (0.75 * math.log(1 + math.exp(-2)) + 0.25 * ln2 + 0.25 * math.log(1 + math.exp(2)) + 0.75 * ln2) / 2
    assert float(one_hot_loss(logits, labels, sw)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("layer", [StatTracker(2), nn.BatchNorm2d(2)])
def test_ensemble_feature_loss_is_the_l2_distance_to_running_stats(layer):
    model = nn.Sequential(layer)
    ensemble = TeacherEnsemble(model).load(torch.stack([flatten(model), flatten(model)]))
    # Channel 0 is constant 3 (mean 3, var 0); channel 1 alternates +-1 (mean 0, var 1).
    x = torch.tensor([[[[3.0, 3.0]], [[1.0, -1.0]]], [[[3.0, 3.0]], [[1.0, -1.0]]]])
    logits, distances = ensemble.with_feature_loss(x)
    # Running stats are mean 0, var 1: ||(1,1) - (0,1)|| + ||(0,0) - (3,0)|| = 1 + 3, for both teachers.
    assert torch.allclose(distances, torch.tensor([4.0, 4.0]))
    assert torch.allclose(logits, torch.stack([x, x]), atol=1e-4)  # (nearly) identity layers in eval mode
    # A plain call records nothing and leaves nothing behind for the next call.
    ensemble(x)
    assert torch.allclose(ensemble.with_feature_loss(x)[1], torch.tensor([4.0, 4.0]))


def test_feature_loss_weights_each_teacher_by_its_sample_weights():
    per_teacher = torch.tensor([4.0, 2.0])
    sw = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # (B=2, K=2)
    # Column sums 1.5 and 0.5: (1.5 * 4 + 0.5 * 2) / 2.
    assert float(feature_loss(per_teacher, sw)) == pytest.approx(3.5)


def test_adversarial_loss_counts_only_agreeing_samples():
    teacher = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])  # (K=1, B=2, C=2)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])    # agrees on sample 0 only
    sw = torch.ones(2, 1)
    p_t, p_s = torch.softmax(teacher[0, 0], 0), torch.softmax(student[0], 0)
    kl0 = float((p_t * (p_t / p_s).log()).sum())
    assert float(adversarial_loss(teacher, student, sw)) == pytest.approx(-kl0 / 2, rel=1e-6)
    # A student that disagrees everywhere contributes nothing.
    assert float(adversarial_loss(teacher, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), sw)) == 0.0


def test_kl_div_temperature_and_reductions():
    s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    p_t, p_s = torch.softmax(t / 2, 1), torch.softmax(s / 2, 1)
    expected = 4 * float((p_t * (p_t / p_s).log()).sum())
    assert float(kd.kl_div(s, t, temperature=2.0)) == pytest.approx(expected, rel=1e-6)
    assert float(kd.kl_div(t, t)) == pytest.approx(0.0, abs=1e-7)
    two = torch.cat([s, t])
    assert float(kd.kl_div(two, torch.cat([t, t]), reduction="batchmean")) == pytest.approx(
        float(kd.kl_div(two, torch.cat([t, t]), reduction="sum")) / 2)
    with pytest.raises(ValueError, match="allowed"):
        kd.kl_div(s, t, reduction="mean")


def test_outlier_filter_drops_nan_and_spikes():
    f = kd.OutlierFilter()
    assert f(torch.tensor(float("nan"))) is None
    assert f(torch.tensor(float("inf"))) is None
    for _ in range(9):
        assert f(torch.tensor(1.0)) is not None
    assert f(torch.tensor(100.0)) is not None  # only 9 values known: no outlier test yet
    # Now the mean of the 10 accepted values is 10.9: 3x is 32.7.
    assert f(torch.tensor(33.0)) is None
    assert f(torch.tensor(32.0)) is not None
    for _ in range(30):
        f(torch.tensor(1.0))
    assert len(f.history) == 20
    g = kd.OutlierFilter()
    g.load_state_dict(copy.deepcopy(f.state_dict()))
    assert g.history == f.history


# ----------------------------------------------------------------- pool


def test_pool_is_fifo_and_restores_its_ring_layout():
    pool = SyntheticPool(capacity=5)
    pool.add(torch.arange(3.0).view(3, 1, 1, 1), torch.tensor([0, 1, 2]))
    pool.add(torch.arange(3.0, 7.0).view(4, 1, 1, 1), torch.tensor([3, 4, 5, 6]))
    assert len(pool) == 5
    # Images 0 and 1 were the oldest and are gone.
    assert sorted(pool.images.flatten().tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert sorted(pool.labels.tolist()) == [2, 3, 4, 5, 6]
    restored = SyntheticPool(capacity=5)
    restored.load_state_dict(copy.deepcopy(pool.state_dict()), torch.device("cpu"))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    q = torch.ones(CLASSES)
    a, b = pool.sample(q, 6, g1), restored.sample(q, 6, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    pool.add(torch.tensor([[[[9.0]]]]), torch.tensor([9]))
    restored.add(torch.tensor([[[[9.0]]]]), torch.tensor([9]))
    assert torch.equal(pool.images, restored.images)


def test_sample_by_class_follows_proportions():
    labels = torch.tensor([0, 1, 2, 3, 3, 3, 4])
    g = torch.Generator().manual_seed(0)
    only3 = torch.zeros(5)
    only3[3] = 1.0
    idx = sample_by_class(labels, only3, 3, g)
    assert labels[idx].tolist() == [3, 3, 3] and len(set(idx.tolist())) == 3  # distinct when enough
    idx = sample_by_class(labels, only3, 8, g)  # more than there are: with replacement
    assert (labels[idx] == 3).all()
    absent = torch.zeros(6)
    absent[5] = 1.0  # no sample has label 5: fall back to random samples
    assert len(sample_by_class(labels, absent, 4, g)) == 4
    mixed = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5])
    drawn = labels[sample_by_class(labels, mixed, 200, g)]
    assert set(drawn.tolist()) == {2, 4} and 60 < int((drawn == 2).sum()) < 140
    with pytest.raises(ValueError, match="positive sum"):
        sample_by_class(labels, torch.zeros(5), 2, g)


# ------------------------------------------------------------- synthesizer


def test_synthesize_fills_pool_and_moves_meta_generator_towards_fast():
    synth = make_synth()
    teachers, q = teachers_and_q()
    before = [p.detach().clone() for p in synth.generator.parameters()]
    steps = synth.synthesize(teachers, q, Tiny(seed=9), adversarial=True)
    yields = 0
    while True:
        try:
            next(steps)
            yields += 1
        except StopIteration as stop:
            images, labels = stop.value
            break
    assert yields == 2  # one slice per generator step
    assert images.shape == (8, *SHAPE) and labels.shape == (8,)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert len(synth.pool) == 8
    after = list(synth.generator.parameters())
    fast = list(synth.fast.parameters())
    dist = lambda xs, ys: sum(float((x - y).detach().pow(2).sum()) for x, y in zip(xs, ys))  # noqa: E731
    assert dist(before, fast) > 0
    assert dist(after, fast) < dist(before, fast)
    # The ensemble's L_bn hooks are registered once, not once per synthesis.
    hooks = sum(len(m._forward_hooks) for m in teachers.template.modules())
    drain(synth.synthesize(teachers, q))
    assert sum(len(m._forward_hooks) for m in teachers.template.modules()) == hooks == 1


class Constant(nn.Module):
    """A teacher that predicts class `label` for every input (its logits ignore the image)."""

    def __init__(self, label: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.label = label

    def forward(self, x):
        return self.scale * 10 * F.one_hot(torch.full((len(x),), self.label), CLASSES).float() + 0 * x.sum()


@pytest.mark.parametrize("label, expected", [(0, 1.0), (1, 0.0)])
def test_synthesis_records_teacher_agreement_of_the_kept_batch(label, expected):
    synth = make_synth(tiny_cfg(bn=0.0))
    q = torch.zeros(1, CLASSES)
    q[0, 0] = 1.0  # every synthetic label is class 0
    notes = []
    drain(synth.synthesize(ensemble_of(Constant(label)), q, notes=notes))
    drain(synth.synthesize(ensemble_of(Constant(label)), q, notes=notes))
    assert notes == [("syntheses", {"synth_agreement": expected})] * 2


def test_fomaml_meta_update_changes_meta_generator():
    synth = make_synth(tiny_cfg(meta="fomaml"))
    teachers, q = teachers_and_q()
    before = [p.detach().clone() for p in synth.generator.parameters()]
    drain(synth.synthesize(teachers, q))
    assert any(not torch.equal(a, b) for a, b in zip(before, synth.generator.parameters()))


def test_synthesis_restores_student_flags():
    synth = make_synth()
    teachers, q = teachers_and_q()
    student = Tiny(seed=5).train()
    drain(synth.synthesize(teachers, q, student, adversarial=True))
    assert student.training and all(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError, match="student"):
        drain(synth.synthesize(teachers, q, None, adversarial=True))
    with pytest.raises(ValueError, match="proportions of shape"):
        drain(synth.synthesize(teachers, q[:1]))


def test_synthesis_labels_follow_mean_proportions():
    synth = make_synth(tiny_cfg(synth_batch=64, synth_steps=1, pool_size=64))
    teachers, _ = teachers_and_q()
    q = torch.zeros(2, CLASSES)
    q[0, 2], q[1, 7] = 1.0, 1.0
    _, labels = drain(synth.synthesize(teachers, q))
    assert set(labels.tolist()) == {2, 7}


def test_teacher_matched_labels_give_each_teacher_its_own_sub_batch_and_losses():
    """distill.synth_labels = teacher: teacher k's sub-batch (teacher-major) follows its own q_k; its L_oh,
    L_bn and L_adv see only those images, so a teacher is not graded on a class mix it never saw."""
    synth = make_synth(tiny_cfg(synth_batch=64, synth_steps=2, pool_size=64, synth_labels="teacher"))
    teachers, _ = teachers_and_q()
    q = torch.zeros(2, CLASSES)
    q[0, 2], q[1, 7] = 1.0, 1.0
    notes = []
    images, labels = drain(synth.synthesize(teachers, q, Tiny(seed=5), adversarial=True, notes=notes))
    assert labels.tolist() == [2] * 32 + [7] * 32 and images.shape[0] == 64
    [(count, values)] = notes
    assert count == "syntheses" and 0.0 <= values["synth_agreement"] <= 1.0
    logits = torch.randn(2, 3, CLASSES)
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    from mpi_afl.distill.synthesizer import own_adversarial_loss, own_one_hot_loss
    expected = sum(F.cross_entropy(logits[k], labels[3 * k:3 * k + 3], reduction="sum") for k in range(2)) / 6
    assert float(own_one_hot_loss(logits, labels, 6)) == pytest.approx(float(expected), rel=1e-6)
    student = logits.flatten(0, 1).clone()   # agrees with its own teacher everywhere, at KL 0
    assert float(own_adversarial_loss(logits, student, 6)) == pytest.approx(0.0, abs=1e-6)


def test_synthesizer_state_round_trip_continues_identically():
    teachers, q = teachers_and_q()
    student = Tiny(seed=5)
    uninterrupted = make_synth()
    for _ in range(3):
        last = drain(uninterrupted.synthesize(teachers, q, student, adversarial=True))
    first = make_synth()
    drain(first.synthesize(teachers, q, student, adversarial=True))
    drain(first.synthesize(teachers, q, student, adversarial=True))
    resumed = make_synth(seed=99)  # a different seed: everything must come from the state
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    again = drain(resumed.synthesize(teachers, q, student, adversarial=True))
    assert torch.equal(last[0], again[0]) and torch.equal(last[1], again[1])
    for a, b in zip(uninterrupted.generator.state_dict().values(), resumed.generator.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(uninterrupted.pool.images, resumed.pool.images)
    assert uninterrupted.filters["oh"].history == resumed.filters["oh"].history
    assert torch.equal(uninterrupted.sample(q[0], 4)[0], resumed.sample(q[0], 4)[0])


def test_same_seed_same_synthesis_and_global_rng_untouched():
    teachers, q = teachers_and_q()
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    a = drain(make_synth().synthesize(teachers, q))
    assert torch.equal(torch.rand(3), expected_global)
    b = drain(make_synth().synthesize(teachers, q))
    assert torch.equal(a[0], b[0])


# ---------------------------------------------------------------------- KD


def test_distill_lowers_student_teacher_kl():
    teacher, student = Tiny("stat", seed=1), Tiny("stat", seed=2)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(16, *SHAPE, generator=g)
    teacher.eval()

    def gap() -> float:
        student.eval()
        with torch.no_grad():
            return float(kd.kl_div(student(data), teacher(data), reduction="batchmean"))

    before = gap()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = drain(kd.distill(student, ensemble_of(teacher, teacher), lambda k: data[k * 8:(k + 1) * 8], optimizer=opt,
                              steps=20, temperature=1.0))
    assert len(losses) == 20 and losses[-1] < losses[0]
    assert gap() < 0.5 * before


def test_distill_skips_steps_the_filter_drops():
    teacher, student = Tiny("stat", seed=1), Tiny("stat", seed=2)
    data = torch.randn(4, *SHAPE)
    f = kd.OutlierFilter()
    f.history = [1e-9] * 10  # any real loss now looks like a spike
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    drain(kd.distill(student, ensemble_of(teacher), lambda k: data, optimizer=opt, steps=2, temperature=1.0, outliers=f))
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


# ------------------------------------------------------------------- proxy


class Linear(nn.Module):
    """A linear teacher on flattened 8x8 inputs whose bias favours classes 2 and 5."""

    def __init__(self, favoured: tuple[int, ...], seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(64, CLASSES)
        with torch.no_grad():
            self.fc.weight.copy_(0.05 * torch.randn(CLASSES, 64, generator=g))
            self.fc.bias.zero_()
            self.fc.bias[list(favoured)] = 2.0

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_probe_proxy_recovers_dominant_classes():
    g = torch.Generator().manual_seed(0)
    q = probe_proportions(Linear((2, 5), seed=1), SHAPE, 64, 0.8, g)
    assert q.shape == (CLASSES,) and float(q.sum()) == pytest.approx(1.0, rel=1e-5)
    assert set(q.topk(2).indices.tolist()) == {2, 5}


def test_probe_proxy_averages_the_first_two_models_then_freezes():
    proxy = ProbeProxy(SHAPE, CLASSES, probes=64, temperature=0.8)
    first, second, third = Linear((2, 5), 1), Linear((7,), 2), Linear((0,), 3)
    g = torch.Generator().manual_seed(0)
    proxy.observe(4, first, g)
    q1 = proxy.proportions(4).clone()
    assert set(q1.topk(2).indices.tolist()) == {2, 5}
    g_state = g.get_state()
    proxy.observe(4, second, g)
    q2 = probe_proportions(second, SHAPE, 64, 0.8, torch.Generator().set_state(g_state))
    assert torch.allclose(proxy.proportions(4), 0.5 * (q1 + q2))
    frozen = proxy.proportions(4).clone()
    proxy.observe(4, third, g)  # the third upload is not probed
    assert torch.equal(proxy.proportions(4), frozen)
    restored = ProbeProxy(SHAPE, CLASSES, probes=64, temperature=0.8)
    restored.load_state_dict(copy.deepcopy(proxy.state_dict()), torch.device("cpu"))
    assert torch.equal(restored.proportions(4), frozen) and restored.seen == {4: 2}
    with pytest.raises(KeyError, match="client 9"):
        proxy.proportions(9)


def test_histogram_proportions():
    assert histogram_proportions(np.array([1, 3, 0])).tolist() == [0.25, 0.75, 0.0]
    assert torch.allclose(histogram_proportions(np.zeros(4)), torch.full((4,), 0.25))
