"""The batched teacher path (distill/ensemble.py, kd.distill) against the per-teacher oracle (reference_distill.py),
and the bias-corrected statistics L_bn matches (models/layers.tracked_statistics)."""

import pytest
import torch

from mpi_afl.distill import kd
from mpi_afl.distill.ensemble import TeacherEnsemble
from mpi_afl.distill.stats import batch_moments
from mpi_afl.models import build_model
from mpi_afl.models.flat import flatten, param_mask
from mpi_afl.models.layers import StatTracker, reset_norm_statistics, tracked_statistics
from mpi_afl.slices import drain

import reference_distill as reference
from numerics import reduction_bound, rel_diff

torch.set_num_threads(1)


def make(norm: str, name: str = "cnn"):
    return lambda: build_model(name, in_channels=1, image_size=28, num_classes=10, norm=norm)


def trained_teachers(make_model, n: int, seed: int = 0) -> torch.Tensor:
    """n different models whose statistics were updated by a few train-mode forwards (as clients leave them)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100 + k)
            m = make_model()
        m.train()
        with torch.no_grad():
            for _ in range(3 + k):
                m(torch.randn(16, 1, 28, 28, generator=g) * 0.5 + 0.2 * k)
        rows.append(flatten(m))
    return torch.stack(rows)


@pytest.mark.parametrize("norm", ["stat", "batchnorm"])
@pytest.mark.parametrize("name", ["cnn", "convnet"])
def test_batched_logits_feature_loss_and_input_gradients_match_the_per_teacher_path(norm, name):
    make_model = make(norm, name)
    stacked = trained_teachers(make_model, 3)
    ensemble = TeacherEnsemble(make_model()).load(stacked)
    modules = reference.teacher_modules(make_model, stacked)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    logits, distances = ensemble.with_feature_loss(xa)
    ref_logits, ref_distances = reference.logits_and_feature_loss(modules, xb)
    # The same sums in another order (grouped kernels against one module each): the rounding bound of one
    # forward and backward pass with batch moments (tests/numerics.py), plus the few-term sums after it.
    bound = reduction_bound(make_model().train(), x)
    assert rel_diff(logits, ref_logits) <= bound
    assert rel_diff(distances, ref_distances) <= bound
    assert float(distances.detach().min()) > 0
    weights = torch.tensor([0.5, 1.0, 2.0])
    ((logits.square().mean(dim=(1, 2)) + distances) * weights).sum().backward()
    ((ref_logits.square().mean(dim=(1, 2)) + ref_distances) * weights).sum().backward()
    assert rel_diff(xa.grad, xb.grad) <= bound
    # Per-teacher inputs: teacher k labels its own batch.
    per = torch.randn(3, 4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_diff(ensemble(per, per_teacher=True), torch.stack([m(b) for m, b in zip(modules, per)])) <= bound
        # ... and its L_bn distance on its own batch (distill.synth_labels = teacher)
        per_logits, per_distances = ensemble.with_feature_loss(per, per_teacher=True)
        ref = [reference.logits_and_feature_loss([m], b) for m, b in zip(modules, per)]
        assert rel_diff(per_distances, torch.cat([d for _, d in ref])) <= bound
        assert rel_diff(per_logits, torch.cat([lg for lg, _ in ref])) <= bound


@pytest.mark.parametrize("norm", ["stat", "batchnorm"])
def test_batched_kd_distils_the_same_student_as_the_per_teacher_path(norm):
    make_model = make(norm)
    stacked = trained_teachers(make_model, 3, seed=4)
    data = torch.randn(3, 5, 8, 1, 28, 28, generator=torch.Generator().manual_seed(3))  # (steps, teachers, b, ...)

    def initial():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return make_model()

    def run(batched: bool) -> tuple[torch.Tensor, list[float]]:
        student = initial()
        # SGD: the step is linear in the gradient, so float-level differences stay float-level (Adam divides
        # near-zero gradients by their own size and turns summation-order noise into lr-sized steps).
        opt = torch.optim.SGD(student.parameters(), lr=0.05)
        step = iter(range(3 * 3))
        draw = lambda k: data[next(step) // 3, k]  # noqa: E731  (k runs 0..2 within a step)
        if batched:
            losses = drain(kd.distill(student, TeacherEnsemble(make_model()).load(stacked), draw, optimizer=opt,
                                      steps=3, temperature=2.0))
        else:
            losses = reference.distill(student, reference.teacher_modules(make_model, stacked), draw, optimizer=opt,
                                       steps=3, temperature=2.0)
        return flatten(student), losses

    (fast, fast_losses), (slow, slow_losses) = run(True), run(False)
    # Each step's loss and gradient carry the rounding bound of the student's pass over the c batches and the
    # teachers' pass over one (tests/numerics.py); to first order the steps' errors add up (SGD's step is
    # linear in the gradient), so after `steps` steps both the losses and the distilled change stay within
    # steps x that. About 1e-3 for this cnn, against O(1) for a wrong teacher, temperature or batch.
    steps = 3
    bound = steps * (reduction_bound(make_model().train(), data[0].flatten(0, 1))
                     + reduction_bound(make_model().eval(), data[0, 0]))
    assert max(abs(f - s) / abs(s) for f, s in zip(fast_losses, slow_losses)) <= bound
    mask = torch.ones_like(fast, dtype=torch.bool)
    if norm == "stat":
        # The batched student sees the c batches in one train-mode forward, so its stat trackers take one
        # update per step instead of c: only the statistics differ, and FedRevive resets them anyway.
        mask = param_mask(make_model())
    start = flatten(initial())[mask]
    assert rel_diff(fast[mask] - start, slow[mask] - start) <= bound
    assert float((fast[mask] - start).abs().max()) > 1e-3  # it did train


def test_tracked_statistics_remove_the_reset_share():
    """After FedRevive's reset and a client's 10 local iterations, the corrected statistics are the EMA of the
    batch moments; the raw buffers still hold 0.9^10 = 35% of the reset values."""
    layer = StatTracker(3)
    g = torch.Generator().manual_seed(0)
    true_mean, true_std = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([3.0, 0.5, 1.0])
    layer.train()
    for _ in range(10):
        layer(torch.randn(256, 3, 4, 4, generator=g) * true_std.view(1, 3, 1, 1) + true_mean.view(1, 3, 1, 1))
    assert float(layer.tracked) == 10
    mean, var = tracked_statistics(layer)
    rel = lambda a, b: float(((a - b).norm() / b.norm()))  # noqa: E731
    assert rel(mean, true_mean) < 0.02 and rel(var, true_std ** 2) < 0.05
    assert rel(layer.running_mean, true_mean) > 0.3 and rel(layer.running_var, true_std ** 2) > 0.2
    # Exactly the EMA of the batch moments, computed by hand.
    layer2, ema_mean, ema_var, w = StatTracker(1), 0.0, 0.0, 0.0
    for value in (1.0, 3.0):
        x = torch.tensor([[[[value - 1.0, value + 1.0]]]])
        layer2.train()(x)
        m, v = batch_moments(x)
        ema_mean, ema_var, w = 0.9 * ema_mean + 0.1 * float(m), 0.9 * ema_var + 0.1 * float(v), 0.9 * w + 0.1
    mean2, var2 = tracked_statistics(layer2)
    assert float(mean2) == pytest.approx(ema_mean / w) and float(var2) == pytest.approx(ema_var / w)
    # Reset: back to (0, 1) and nothing to correct.
    reset_norm_statistics(layer2)
    assert float(layer2.tracked) == 0 and [float(t) for t in tracked_statistics(layer2)] == [0.0, 1.0]


def test_corrected_teacher_statistics_match_the_clients_feature_statistics():
    """The L_bn target of a client model trained 10 iterations from a reset model is close to the true feature
    statistics of its data at the final model, and much closer than the raw running statistics."""
    model = make("stat")()
    g = torch.Generator().manual_seed(0)
    data = torch.randn(320, 1, 28, 28, generator=g) * 0.8 + 0.3
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    labels = torch.randint(10, (320,), generator=g)
    model.train()
    for i in range(10):
        batch = slice(32 * i, 32 * (i + 1))
        loss = torch.nn.functional.cross_entropy(model(data[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    layers = [m for m in model.modules() if isinstance(m, StatTracker)]
    moments = {}
    for m in layers:
        m.register_forward_hook(lambda mod, i, o: moments.__setitem__(mod, batch_moments(i[0])))
    with torch.no_grad():
        model.eval()(data)  # eval: the trackers are not updated by this pass
    for m in layers:
        true_mean, true_var = moments[m]
        _, var = tracked_statistics(m)
        corrected = float((var - true_var).norm() / true_var.norm())
        raw = float((m.running_var - true_var).norm() / true_var.norm())
        assert corrected < 0.5 * raw, (corrected, raw)


def test_synthesis_with_the_batched_teachers_matches_the_per_teacher_path():
    """The same synthesis call (same seed, adversarial student) with both teacher paths keeps the same labels
    and images. One generator step: later steps and the Reptile step go through Adam, which divides near-zero
    gradients by their own size, so summation-order differences become lr-sized steps and no float tolerance
    holds there (the gradients themselves are compared in the first test of this file)."""
    from mpi_afl.config.schema import DistillConfig
    from mpi_afl.distill.synthesizer import Synthesizer

    make_model = make("stat")
    stacked = trained_teachers(make_model, 3, seed=2)
    cfg = DistillConfig(nz=16, ngf=8, synth_batch=8, synth_steps=1, pool_size=32, bn=0.3)
    q = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(5)), dim=1)
    results = []
    for teachers in (TeacherEnsemble(make_model()).load(stacked), reference.LoopEnsemble(make_model, stacked)):
        synth = Synthesizer(cfg, (1, 28, 28), 10, (0.5,), (0.25,), "cpu", 11)
        notes = []
        images, labels = drain(synth.synthesize(teachers, q, make_model(), adversarial=True, notes=notes))
        results.append((images, labels, notes[0][1]["synth_agreement"]))
    (a_img, a_lab, a_agree), (b_img, b_lab, b_agree) = results
    assert torch.equal(a_lab, b_lab) and a_agree == b_agree
    assert torch.allclose(a_img, b_img, atol=1e-6)
