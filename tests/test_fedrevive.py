"""FedRevive and DD-FedRevive on a fake server context (docs/algorithms.md §3.1, §3.4)."""

import math
from dataclasses import replace

import pytest
import torch

from mpi_afl.algorithms.fedrevive import DDFedRevive, FedRevive, Knowledge
from mpi_afl.algorithms.staleness import beta, cosine_beta, step_beta
from mpi_afl.config import Config
from mpi_afl.config.schema import DistillConfig
from mpi_afl.algorithms.base import add_notes
from mpi_afl.distill.kd import record_kd
from mpi_afl.models.flat import flatten, load_flat
from mpi_afl.models.layers import reset_norm_statistics
from mpi_afl.storage.checkpoint import load_checkpoint, save_checkpoint

from fakes import FakeServer, TinyNet, small_distill

torch.set_num_threads(1)

CLASSES = 10
CLIENTS = 6


def tiny() -> TinyNet:
    """The test architecture, with StatTracker as its normalisation layer."""
    return TinyNet("stat", CLASSES)


def make_cfg(**distill) -> Config:
    cfg = Config()
    cfg.run.seed = 7
    cfg.server.lr = 0.5
    cfg.server.s_max = 2.0
    return small_distill(cfg, **{"kd_steps": 2, "kd_batch": 4, "teachers": 3, "freeze_versions": 2,
                                 "warmup_versions": 4, **distill})


