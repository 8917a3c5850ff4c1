"""FedAvg, FedAsync, FedBuff and AFL-DW (docs/algorithms.md §2, §3.2) on hand-computed 3-element vectors,
their equivalences, and state-dict round trips."""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from mpi_afl.algorithms import algorithm_class
from mpi_afl.algorithms.afl_dw import AFLDW
from mpi_afl.algorithms.base import Algorithm, Update
from mpi_afl.algorithms.fedasync import FedAsync
from mpi_afl.algorithms.fedavg import FedAvg
from mpi_afl.algorithms.fedbuff import FedBuff
from mpi_afl.algorithms.staleness import cosine_beta
from mpi_afl.config import Config
from mpi_afl.names import ALGORITHMS

from fakes import ServerLoop

X0 = (1.0, 2.0, 3.0)


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


class VectorServer(ServerLoop):
    """The server loop (fakes.py) on 3-element vectors x_t."""

    def __init__(self, cfg: Config, x0=X0):
        super().__init__(cfg, vec(*x0), lambda: nn.Linear(1, 1), param_mask=torch.ones(3, dtype=torch.bool),
                         num_classes=2, image_shape=(1, 1, 1), data_mean=(0.0,), data_std=(1.0,),
                         client_histograms=np.ones((cfg.data.num_clients, 2)))

    def feed(self, algo, delta, base=None, num_samples=1, client=0):
        """One arrival trained from version `base` (default: the current one); returns the new model or None."""
        base = self.ctx.version if base is None else base
        update = Update(client_id=client, job_index=0, base_version=base, staleness=self.ctx.version - base,
                        delta=torch.as_tensor(delta, dtype=torch.float32), num_samples=num_samples, loss=0.0)
        kind, new, _ = self.apply(algo, update)
        assert kind == "direct"
        return new

    def copy(self) -> "VectorServer":
        """A second server at the same point (the same versions), for a resumed algorithm to continue on."""
        other = VectorServer(self.ctx.cfg)
        other.snapshots.update(self.snapshots)
        other.ctx = replace(other.ctx, version=self.ctx.version, global_model=self.ctx.global_model)
        return other

    def jump_to(self, version: int, x):
        """Pretend the run already reached `version` with model x (to make stale arrivals)."""
        self.snapshots[version] = vec(*x)
        self.ctx = replace(self.ctx, version=version, global_model=self.snapshots[version])


def config(**server) -> Config:
    cfg = Config()
    for key, value in server.items():
        setattr(cfg.server, key, value)
    return cfg


def test_registry():
    for name in ALGORITHMS:   # every name imports, and to the class of that name
        cls = algorithm_class(name)
        assert issubclass(cls, Algorithm) and cls.name == name
    assert algorithm_class("fedavg") is FedAvg and algorithm_class("fedbuff") is FedBuff
    assert algorithm_class("fedasync") is FedAsync and algorithm_class("afl_dw") is AFLDW
    assert FedAvg.synchronous and not FedAsync.synchronous and not FedBuff.synchronous and not AFLDW.synchronous


# --- FedAvg ----------------------------------------------------------------------------------------------------

def test_fedavg_plain_mean_after_k():
    cfg = config(concurrency=3, lr=0.5)
    server = VectorServer(cfg)
    algo = FedAvg(cfg, server.ctx)
    assert server.feed(algo, [3.0, 0.0, -3.0], num_samples=1) is None
    assert server.feed(algo, [0.0, 6.0, 3.0], num_samples=5) is None
    new = server.feed(algo, [3.0, 0.0, 3.0], num_samples=2)
    # mean = [2, 2, 1]; x + 0.5 * mean
    torch.testing.assert_close(new, vec(2.0, 3.0, 3.5))
    assert server.last.weight == 1.0
    # the next round starts from an empty sum
    assert server.feed(algo, [2.0, 2.0, 2.0]) is None
    assert server.feed(algo, [2.0, 2.0, 2.0]) is None
    torch.testing.assert_close(server.feed(algo, [2.0, 2.0, 2.0]), vec(3.0, 4.0, 4.5))


def test_fedavg_sample_weighted():
    cfg = config(concurrency=2, lr=0.5, sample_weighted=True)
    server = VectorServer(cfg)
    algo = FedAvg(cfg, server.ctx)
    assert server.feed(algo, [2.0, 0.0, -2.0], num_samples=1) is None
    new = server.feed(algo, [0.0, 4.0, 2.0], num_samples=3)
    # (1 * [2, 0, -2] + 3 * [0, 4, 2]) / 4 = [0.5, 3, 1]; x + 0.5 * that
    torch.testing.assert_close(new, vec(1.25, 3.5, 3.5))
    assert server.last.weight == 3.0


