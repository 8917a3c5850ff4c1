"""FedEcho reconstruction (docs/algorithms.md §4): weights, target, KD, the bounded correction and the server flow.

Tests of the first reconstruction's behaviour (entropy weights, the student replacing x') run it through
FIRST, the configuration that keeps it reachable."""

import math
from dataclasses import replace

import pytest
import torch

from mpi_afl.algorithms.ca2fl import CA2FL
from mpi_afl.algorithms.fedbuff import FedBuff
from mpi_afl.algorithms.fedecho import (FedEcho, echo_target, entropy_weights, expert_weights, relative_weights,
                                        soft_kl, teacher_staleness)
from mpi_afl.algorithms.staleness import cosine_beta
from mpi_afl.config import Config
from mpi_afl.models.flat import flatten, load_flat
from mpi_afl.storage.checkpoint import load_checkpoint, save_checkpoint

from fakes import FakeServer, TinyNet, small_distill

torch.set_num_threads(1)

CLASSES = 5
CLIENTS = 6
# The first reconstruction (bench/ACCURACY.md's "FedEcho (FedBuff backbone)"), kept reachable by configuration.
FIRST = {"backbone": "fedbuff", "weighting": "entropy", "staleness_factor": "none", "kd_step": 1.0,
         "kd_share": "constant"}


def entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


# -- pure functions ---------------------------------------------------------------


def test_weights_favour_the_confident_teacher():
    confident, unsure = [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]
    probs = torch.tensor([[confident, unsure], [unsure, confident]])  # (K=2, B=2, C=3)
    a = entropy_weights(probs, gamma=0.5)
    h_c, h_u = entropy(confident), entropy(unsure)
    expected = 1 / (1 + math.exp(-(h_u - h_c) / 0.5))  # softmax of (-h_c, -h_u) / gamma
    torch.testing.assert_close(a, torch.tensor([[expected, 1 - expected], [1 - expected, expected]]))
    assert expected > 0.6
    # every teacher keeps a positive weight, and each sample's weights sum to 1
    assert bool((a > 0).all())
    torch.testing.assert_close(a.sum(0), torch.ones(2))


def test_gamma_moves_the_target_between_mean_and_most_confident():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, generator=g) * torch.tensor([4.0, 1.0, 0.2])[:, None, None]
    probs = torch.softmax(logits, dim=-1)
    mean = probs.mean(dim=0)
    errors = [(echo_target(logits, entropy_weights(probs, gamma), 1.0) - mean).abs().max().item()
              for gamma in (0.1, 1.0, 10.0, 1e6)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2
    assert errors[-1] < 1e-5
    # gamma -> 0: the single most confident teacher of each sample
    sharp = echo_target(logits, entropy_weights(probs, 1e-4), 1.0)
    best = torch.special.entr(probs).sum(-1).argmin(dim=0)
    torch.testing.assert_close(sharp, probs[best, torch.arange(4)])


def test_one_teacher_target_is_that_teacher():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]]])
    weights = entropy_weights(torch.softmax(logits, -1), gamma=0.3)
    assert torch.equal(weights, torch.ones(1, 2))
    torch.testing.assert_close(echo_target(logits, weights, 2.0), torch.softmax(logits[0] / 2.0, dim=-1))


def test_staleness_factor_rescales_and_renormalises():
    probs = torch.full((3, 2, 4), 0.25)  # equal entropies: entropy weights 1/3 each
    a = entropy_weights(probs, 1.0, torch.tensor([1.0, 0.5, 0.5]))
    torch.testing.assert_close(a, torch.tensor([[0.5, 0.5], [0.25, 0.25], [0.25, 0.25]]))
    # every teacher fully discounted: fall back to the entropy weights, never a zero target
    torch.testing.assert_close(entropy_weights(probs, 1.0, torch.zeros(3)), torch.full((3, 2), 1 / 3))
    with pytest.raises(ValueError, match="staleness_weights"):
        entropy_weights(probs, 1.0, torch.ones(2))


CONFIDENT, UNSURE, OTHER = [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3], [0.05, 0.9, 0.05]


