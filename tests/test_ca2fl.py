"""CA2FL (docs/algorithms.md §2) on hand-computed 3-element vectors."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mpi_afl.algorithms import ca2fl
from mpi_afl.algorithms.base import ServerContext, Update
from mpi_afl.algorithms.ca2fl import CA2FL, CachedAggregator
from mpi_afl.config import Config

torch.set_num_threads(1)


def make(num_clients=3, buffer_size=2, lr=0.5, x0=(1.0, 2.0, 3.0), out="/nonexistent-run-dir"):
    cfg = Config()
    cfg.data.num_clients = num_clients
    cfg.server.buffer_size = buffer_size
    cfg.server.lr = lr
    cfg.run.out = out
    x = torch.tensor(x0)
    ctx = ServerContext(cfg=cfg, device=torch.device("cpu"), global_model=x, version=0,
                        snapshot=lambda v: x, make_model=lambda: nn.Linear(1, 1),
                        param_mask=torch.ones(3, dtype=torch.bool), num_classes=2, image_shape=(1, 1, 1),
                        data_mean=(0.0,), data_std=(1.0,), client_histograms=np.ones((num_clients, 2)))
    return CA2FL(cfg, ctx), SimpleNamespace(ctx=ctx, last=None)   # the server's side: its context, the last Outcome


def upd(client, delta):
    return Update(client_id=client, job_index=0, base_version=0, staleness=0,
                  delta=torch.tensor(delta, dtype=torch.float32), num_samples=1, loss=0.0)


def step(algo, server, client, delta):
    """Feed one update; adopt the new global model as the server would."""
    server.last = algo.on_update(upd(client, delta), server.ctx)
    new = server.last.model
    if new is not None:
        server.ctx = replace(server.ctx, global_model=new, version=server.ctx.version + 1)
    return new


def test_buffer_one_with_empty_cache_is_plain_step():
    algo, ctx = make(buffer_size=1, lr=0.5)
    new = step(algo, ctx, 1, [2.0, -4.0, 6.0])
    # h = 0, h̄ = 0: x + eta * Delta
    torch.testing.assert_close(new, torch.tensor([2.0, 0.0, 6.0]))
    assert ctx.last.weight == 0.5


def test_two_buffers_hand_computed():
    algo, ctx = make(buffer_size=2, lr=0.5)
    assert step(algo, ctx, 0, [1.0, 0.0, 0.0]) is None
    assert ctx.last.weight == 0.25  # eta / M
    x1 = step(algo, ctx, 1, [0.0, 2.0, 0.0])
    # v = 0 + ([1,0,0] + [0,2,0]) / 2 = [0.5, 1, 0]
    torch.testing.assert_close(x1, torch.tensor([1.25, 2.5, 3.0]))
    # cache h0 = [1,0,0], h1 = [0,2,0], h2 = 0 -> h̄ = [1/3, 2/3, 0]
    assert step(algo, ctx, 0, [3.0, 0.0, 3.0]) is None
    x2 = step(algo, ctx, 2, [0.0, 0.0, 6.0])
    # corrections [2,0,3] + [0,0,6]; v = h̄ + [1, 0, 4.5] = [4/3, 2/3, 4.5]
    torch.testing.assert_close(x2, torch.tensor([1.25 + 2 / 3, 2.5 + 1 / 3, 3.0 + 2.25]))
    cache = algo.aggregator.cache
    torch.testing.assert_close(cache.rows, torch.tensor([[3.0, 0, 3], [0, 2, 0], [0, 0, 6]]))
    torch.testing.assert_close(cache.mean(), torch.tensor([1.0, 2 / 3, 3.0], dtype=torch.float64))


def test_client_twice_in_one_buffer_telescopes():
    agg = CachedAggregator(num_clients=3, dim=3, buffer_size=2)
    agg.cache.replace(0, torch.tensor([1.0, 1.0, 1.0]))
    mean_before = agg.cache.mean().clone()
    assert agg.add(0, torch.tensor([2.0, 0.0, 0.0])) is None
    v = agg.add(0, torch.tensor([5.0, 0.0, 4.0]))
    # (Delta' - h0) + (Delta'' - Delta') = Delta'' - h0 = [4, -1, 3]; v = h̄_t + that / 2
    torch.testing.assert_close(v, (mean_before + torch.tensor([4.0, -1.0, 3.0], dtype=torch.float64) / 2).float())
    torch.testing.assert_close(agg.cache.rows[0], torch.tensor([5.0, 0.0, 4.0]))  # latest update stays cached
    # sum of corrections = N (h̄_{t+1} - h̄_t)
    torch.testing.assert_close((v.double() - mean_before) * 2, 3 * (agg.cache.mean() - mean_before))


def test_running_sum_matches_cache():
    gen = torch.Generator().manual_seed(0)
    agg = CachedAggregator(num_clients=5, dim=7, buffer_size=3)
    for i in range(200):
        agg.add(int(torch.randint(0, 5, (1,), generator=gen)), torch.randn(7, generator=gen) * 100)
    torch.testing.assert_close(agg.cache.total, agg.cache.rows.double().sum(0), rtol=0, atol=1e-9)


def test_bad_client_or_size_is_an_error():
    agg = CachedAggregator(num_clients=3, dim=3, buffer_size=1)
    with pytest.raises(ValueError, match="client_id 3"):
        agg.add(3, torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        agg.add(0, torch.zeros(4))


def _checkpoint(state):
    """What a checkpoint does: copy everything out (the cache is a live view)."""
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}


def test_state_dict_round_trip_mid_buffer():
    a, ctx_a = make(buffer_size=3)
    for client, d in [(0, [1.0, 2, 3]), (1, [0.5, 0, -1]), (2, [4.0, 4, 4]), (0, [-1.0, 0, 1])]:
        step(a, ctx_a, client, d)
    assert a.aggregator.count == 1  # mid-buffer
    saved = _checkpoint(a.state_dict())
    b, ctx_b = make(buffer_size=3)
    b.load_state_dict(saved)
    ctx_b.ctx = replace(ctx_b.ctx, global_model=ctx_a.ctx.global_model.clone())
    for client, d in [(1, [2.0, 0, 0]), (2, [0.0, 3, 1])]:
        ra, rb = step(a, ctx_a, client, d), step(b, ctx_b, client, d)
    assert ra is not None
    assert torch.equal(ra, rb)
    assert torch.equal(a.aggregator.cache.total, b.aggregator.cache.total)


def test_memmap_cache_matches_host_cache(monkeypatch, tmp_path):
    ram, ctx_ram = make(buffer_size=2)
    monkeypatch.setattr(ca2fl, "MEMMAP_THRESHOLD_BYTES", 8)  # 3 x 3 x 4 bytes > 8
    mm, ctx_mm = make(buffer_size=2, out=str(tmp_path))
    assert mm.aggregator.cache.memmapped and not ram.aggregator.cache.memmapped
    updates = [(0, [1.0, 0, 0]), (1, [0.0, 2, 0]), (0, [3.0, 0, 3]), (2, [0.0, 0, 6]), (1, [1.0, 1, 1])]
    for client, d in updates:
        r1, r2 = step(ram, ctx_ram, client, d), step(mm, ctx_mm, client, d)
        assert (r1 is None) == (r2 is None)
        if r1 is not None:
            assert torch.equal(r1, r2)
    # a RAM checkpoint restores into a fresh memmapped cache, and the memmap state saves as a tensor
    fresh, _ = make(buffer_size=2, out=str(tmp_path))
    fresh.load_state_dict(_checkpoint(ram.state_dict()))
    assert fresh.aggregator.cache.memmapped
    assert np.array_equal(np.asarray(fresh.aggregator.cache.array), ram.aggregator.cache.rows.numpy())
    saved = mm.state_dict()["cache_rows"]
    assert torch.is_tensor(saved) and torch.equal(saved, ram.aggregator.cache.rows)


def test_memmap_cache_survives_an_hdf5_checkpoint(monkeypatch, tmp_path):
    from mpi_afl.storage.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setattr(ca2fl, "MEMMAP_THRESHOLD_BYTES", 8)
    a, ctx_a = make(buffer_size=2, out=str(tmp_path))
    for client, d in [(0, [1.0, 0, 0]), (1, [0.0, 2, 0]), (2, [0.5, 0.5, 0.5])]:
        step(a, ctx_a, client, d)
    save_checkpoint(tmp_path / "ckpt.h5", {"algorithm": a.state_dict()})
    x1 = ctx_a.ctx.global_model
    new_a = step(a, ctx_a, 1, [9.0, 9, 9])  # the saved file must not follow the live cache
    b, ctx_b = make(buffer_size=2, out=str(tmp_path))
    b.load_state_dict(load_checkpoint(tmp_path / "ckpt.h5")["algorithm"])
    assert b.aggregator.cache.memmapped and b.aggregator.count == 1
    ctx_b.ctx = replace(ctx_b.ctx, global_model=x1)
    new_b = step(b, ctx_b, 1, [9.0, 9, 9])
    assert torch.equal(new_a, new_b)
    # h̄_t = ([1,0,0] + [0,2,0]) / 3; corrections [0.5,0.5,0.5] (client 2) and [9,7,9] (client 1)
    v = torch.tensor([1.0, 2.0, 0.0]) / 3 + torch.tensor([9.5, 7.5, 9.5]) / 2
    torch.testing.assert_close(new_b, x1 + 0.5 * v)