# --- FedAsync --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("staleness, mixing, tau, weight, expected", [
    # x_t = [1, 2, 3], x_v = [0, 0, 0], Delta = [2, 2, 2] -> client model [2, 2, 2];  x = (1 - a) x_t + a [2, 2, 2]
    ("constant", 0.5, 3, 0.5, (1.5, 2.0, 2.5)),
    ("polynomial", 0.8, 3, 0.4, (1.4, 2.0, 2.6)),    # a = 0.8 * (3 + 1)^-0.5
    ("hinge", 0.6, 2, 0.6, (1.6, 2.0, 2.4)),         # tau <= b = 2: s = 1
    ("hinge", 0.6, 6, 0.2, (1.2, 2.0, 2.8)),         # s = 1 / (0.5 * (6 - 2) + 1) = 1/3
])
def test_fedasync_stale_base(staleness, mixing, tau, weight, expected):
    cfg = config(staleness=staleness, mixing=mixing, staleness_a=0.5, staleness_b=2.0)
    server = VectorServer(cfg, x0=(0.0, 0.0, 0.0))
    server.jump_to(tau, X0)
    algo = FedAsync(cfg, server.ctx)
    new = server.feed(algo, [2.0, 2.0, 2.0], base=0)
    torch.testing.assert_close(new, vec(*expected))
    assert server.last.weight == pytest.approx(weight)


def test_fedasync_uses_the_base_snapshot():
    cfg = config(staleness="constant", mixing=0.5)
    server = VectorServer(cfg, x0=(4.0, 4.0, 4.0))
    server.jump_to(1, (0.0, 0.0, 0.0))
    server.jump_to(2, X0)
    algo = FedAsync(cfg, server.ctx)
    # base 1: client model = [0, 0, 0] + [2, 0, 0]; 0.5 * [1, 2, 3] + 0.5 * [2, 0, 0]
    torch.testing.assert_close(server.feed(algo, [2.0, 0.0, 0.0], base=1), vec(1.5, 1.0, 1.5))


# --- FedBuff ---------------------------------------------------------------------------------------------------

def test_fedbuff_sqrt_discount_b2():
    cfg = config(buffer_size=2, lr=0.5, staleness="sqrt")
    server = VectorServer(cfg)
    server.jump_to(3, X0)
    algo = FedBuff(cfg, server.ctx)
    assert server.feed(algo, [2.0, 4.0, 6.0]) is None            # tau = 0: s = 1
    assert server.last.weight == 1.0
    new = server.feed(algo, [4.0, 0.0, -8.0], base=0)           # tau = 3: s = 1/2
    assert server.last.weight == 0.5
    # ([2, 4, 6] + [2, 0, -4]) / 2 = [2, 2, 1];  x + 0.5 * that
    torch.testing.assert_close(new, vec(2.0, 3.0, 3.5))


def test_fedbuff_server_momentum_two_aggregations():
    cfg = config(buffer_size=2, lr=0.5, momentum=0.5)
    server = VectorServer(cfg)
    algo = FedBuff(cfg, server.ctx)
    server.feed(algo, [2.0, 0.0, 0.0])
    x1 = server.feed(algo, [0.0, 2.0, 0.0])
    # v1 = [1, 1, 0] = m1;  x1 = [1, 2, 3] + 0.5 m1
    torch.testing.assert_close(x1, vec(1.5, 2.5, 3.0))
    server.feed(algo, [0.0, 0.0, 4.0])
    x2 = server.feed(algo, [2.0, 0.0, 0.0])
    # v2 = [1, 0, 2];  m2 = 0.5 m1 + v2 = [1.5, 0.5, 2];  x2 = x1 + 0.5 m2
    torch.testing.assert_close(x2, vec(2.25, 2.75, 4.0))


# --- AFL-DW ----------------------------------------------------------------------------------------------------

def test_cosine_beta_points():
    assert cosine_beta(0, 75.0) == 0.0
    assert cosine_beta(75, 75.0) == pytest.approx(0.5)
    assert cosine_beta(37.5, 75.0) == pytest.approx(0.5 - 0.5 * np.cos(np.pi / 4))
    assert cosine_beta(150, 75.0) == 1.0
    assert cosine_beta(1000, 75.0) == 1.0