def test_relative_weights_of_a_fresh_confident_and_a_stale_uncertain_teacher_by_hand():
    probs = torch.tensor([[CONFIDENT], [UNSURE]], dtype=torch.float64)  # (K=2, B=1, C=3)
    a, rho = relative_weights(probs, 1.0, torch.tensor([1.0, 0.5], dtype=torch.float64))
    # reference p^ = (1 * confident + 0.5 * unsure) / 1.5
    ref = [(0.9 + 0.5 / 3) / 1.5, (0.05 + 0.5 / 3) / 1.5, (0.05 + 0.5 / 3) / 1.5]
    assert ref == pytest.approx([0.711111, 0.144444, 0.144444], abs=1e-6)
    overlap_unsure = 1 / 3 + 2 * ref[1]                   # sum_c min(p, p^)
    expected_rho = [1.0, 0.5 + 0.5 * overlap_unsure]      # the fresh teacher: s = 1, rho = 1
    scores = [0.9 * math.log(ref[0]) + 0.1 * math.log(ref[1]),  # sum_c p log p^
              sum(math.log(r) for r in ref) / 3]
    raw = [r * math.exp(c) for r, c in zip(expected_rho, scores)]
    expected = [w / sum(raw) for w in raw]
    torch.testing.assert_close(rho, torch.tensor(expected_rho, dtype=torch.float64))
    torch.testing.assert_close(a[:, 0], torch.tensor(expected, dtype=torch.float64))
    assert expected_rho[1] == pytest.approx(0.811111, abs=1e-6)
    assert expected == pytest.approx([0.752610, 0.247390], abs=1e-6)


def test_relative_weights_of_three_teachers_by_hand():
    """A fresh confident teacher, a stale uncertain one and a stale one confident in another class."""
    probs = torch.tensor([[CONFIDENT], [UNSURE], [OTHER]], dtype=torch.float64)
    s = [1.0, 0.5, 0.5]
    a, rho = relative_weights(probs, 1.0, torch.tensor(s, dtype=torch.float64))
    ref = [(0.9 + 0.5 / 3 + 0.025) / 2, (0.05 + 0.5 / 3 + 0.45) / 2, (0.05 + 0.5 / 3 + 0.025) / 2]
    assert ref == pytest.approx([0.545833, 0.333333, 0.120833], abs=1e-6)
    overlaps = [ref[0] + 0.05 + 0.05, 1 / 3 + ref[1] + ref[2], 0.05 + ref[1] + 0.05]
    expected_rho = [si + (1 - si) * o for si, o in zip(s, overlaps)]
    assert expected_rho == pytest.approx([1.0, 0.89375, 0.716667], abs=1e-6)
    logs = [math.log(r) for r in ref]
    scores = [sum(p * l for p, l in zip(dist, logs)) for dist in (CONFIDENT, UNSURE, OTHER)]
    raw = [r * math.exp(c) for r, c in zip(expected_rho, scores)]
    expected = [w / sum(raw) for w in raw]
    torch.testing.assert_close(rho, torch.tensor(expected_rho, dtype=torch.float64))
    torch.testing.assert_close(a[:, 0], torch.tensor(expected, dtype=torch.float64))
    assert expected == pytest.approx([0.505501, 0.256275, 0.238224], abs=1e-6)
    # Entropy weights rate the two confident teachers alike; here the stale one that the reference does not
    # back gets less than the uncertain one, and still a positive weight.
    entropy_a = entropy_weights(probs, 1.0)[:, 0]
    assert entropy_a[0] == pytest.approx(entropy_a[2].item())
    assert 0 < a[2, 0] < a[1, 0] < a[0, 0]


def test_a_stale_teacher_that_agrees_keeps_its_influence():
    agreeing = [0.85, 0.1, 0.05]
    probs = torch.tensor([[CONFIDENT], [UNSURE], [agreeing]])
    a, rho = relative_weights(probs, 1.0, torch.tensor([1.0, 0.5, 0.5]))
    _, rho_other = relative_weights(torch.tensor([[CONFIDENT], [UNSURE], [OTHER]]), 1.0, torch.tensor([1.0, 0.5, 0.5]))
    assert rho[2] > rho_other[2] and rho[2] > 0.9
    assert a[2, 0] > a[1, 0]


