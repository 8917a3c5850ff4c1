"""FedEcho reconstruction (ALGORITHMS.md §4): weights, target, KD and the server flow."""

import math

import pytest
import torch

from mpi_afl.algorithms.ca2fl import CA2FL
from mpi_afl.algorithms.fedbuff import FedBuff
from mpi_afl.algorithms.fedecho import FedEcho, echo_target, entropy_weights, soft_kl
from mpi_afl.config import Config
from mpi_afl.models.flat import load_flat
from mpi_afl.storage.checkpoint import load_checkpoint, save_checkpoint

from fakes import FakeServer, TinyNet, small_distill

torch.set_num_threads(1)

CLASSES = 5
CLIENTS = 6


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


def make_cfg(inputs="synthetic", backbone="fedbuff", buffer_size=1, **distill) -> Config:
    cfg = Config()
    cfg.run.seed = 3
    cfg.run.out = "/nonexistent-run-dir"
    cfg.data.num_clients = CLIENTS
    cfg.server.lr = 0.5
    cfg.server.buffer_size = buffer_size
    cfg.echo.inputs, cfg.echo.backbone, cfg.echo.teachers = inputs, backbone, 3
    return small_distill(cfg, **{"kd_steps": 3, "kd_batch": 4, "freeze_versions": 1, "warmup_versions": 2,
                                 **distill})


class Server(FakeServer):
    """The fake server loop with FedEcho's client jobs (larger weight noise: teachers that disagree)."""

    def __init__(self, cfg: Config, kd_data: bool = False):
        super().__init__(cfg, tiny, num_classes=CLASSES, num_clients=CLIENTS, stat_batches=2, input_shift=0.2,
                         weight_noise=0.3, kd_data=kd_data)


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
    assert alg.staleness_weights(6) is None
    cfg.echo.staleness_factor = "polynomial"
    torch.testing.assert_close(alg.staleness_weights(6), torch.tensor([4.0, 4.0, 6.0]) ** -0.5)


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
    assert alg.last_weight == (0.25 if backbone == "ca2fl" else 1.0)


def test_kd_moves_the_student_towards_the_target_and_keeps_statistics():
    cfg = make_cfg(inputs="proxy", freeze_versions=0, warmup_versions=1, kd_lr=0.02, kd_steps=5, kd_batch=10)
    server = Server(cfg, kd_data=True)
    alg = FedEcho(cfg, server.ctx)
    kind, _, _, _ = server.arrive(alg, 0, 0)  # version 0 <= warm-up: no KD
    assert kind == "direct"
    server.arrive(alg, 1, 0)
    x_t = server.ctx.global_model
    kind, new, slices, delta = server.arrive(alg, 2, 1)  # version 2 > warm-up: KD
    assert kind == "generator" and slices == cfg.distill.kd_steps
    assert server.ctx.stats["kd_applied"] == 1
    x_prime = x_t + cfg.server.lr * delta  # FedBuff with B = 1
    mask = server.ctx.param_mask
    assert not torch.allclose(new[mask], x_prime[mask])
    assert torch.equal(new[~mask], x_prime[~mask])  # norm_stats = "keep": aggregated client statistics

    # On the proxy inputs, the new model is closer to the entropy-weighted target than x' was.
    inputs = server.ctx.kd_x
    with torch.no_grad():
        logits = torch.stack([t(inputs) for t in alg.teachers.modules()])
        target = echo_target(logits, entropy_weights(torch.softmax(logits, -1), cfg.echo.gamma), 1.0)

        def kl(flat):
            model = tiny()
            load_flat(model, flat)
            model.train()  # as during KD (batch statistics)
            return soft_kl(model(inputs), target, 1.0).item()

        assert kl(new) < 0.9 * kl(x_prime)


def test_reset_norm_stats_option():
    cfg = make_cfg(inputs="proxy", freeze_versions=0, warmup_versions=0)
    cfg.echo.norm_stats = "reset"
    server = Server(cfg, kd_data=True)
    alg = FedEcho(cfg, server.ctx)
    _, new, _, _ = server.arrive(alg, 0, 0)  # version 0: no KD yet, statistics reset all the same
    model = tiny()
    load_flat(model, new)
    assert torch.equal(model.norm.running_mean, torch.zeros(4)) and torch.equal(model.norm.running_var, torch.ones(4))


def test_synthetic_inputs_follow_fedrevive_gates():
    cfg = make_cfg(freeze_versions=1, warmup_versions=2)
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
    assert server.ctx.stats["kd_applied"] == 1
    assert set(alg.teachers.proxy.seen) == {0, 1, 2, 3}


def test_proxy_inputs_need_the_kd_split():
    server = Server(make_cfg(inputs="proxy"))
    with pytest.raises(ValueError, match="kd_fraction"):
        FedEcho(server.ctx.cfg, server.ctx)


ARRIVALS = [(0, 0), (1, 1), (2, 1), (3, 2), (4, 1), (5, 3), (0, 1), (2, 2), (1, 0)]


@pytest.mark.parametrize("inputs, backbone", [("synthetic", "ca2fl"), ("proxy", "fedbuff")])
def test_checkpoint_round_trip_continues_bit_identically(inputs, backbone, tmp_path):
    def make():
        cfg = make_cfg(inputs=inputs, backbone=backbone, buffer_size=2, freeze_versions=1, warmup_versions=1)
        cfg.echo.staleness_factor = "sqrt"
        server = Server(cfg, kd_data=inputs == "proxy")
        return server, FedEcho(cfg, server.ctx)

    def run(server, alg, arrivals):
        for client, lag in arrivals:
            server.arrive(alg, client, max(0, server.ctx.version - lag))

    whole, uninterrupted = make()
    run(whole, uninterrupted, ARRIVALS)
    assert whole.ctx.stats["kd_applied"] >= 2

    first, alg = make()
    run(first, alg, ARRIVALS[:5])  # mid-buffer: 5 arrivals with B = 2
    save_checkpoint(tmp_path / "ckpt.h5", {"algorithm": alg.state_dict()})
    state = load_checkpoint(tmp_path / "ckpt.h5")["algorithm"]
    run(first, alg, ARRIVALS[5:7])  # keep going after the save: the saved state must not move

    second, resumed = make()
    second.snapshots.update({v: x for v, x in first.snapshots.items() if v <= 2})
    second.ctx.version, second.ctx.global_model = 2, first.snapshots[2]
    resumed.load_state_dict(state)
    run(second, resumed, ARRIVALS[5:])
    assert second.ctx.version == whole.ctx.version
    assert torch.equal(second.ctx.global_model, whole.ctx.global_model)