@pytest.mark.parametrize("tau, expected", [
    (0, (2.0, 1.0, 4.0)),      # beta = 0: x + 0.5 * [2, -2, 2]
    (75, (1.5, 1.5, 3.5)),     # beta = 1/2
    (150, X0),                 # beta = 1: a very stale update is ignored
    (400, X0),
])
def test_afl_dw_cosine_weight(tau, expected):
    cfg = config(lr=0.5, s_max=75.0, buffer_size=4)  # AFL-DW's buffer is always one, whatever buffer_size says
    server = VectorServer(cfg)
    server.jump_to(tau, X0)
    algo = AFLDW(cfg, server.ctx)
    new = server.feed(algo, [2.0, -2.0, 2.0], base=0)
    torch.testing.assert_close(new, vec(*expected))
    assert server.last.weight == pytest.approx(1.0 - cosine_beta(tau, 75.0))
    assert server.ctx.version == tau + 1


# --- equivalences ----------------------------------------------------------------------------------------------

DELTAS = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))


def test_fedbuff_b1_equals_fedasync_on_fresh_updates():
    """With tau = 0, FedAsync's x + a((x_v + Delta) - x) is x + a Delta: FedBuff with B = 1 and eta = a."""
    buff_cfg = config(buffer_size=1, lr=0.7, staleness="polynomial")
    async_cfg = config(mixing=0.7, staleness="polynomial")
    buff_server, async_server = VectorServer(buff_cfg), VectorServer(async_cfg)
    buff, fedasync = FedBuff(buff_cfg, buff_server.ctx), FedAsync(async_cfg, async_server.ctx)
    for delta in DELTAS:
        a = buff_server.feed(buff, delta)
        b = async_server.feed(fedasync, delta)
        torch.testing.assert_close(a, b)
        assert buff_server.last.weight == 1.0 and async_server.last.weight == pytest.approx(0.7)
    assert buff_server.ctx.version == async_server.ctx.version == len(DELTAS)
    assert not torch.allclose(buff_server.ctx.global_model, vec(*X0))


def test_fedbuff_full_buffer_from_one_version_equals_fedavg():
    k = 3
    buff_cfg = config(buffer_size=k, concurrency=k, lr=1.4, staleness="sqrt")
    avg_cfg = config(concurrency=k, lr=1.4)
    buff_server, avg_server = VectorServer(buff_cfg), VectorServer(avg_cfg)
    buff, fedavg = FedBuff(buff_cfg, buff_server.ctx), FedAvg(avg_cfg, avg_server.ctx)
    for i, delta in enumerate(DELTAS):  # two rounds; within a round every job has the same base, so tau = 0
        a = buff_server.feed(buff, delta)
        b = avg_server.feed(fedavg, delta)
        assert (a is None) == (b is None) == (i % k != k - 1)
        if a is not None:
            assert torch.equal(a, b)
    assert avg_server.ctx.version == 2


# --- state dicts -----------------------------------------------------------------------------------------------

def saved(state: dict) -> dict:
    """What a checkpoint would hold: a serialised copy, independent of the live tensors."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("cls, cfg", [
    (FedBuff, config(buffer_size=3, lr=0.5, momentum=0.9, staleness="sqrt")),
    (FedBuff, config(buffer_size=3, lr=0.5)),
    (FedAvg, config(concurrency=3, lr=0.5, sample_weighted=True)),
])
def test_state_dict_round_trip_mid_buffer(cls, cfg):
    server = VectorServer(cfg)
    algo = cls(cfg, server.ctx)
    for i, delta in enumerate(DELTAS[:4]):   # one aggregation, then one update waiting in the buffer
        server.feed(algo, delta, num_samples=i + 1)
    state = saved(algo.state_dict())
    branch = server.copy()
    resumed = cls(cfg, branch.ctx)
    resumed.load_state_dict(state)
    for i, delta in enumerate(DELTAS[4:]):   # two more fill the buffer: the second aggregation needs the saved state
        a = server.feed(algo, delta, base=0, num_samples=i + 5)
        b = branch.feed(resumed, delta, base=0, num_samples=i + 5)
        assert (a is None) == (b is None) == (i == 0)
    assert torch.equal(server.ctx.global_model, branch.ctx.global_model)
    assert server.ctx.version == branch.ctx.version == 2