def test_relative_weights_limits_and_errors():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 4, 6, generator=g) * 3, dim=-1)
    s = torch.tensor([1.0, 0.4, 0.2])
    # gamma -> infinity: the reliability-weighted mean
    a, rho = relative_weights(probs, 1e9, s)
    torch.testing.assert_close(a, (rho / rho.sum())[:, None].expand(3, 4))
    assert bool((rho >= s).all()) and bool((rho <= 1).all())
    # no staleness prior: every teacher fresh, reliability 1
    _, rho = relative_weights(probs, 1.0)
    assert torch.equal(rho, torch.ones(3))
    # every prior 0: the reference is the plain mean, and the weights stay a distribution
    a, rho = relative_weights(probs, 1.0, torch.zeros(3))
    assert bool((rho > 0).all())
    torch.testing.assert_close(a.sum(0), torch.ones(4))
    for bad in (torch.ones(2), torch.tensor([1.0, 1.5, 1.0]), torch.tensor([1.0, -0.1, 1.0])):
        with pytest.raises(ValueError, match="staleness_weights"):
            relative_weights(probs, 1.0, bad)


def test_expert_weights_by_hand():
    """Two teachers as class experts: one owns class 0 (and some of 1), the stale one owns class 2."""
    q = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.1, 0.8]], dtype=torch.float64)
    rho = torch.tensor([1.0, 0.5], dtype=torch.float64)
    a = expert_weights(q, torch.tensor([0, 2, 1]), rho)
    expected = [[0.8 / 0.85, 0.0, 0.2 / 0.25],   # rho_k q_k(y) = (0.8, 0.05), (0, 0.4), (0.2, 0.05)
                [0.05 / 0.85, 1.0, 0.05 / 0.25]]
    torch.testing.assert_close(a, torch.tensor(expected, dtype=torch.float64))
    # a class no teacher claims falls back to the reliabilities alone, never a zero target
    q0 = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(expert_weights(q0, torch.tensor([2]), torch.tensor([1.0, 0.5])),
                               torch.tensor([[2 / 3], [1 / 3]]))
    # a class with a tiny but positive share is still normalised exactly (no floor on the sum)
    tiny = torch.tensor([[1.0, 3e-12], [0.0, 1e-12]], dtype=torch.float64)
    torch.testing.assert_close(expert_weights(tiny, torch.tensor([1]), torch.ones(2, dtype=torch.float64)),
                               torch.tensor([[0.75], [0.25]], dtype=torch.float64))
    with pytest.raises(ValueError, match="proportions"):
        expert_weights(q0, torch.tensor([0]), torch.ones(3))