class Server(FakeServer):
    """The fake server loop with FedRevive's client jobs; every arrival yields a new version."""

    def __init__(self, cfg: Config, kd_data: bool = False):
        super().__init__(cfg, tiny, num_classes=CLASSES, num_clients=CLIENTS, stat_batches=3, input_shift=0.1,
                         weight_noise=0.05, kd_data=kd_data)

    def arrive(self, alg, client: int, base: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Process one arrival; returns (new model, slices, delta)."""
        kind, new, slices, delta = super().arrive(alg, client, base)
        assert kind == "generator"
        return new, slices, delta


def plain_step(x: torch.Tensor, lr: float, delta: torch.Tensor) -> torch.Tensor:
    """x + lr * delta with the normalisation statistics reset: the result when KD does not blend."""
    model = tiny()
    load_flat(model, x + lr * delta)
    reset_norm_statistics(model)
    return flatten(model)


def test_fresh_update_passes_unchanged_even_past_warmup():
    server = Server(make_cfg(freeze_versions=0, warmup_versions=0))
    alg = FedRevive(server.ctx.cfg, server.ctx)
    for i in range(3):
        x = server.ctx.global_model
        new, slices, delta = server.arrive(alg, client=i, base=server.ctx.version)  # tau = 0
        assert server.last.weight == 0.0 and slices == 0
        assert torch.equal(new, plain_step(x, 0.5, delta))
    assert server.stats.get("kd_applied", 0) == 0
    assert len(alg.synth.pool) == 0


def test_warmup_gates_and_blend():
    cfg = make_cfg()
    server = Server(cfg)
    alg = FedRevive(cfg, server.ctx)
    server.arrive(alg, client=0, base=0)  # version 0 -> 1
    expected_beta = cosine_beta(1, cfg.server.s_max)
    assert 0 < expected_beta < 1
    # Version 1 < freeze (2): no DFKD at all, the stale update is not shrunk.
    x = server.ctx.global_model
    new, slices, delta = server.arrive(alg, client=1, base=0)
    assert server.last.weight == pytest.approx(cosine_beta(1, cfg.server.s_max))
    assert slices == 0 and len(alg.synth.pool) == 0
    assert torch.equal(new, plain_step(x, 0.5, delta))
    # Versions 2..4 (freeze <= v <= warmup): the generator trains, KD is not applied.
    for v in (2, 3, 4):
        assert server.ctx.version == v
        x = server.ctx.global_model
        new, slices, delta = server.arrive(alg, client=v, base=v - 1)
        assert slices == cfg.distill.synth_steps
        assert len(alg.synth.pool) == min(cfg.distill.pool_size, (v - 1) * cfg.distill.synth_batch)
        assert torch.equal(new, plain_step(x, 0.5, delta))
    assert server.stats.get("kd_applied", 0) == 0
    # Version 5 > warmup: full KD, and the blend changes the result.
    x = server.ctx.global_model
    new, slices, delta = server.arrive(alg, client=5, base=4)
    assert slices == cfg.distill.synth_steps + cfg.distill.kd_steps
    assert server.stats["kd_applied"] == 1
    assert not torch.allclose(new, plain_step(x, 0.5, delta))
    # Statistics of the new global model are reset (mean 0, var 1).
    model = tiny()
    load_flat(model, new)
    assert torch.equal(model.norm.running_mean, torch.zeros(4)) and torch.equal(model.norm.running_var, torch.ones(4))


class FixedKD(FedRevive):
    """FedRevive whose distillation returns a known Delta_KD, to check the blend alone."""

    def knowledge(self, ctx, x_t, share):
        yield
        return Knowledge(torch.full_like(x_t, 0.25))


def test_blend_is_one_minus_beta_raw_plus_beta_kd():
    cfg = make_cfg()
    server = Server(cfg)
    alg = FixedKD(cfg, server.ctx)
    server.arrive(alg, client=0, base=0)
    server.arrive(alg, client=1, base=1)
    x = server.ctx.global_model
    new, slices, delta = server.arrive(alg, client=2, base=1)  # tau = 1
    b = cosine_beta(1, cfg.server.s_max)
    assert slices == 1 and server.last.weight == pytest.approx(b)
    assert torch.equal(new, plain_step(x, 0.5, (1 - b) * delta + b * torch.full_like(x, 0.25)))
    server.arrive(alg, client=3, base=3)
    x = server.ctx.global_model
    new, _, delta = server.arrive(alg, client=4, base=0)  # tau = 4 = 2 s_max -> beta = 1: raw delta ignored
    assert server.last.weight == 1.0
    assert torch.allclose(new, plain_step(x, 0.5, torch.full_like(x, 0.25)))
    assert server.stats["kd_applied"] == 2  # the tau = 0 arrival skipped KD


def test_kd_diagnostics_are_running_means_of_norm_ratio_and_cosine():
    stats, notes = {}, []
    record_kd(notes, torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))  # ratio 2, orthogonal
    add_notes(stats, notes)
    assert stats == {"kd_applied": 1, "kd_norm_ratio": 2.0, "kd_cosine": 0.0}
    notes.clear()
    record_kd(notes, torch.tensor([-3.0, 0.0]), torch.tensor([3.0, 0.0]))  # ratio 1, opposite
    add_notes(stats, notes)
    assert stats["kd_applied"] == 2
    assert stats["kd_norm_ratio"] == pytest.approx(1.5) and stats["kd_cosine"] == pytest.approx(-0.5)


@pytest.mark.parametrize("pretrain, expected", [
    (0, [0, 1, 1, 2, 2, 3]),   # versions 2, 4 and 6 synthesise; 1 is frozen; 3 and 5 skip
    (3, [0, 4, 4, 5, 5, 6]),   # distill.pretrain = 3: three more at the first synthesis only
])
def test_synthesis_every_n_versions_after_pretraining(pretrain, expected):
    cfg = make_cfg(synth_every=2, warmup_versions=10, pretrain=pretrain, pool_size=64)
    server = Server(cfg)
    alg = FedRevive(cfg, server.ctx)
    server.arrive(alg, client=0, base=0)
    pools = []
    for v in range(1, 7):
        server.arrive(alg, client=v % CLIENTS, base=v - 1)
        pools.append(len(alg.synth.pool) // cfg.distill.synth_batch)
    assert pools == expected


def test_teacher_buffer_holds_the_c_most_recent_client_models():
    cfg = make_cfg(freeze_versions=100, warmup_versions=100)
    server = Server(cfg)
    alg = FedRevive(cfg, server.ctx)
    deltas = {}
    for v, client in enumerate([4, 1, 3, 0, 2]):
        base = max(0, v - 1)
        _, _, deltas[client] = server.arrive(alg, client=client, base=base)
    assert alg.teachers.clients == [2, 0, 3]
    assert torch.equal(alg.teachers.models[0], server.snapshots[3] + deltas[2])
    # The probe proxy saw every client's first upload.
    assert set(alg.teachers.proxy.seen) == {0, 1, 2, 3, 4} and all(n == 1 for n in alg.teachers.proxy.seen.values())


def _two_arrivals_without_probe(proxy: str) -> FedRevive:
    """FedRevive with `distill.proxy` = proxy after clients 0 and 4 arrived: nothing probed, KD applied once."""
    cfg = make_cfg(proxy=proxy, freeze_versions=0, warmup_versions=0)
    server = Server(cfg)
    alg = FedRevive(cfg, server.ctx)
    server.arrive(alg, client=0, base=0)
    server.arrive(alg, client=4, base=0)
    assert alg.teachers.proxy.seen == {}
    assert server.stats["kd_applied"] == 1
    return alg


def test_histogram_proxy_uses_true_label_proportions():
    q = _two_arrivals_without_probe("histogram").teachers.proportions()
    assert q.shape == (2, CLASSES)
    assert q[0].tolist() == pytest.approx([0.0] * 4 + [0.75, 0.0, 0.0, 0.25, 0.0, 0.0])


def test_uniform_proportions_need_no_estimate():
    q = _two_arrivals_without_probe("uniform").teachers.proportions()
    assert torch.equal(q, torch.full((2, CLASSES), 1 / CLASSES))


def run(alg_cls, server: Server, alg, arrivals):
    for client, lag in arrivals:
        server.arrive(alg, client=client, base=max(0, server.ctx.version - lag))


ARRIVALS = [(0, 0), (1, 1), (2, 1), (3, 2), (4, 1), (5, 3), (0, 1), (2, 2)]


@pytest.mark.parametrize("alg_cls", [FedRevive, DDFedRevive])
def test_checkpoint_round_trip_continues_bit_identically(alg_cls, tmp_path):
    cfg = make_cfg(freeze_versions=2, warmup_versions=3)
    kd_data = alg_cls is DDFedRevive
    whole = Server(cfg, kd_data)
    uninterrupted = alg_cls(cfg, whole.ctx)
    run(alg_cls, whole, uninterrupted, ARRIVALS)

    first = Server(cfg, kd_data)
    alg = alg_cls(cfg, first.ctx)
    run(alg_cls, first, alg, ARRIVALS[:5])
    save_checkpoint(tmp_path / "ckpt.h5", {"algorithm": alg.state_dict()})
    state = load_checkpoint(tmp_path / "ckpt.h5")["algorithm"]
    run(alg_cls, first, alg, ARRIVALS[5:6])  # keep going after the save: the saved state must not move

    second = Server(cfg, kd_data)
    second.snapshots.update(first.snapshots)
    second.ctx = replace(second.ctx, version=5, global_model=first.snapshots[5])
    second.stats = {"kd_applied": 0}
    resumed = alg_cls(cfg, second.ctx)
    resumed.load_state_dict(state)
    run(alg_cls, second, resumed, ARRIVALS[5:])
    assert second.ctx.version == whole.ctx.version == len(ARRIVALS)
    assert torch.equal(second.ctx.global_model, whole.ctx.global_model)
    assert whole.stats["kd_applied"] >= 3
    if alg_cls is FedRevive:
        assert torch.equal(resumed.synth.pool.images, uninterrupted.synth.pool.images)


def test_dd_fedrevive_blends_every_update_with_fixed_beta():
    cfg = make_cfg()
    server = Server(cfg, kd_data=True)
    alg = DDFedRevive(cfg, server.ctx)
    x = server.ctx.global_model
    new, slices, delta = server.arrive(alg, client=0, base=0)  # tau = 0, version 0 < freeze: no gates
    assert server.last.weight == 0.5
    assert slices == cfg.distill.kd_steps
    assert server.stats["kd_applied"] == 1
    assert not torch.allclose(new, plain_step(x, 0.5, delta))


def test_dd_fedrevive_needs_the_kd_split():
    server = Server(make_cfg())
    with pytest.raises(ValueError, match="kd_fraction"):
        DDFedRevive(server.ctx.cfg, server.ctx)


def test_beta_variants():
    d = DistillConfig()
    for tau, expected in [(0, 0.0), (37, 0.0), (37.5, 0.25), (74, 0.25), (75, 0.5), (112, 0.5),
                          (112.5, 0.75), (149, 0.75), (150, 1.0), (400, 1.0)]:
        assert step_beta(tau, 75.0) == expected, tau
    d.beta = "step"
    assert beta(80, d, 75.0) == 0.5
    d.beta = "cosine"
    assert beta(0, d, 75.0) == 0.0 and beta(75, d, 75.0) == pytest.approx(0.5) and beta(150, d, 75.0) == 1.0
    d.beta = "exponential"
    assert beta(100, d, 75.0) == pytest.approx(1 - math.exp(-0.5))
    d.beta = "linear"
    assert beta(50, d, 75.0) == pytest.approx(0.5) and beta(500, d, 75.0) == 1.0
    d.beta = "bogus"
    with pytest.raises(ValueError, match="allowed"):
        beta(1, d, 75.0)


def test_batchnorm_statistics_are_aggregated_not_reset():
    """The reset after aggregation touches stat trackers only (as the research code): a BatchNorm model keeps
    the aggregated running statistics it needs for evaluation, instead of mean 0 / variance 1."""
    cfg = make_cfg(freeze_versions=0, warmup_versions=0)
    server = FakeServer(cfg, lambda: TinyNet("batchnorm", CLASSES), num_classes=CLASSES, num_clients=CLIENTS,
                        stat_batches=3, input_shift=0.1, weight_noise=0.05)
    alg = FedRevive(server.ctx.cfg, server.ctx)
    x = server.ctx.global_model
    _, new, _, delta = server.arrive(alg, client=1, base=0)  # fresh: beta = 0, the update passes unchanged
    assert torch.equal(new, x + 0.5 * delta)
    model = TinyNet("batchnorm", CLASSES)
    load_flat(model, new)
    assert not torch.equal(model.norm.running_var, torch.ones(4))