def test_soft_kl_is_zero_at_the_target_and_its_gradient_moves_towards_it():
    target = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.1, 0.8]])
    at_target = torch.log(target.clamp_min(1e-30))
    assert soft_kl(at_target, target, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    z = torch.zeros(2, 3, requires_grad=True)
    before = soft_kl(z, target, 2.0)
    before.backward()
    after = soft_kl(z.detach() - 0.5 * z.grad, target, 2.0)
    assert 0 < after.item() < before.item()


# -- the algorithm on a fake server --------------------------------------------------


def tiny() -> TinyNet:
    """The test architecture, with BatchNorm as its normalisation layer."""
    return TinyNet("batchnorm", CLASSES)


def make_cfg(inputs="synthetic", backbone="fedbuff", buffer_size=1, echo=None, **distill) -> Config:
    """A small FedEcho config; `echo` overrides echo.* keys (after `inputs` and `backbone`)."""
    cfg = Config()
    cfg.run.seed = 3
    cfg.run.out = "/nonexistent-run-dir"
    cfg.data.num_clients = CLIENTS
    cfg.server.lr = 0.5
    cfg.server.buffer_size = buffer_size
    cfg.echo.inputs, cfg.echo.backbone, cfg.echo.teachers = inputs, backbone, 3
    if inputs == "proxy":
        cfg.echo.weighting = "relative"  # "expert", the default, needs each synthetic image's class
    for key, value in (echo or {}).items():
        setattr(cfg.echo, key, value)
    return small_distill(cfg, **{"kd_steps": 3, "kd_batch": 4, "freeze_versions": 1, "warmup_versions": 2,
                                 **distill})


class Server(FakeServer):
    """The fake server loop with FedEcho's client jobs (larger weight noise: teachers that disagree)."""

    def __init__(self, cfg: Config, kd_data: bool = False, make_model=tiny):
        super().__init__(cfg, make_model, num_classes=CLASSES, num_clients=CLIENTS, stat_batches=2,
                         input_shift=0.2, weight_noise=0.3, kd_data=kd_data)


def test_teachers_are_the_latest_models_of_distinct_recent_clients():
    cfg = make_cfg(freeze_versions=100, warmup_versions=100)
    server = Server(cfg)
    alg = FedEcho(cfg, server.ctx)
    deltas = {}
    for client, base in [(4, 0), (1, 0), (3, 1), (1, 2), (0, 3), (1, 3)]:
        _, _, _, deltas[client] = server.arrive(alg, client, base)
    assert alg.teachers.clients == [1, 0, 3]  # client 1 moved to the front each time, never twice
    assert alg.teachers.versions == [3, 3, 1]
    assert torch.equal(alg.teachers.models[0], server.snapshots[3] + deltas[1])
    cfg.echo.staleness_factor = "none"
    assert teacher_staleness(cfg, alg.teachers.versions, 6) is None
    cfg.echo.staleness_factor = "polynomial"
    s = teacher_staleness(cfg, alg.teachers.versions, 6)
    torch.testing.assert_close(s, torch.tensor([4.0, 4.0, 6.0]) ** -0.5)


@pytest.mark.parametrize("backbone, reference", [("fedbuff", FedBuff), ("ca2fl", CA2FL)])
def test_before_freeze_fedecho_is_its_backbone_without_discount(backbone, reference):
    cfg = make_cfg(backbone=backbone, buffer_size=2, freeze_versions=100, warmup_versions=100)
    cfg.server.staleness = "sqrt"  # FedEcho's parameter step ignores it (§4 step 1)
    echo_server, ref_server = Server(cfg), Server(cfg)
    alg = FedEcho(cfg, echo_server.ctx)
    ref_cfg = make_cfg(backbone=backbone, buffer_size=2)
    ref = reference(ref_cfg, ref_server.ctx)  # staleness "none"
    for client, lag in [(0, 0), (1, 0), (2, 1), (0, 1), (3, 0), (2, 2)]:
        kind, new, slices, _ = echo_server.arrive(alg, client, max(0, echo_server.ctx.version - lag))
        _, expected, _, _ = ref_server.arrive(ref, client, max(0, ref_server.ctx.version - lag))
        assert kind == "direct" and slices == 0
        assert (new is None) == (expected is None)
        if new is not None:
            assert torch.equal(new, expected)
    assert echo_server.ctx.version == 3
    assert echo_server.last.weight == (0.25 if backbone == "ca2fl" else 1.0)


def test_kd_moves_the_student_towards_the_target_and_keeps_statistics():
    # The first reconstruction: the student replaces x' (kd_step 1, share 1), so the new model is the student.
    cfg = make_cfg(inputs="proxy", echo=FIRST, freeze_versions=0, warmup_versions=1, kd_lr=0.02, kd_steps=5,
                   kd_batch=10)
    server = Server(cfg, kd_data=True)
    alg = FedEcho(cfg, server.ctx)
    kind, _, _, _ = server.arrive(alg, 0, 0)  # version 0 <= warm-up: no KD
    assert kind == "direct"
    server.arrive(alg, 1, 0)
    x_t = server.ctx.global_model
    kind, new, slices, delta = server.arrive(alg, 2, 1)  # version 2 > warm-up: KD
    assert kind == "generator" and slices == cfg.distill.kd_steps
    assert server.stats["kd_applied"] == 1
    x_prime = x_t + cfg.server.lr * delta  # FedBuff with B = 1
    mask = server.ctx.param_mask
    assert not torch.allclose(new[mask], x_prime[mask])
    assert torch.equal(new[~mask], x_prime[~mask])  # norm_stats = "keep": aggregated client statistics

    # On the proxy inputs, the new model is closer to the entropy-weighted target than x' was.
    inputs = server.ctx.kd_x
    with torch.no_grad():
        logits = alg.teachers.ensemble()(inputs)
        target = echo_target(logits, entropy_weights(torch.softmax(logits, -1), cfg.echo.gamma), 1.0)

        def kl(flat):
            model = tiny()
            load_flat(model, flat)
            model.train()  # as during KD (batch statistics)
            return soft_kl(model(inputs), target, 1.0).item()

        assert kl(new) < 0.9 * kl(x_prime)


def new_models(echo: dict, lags=(0, 1, 1, 2), checks: list | None = None
               ) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
    """The models of a proxy-input run with B = 2, KD from version 1 and s_max = 2, one arrival per client
    with the given lags: (models, stats, param mask). With the default lags the second model is the first
    distilled one, from two updates of staleness 1 (mean 1: share cosine_beta(2 * 1, 2) = 0.5). With a
    `checks` list, the KD diagnostic runs on the proxy images and every kd_checks row is appended to it."""
    cfg = make_cfg(inputs="proxy", backbone="ca2fl", buffer_size=2, echo=echo, freeze_versions=0,
                   warmup_versions=0, kd_lr=0.02)
    cfg.server.s_max = 2.0
    server = Server(cfg, kd_data=True)
    if checks is not None:
        server.ctx = replace(server.ctx, check_x=server.ctx.kd_x, check_y=server.ctx.kd_y)
    alg = FedEcho(cfg, server.ctx)
    models = []
    for client, lag in enumerate(lags):
        _, new, _, _ = server.arrive(alg, client, max(0, server.ctx.version - lag))
        if new is not None:
            models.append(new)
        if server.last.kd_check is not None:
            checks.append(server.last.kd_check)
    return models, server.stats, server.ctx.param_mask


def test_kd_correction_is_a_bounded_step_from_x_prime_towards_the_student():
    (_, x_prime), _, mask = new_models({"kd_step": 0.0})  # the backbone alone gives x'
    (_, student), stats, _ = new_models({"kd_step": 1.0, "kd_share": "constant"})
    (_, corrected), _, _ = new_models({"kd_step": 0.3, "kd_share": "constant"})
    assert stats["kd_applied"] == 1 and not torch.allclose(student[mask], x_prime[mask])
    assert torch.equal(corrected[mask], torch.lerp(x_prime, student, 0.3)[mask])
    assert torch.equal(corrected[~mask], x_prime[~mask])  # statistics: x''s (norm_stats = "keep")
    ratio = (corrected - x_prime)[mask].norm() / (student - x_prime)[mask].norm()
    assert ratio.item() == pytest.approx(0.3, rel=1e-4)


def test_kd_share_grows_with_the_staleness_of_the_buffered_updates():
    share = cosine_beta(2 * 1.0, 2.0)
    assert share == pytest.approx(0.5)
    (_, stale), stats, _ = new_models({"kd_step": 0.4})  # kd_share = "staleness" (default)
    (_, same), _, _ = new_models({"kd_step": 0.4 * share, "kd_share": "constant"})
    assert stats["echo_kd_share"] == share and stats["kd_applied"] == 1
    assert stats["echo_distillations"] == stats["echo_corrections"] == 1 and 0 < stats["echo_reliability"] <= 1
    assert torch.equal(stale, same)
    # A buffer of fresh updates (staleness 0) gets share 0: no KD, the backbone's model.
    (_, fresh), stats, _ = new_models({"kd_step": 0.4}, lags=(0, 0, 0, 0))
    (_, backbone), _, _ = new_models({"kd_step": 0.0}, lags=(0, 0, 0, 0))
    assert stats["echo_kd_share"] == 0.0 and "kd_applied" not in stats and "echo_corrections" not in stats
    assert torch.equal(fresh, backbone)


def test_kd_diagnostic_compares_the_corrected_model_with_x_prime_and_changes_nothing():
    checks = []
    (_, x_prime), _, _ = new_models({"kd_step": 0.0})
    (_, plain), plain_stats, _ = new_models({"kd_step": 0.4})
    (_, corrected), stats, _ = new_models({"kd_step": 0.4}, checks=checks)
    assert torch.equal(corrected, plain) and not torch.equal(corrected, x_prime)  # read-only for the run
    assert "kd_checks" not in plain_stats

    server = Server(make_cfg(inputs="proxy"), kd_data=True)
    x, y = server.ctx.kd_x, server.ctx.kd_y

    def loss(flat):  # held-out cross-entropy in eval mode, computed here independently
        model = tiny()
        load_flat(model, flat)
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y).item()

    assert len(checks) == stats["kd_checks"] == stats["kd_applied"] == 1
    row = checks[0]
    assert row["version"] == 1 and row["staleness"] == 1 and row["share"] == pytest.approx(0.4 * 0.5)
    assert row["loss_before"] == pytest.approx(loss(x_prime), rel=1e-6)
    assert row["loss_after"] == pytest.approx(loss(corrected), rel=1e-6)
    assert row["loss_before"] != row["loss_after"]
    assert stats["kd_loss_change"] == pytest.approx(row["loss_after"] - row["loss_before"])
    assert stats["kd_loss_improved"] == float(row["loss_after"] < row["loss_before"])


def test_kd_step_zero_is_ca2fl_bit_for_bit():
    cfg = make_cfg(backbone="ca2fl", buffer_size=2, echo={"kd_step": 0.0}, freeze_versions=0, warmup_versions=0)
    echo_server, ref_server = Server(cfg), Server(cfg)
    alg, ref = FedEcho(cfg, echo_server.ctx), CA2FL(cfg, ref_server.ctx)
    models = 0
    for client, lag in [(0, 0), (1, 0), (2, 1), (0, 1), (3, 0), (2, 2), (4, 3), (5, 1), (1, 4), (3, 2)]:
        kind, new, _, _ = echo_server.arrive(alg, client, max(0, echo_server.ctx.version - lag))
        _, expected, _, _ = ref_server.arrive(ref, client, max(0, ref_server.ctx.version - lag))
        assert kind == "direct" and (new is None) == (expected is None)
        if new is not None:
            models += 1
            assert torch.equal(new, expected)
    assert models == 5 and len(alg.synth.pool) == 0 and echo_server.stats == {}


def test_reset_norm_stats_option():
    # With stat trackers: FedRevive's reset (models/layers.reset_norm_statistics) leaves BatchNorm alone.
    cfg = make_cfg(inputs="proxy", freeze_versions=0, warmup_versions=0)
    cfg.echo.norm_stats = "reset"
    server = Server(cfg, kd_data=True, make_model=lambda: TinyNet("stat", CLASSES))
    alg = FedEcho(cfg, server.ctx)
    _, new, _, _ = server.arrive(alg, 0, 0)  # version 0: no KD yet, statistics reset all the same
    model = TinyNet("stat", CLASSES)
    load_flat(model, new)
    assert torch.equal(model.norm.running_mean, torch.zeros(4)) and torch.equal(model.norm.running_var, torch.ones(4))
    assert model.norm.tracked.item() == 0
    cfg.echo.norm_stats = "keep"  # the clients' aggregated statistics, never the reset values
    _, kept, _, _ = server.arrive(alg, 1, 1)
    load_flat(model, kept)
    assert not torch.equal(model.norm.running_mean, torch.zeros(4))


def test_synthetic_inputs_follow_fedrevive_gates():
    # Share 1: these arrivals are fresh (staleness 0), so the default staleness share would skip KD.
    cfg = make_cfg(echo={"kd_share": "constant"}, freeze_versions=1, warmup_versions=2)
    server = Server(cfg)
    alg = FedEcho(cfg, server.ctx)
    d = cfg.distill
    kinds = []
    for v in range(4):
        kind, _, slices, _ = server.arrive(alg, v, v)
        kinds.append((kind, slices, len(alg.synth.pool)))
    assert kinds == [("direct", 0, 0),                                              # below freeze
                     ("generator", d.synth_steps, d.synth_batch),                   # generator only
                     ("generator", d.synth_steps, 2 * d.synth_batch),
                     ("generator", d.synth_steps + d.kd_steps, 3 * d.synth_batch)]  # beyond warm-up: KD
    assert server.stats["kd_applied"] == 1
    assert set(alg.teachers.proxy.seen) == {0, 1, 2, 3}


def test_expert_weights_use_the_class_each_kd_image_was_made_for():
    """With "expert", each KD iteration's target is the class-expert mixture for its batch's intended classes:
    replaying the student's KD from x' on the same draws with those weights gives the same corrected model."""
    def run(echo):
        cfg = make_cfg(echo={"kd_share": "constant", "staleness_factor": "none", **echo}, freeze_versions=1,
                       warmup_versions=2)
        server = Server(cfg)
        alg = FedEcho(cfg, server.ctx)
        draws = []
        original = alg.draw
        alg.draw = lambda q: draws.append(original(q)) or draws[-1]
        models = [server.arrive(alg, v, v)[1] for v in range(4)]
        return models[-1], draws, alg, server

    new, draws, alg, server = run({"kd_step": 0.5, "weighting": "expert"})
    x_prime = run({"kd_step": 0.0})[0]  # the backbone's step alone (its output does not depend on KD)
    relative = run({"kd_step": 0.5, "weighting": "relative"})[0]
    d = alg.cfg.distill
    assert server.stats["kd_applied"] == 1 and len(draws) == d.kd_steps
    assert server.stats["echo_reliability"] == 1.0  # no staleness prior: every teacher fully reliable
    teachers, q = alg.teachers.ensemble(), alg.teachers.proportions()
    student = tiny()
    load_flat(student, x_prime)
    student.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=d.kd_lr, weight_decay=d.kd_weight_decay)
    agreement = []
    for inputs, labels in draws:
        assert labels.shape == (len(alg.teachers) * d.kd_batch,)  # kd_batch images per teacher, drawn by its q_k
        with torch.no_grad():
            logits = teachers(inputs)
            target = echo_target(logits, expert_weights(q, labels, torch.ones(len(q))), d.temperature)
        agreement.append((target.argmax(-1) == labels).float().mean().item())
        optimizer.zero_grad()
        soft_kl(student(inputs), target, d.temperature).backward()
        optimizer.step()
    mask = server.ctx.param_mask
    replay = torch.lerp(x_prime, flatten(student), 0.5)
    torch.testing.assert_close(new[mask], replay[mask])
    assert torch.equal(new[~mask], x_prime[~mask])
    assert not torch.allclose(new[mask], relative[mask])  # the weights matter
    assert server.stats["echo_target_agreement"] == pytest.approx(sum(agreement) / len(agreement))


def test_proxy_inputs_need_the_kd_split():
    server = Server(make_cfg(inputs="proxy"))
    with pytest.raises(ValueError, match="kd_fraction"):
        FedEcho(server.ctx.cfg, server.ctx)


ARRIVALS = [(0, 0), (1, 1), (2, 1), (3, 2), (4, 1), (5, 3), (0, 1), (2, 2), (1, 0)]


@pytest.mark.parametrize("inputs, echo", [("synthetic", {"backbone": "ca2fl"}),
                                         ("synthetic", {"backbone": "ca2fl", "weighting": "relative"}),
                                         ("proxy", {**FIRST, "staleness_factor": "sqrt"})])
def test_checkpoint_round_trip_continues_bit_identically(inputs, echo, tmp_path):
    def make():
        # The defaults (expert weights, staleness share: s_max 2 makes it matter), relative weights and the first
        # reconstruction; the checkpoint is taken mid-buffer, so the buffered updates' staleness must be restored.
        cfg = make_cfg(inputs=inputs, buffer_size=2, echo=echo, freeze_versions=1, warmup_versions=1)
        cfg.server.s_max = 2.0
        server = Server(cfg, kd_data=inputs == "proxy")
        return server, FedEcho(cfg, server.ctx)

    def run(server, alg, arrivals):
        for client, lag in arrivals:
            server.arrive(alg, client, max(0, server.ctx.version - lag))

    whole, uninterrupted = make()
    run(whole, uninterrupted, ARRIVALS)
    assert whole.stats["kd_applied"] >= 2

    first, alg = make()
    run(first, alg, ARRIVALS[:5])  # mid-buffer: 5 arrivals with B = 2
    save_checkpoint(tmp_path / "ckpt.h5", {"algorithm": alg.state_dict()})
    state = load_checkpoint(tmp_path / "ckpt.h5")["algorithm"]
    run(first, alg, ARRIVALS[5:7])  # keep going after the save: the saved state must not move

    second, resumed = make()
    second.snapshots.update({v: x for v, x in first.snapshots.items() if v <= 2})
    second.ctx = replace(second.ctx, version=2, global_model=first.snapshots[2])
    resumed.load_state_dict(state)
    run(second, resumed, ARRIVALS[5:])
    assert second.ctx.version == whole.ctx.version
    assert torch.equal(second.ctx.global_model, whole.ctx.global_model)
