"""Delay models (docs/algorithms.md §3.5): per-client means from the mixture, fixed for the run; a job's times
depend only on (seed, client, job); every shape keeps its configured mean; the named and custom schedules."""

import numpy as np
import pytest

from mpi_afl.config.schema import DelayConfig
from mpi_afl.delays import SCHEDULES, DelayModel, Schedule, mean_job_time, sample_train_time, schedule_from


def test_client_means_follow_the_mixture():
    model = DelayModel(DelayConfig(), num_clients=4000, seed=0)
    values, counts = np.unique(model.train_mean, return_counts=True)
    assert values.tolist() == [1.0, 1.3, 1.6]
    # binomial standard error ~0.007 at 4000 clients: 0.03 is over 4 sigma
    np.testing.assert_allclose(counts / 4000, [0.25, 0.5, 0.25], atol=0.03)
    values, counts = np.unique(model.upload_mean, return_counts=True)
    assert values.tolist() == [0.15, 0.25]
    np.testing.assert_allclose(counts / 4000, [0.5, 0.5], atol=0.03)


def test_client_means_fixed_for_the_run():
    a = DelayModel(DelayConfig(), num_clients=50, seed=3)
    means = (a.train_mean.copy(), a.upload_mean.copy())
    for job in range(20):
        a.job(job % 50, job)
    np.testing.assert_array_equal(a.train_mean, means[0])   # sampling jobs does not redraw them
    np.testing.assert_array_equal(a.upload_mean, means[1])
    b = DelayModel(DelayConfig(), num_clients=50, seed=3)
    np.testing.assert_array_equal(b.train_mean, means[0])   # the same seed gives the same clients
    c = DelayModel(DelayConfig(), num_clients=50, seed=4)
    assert not np.array_equal(c.train_mean, means[0])


def test_job_depends_only_on_seed_client_job():
    pairs = [(client, job) for client in range(5) for job in range(4)]
    forward = DelayModel(DelayConfig(), num_clients=5, seed=11)
    backward = DelayModel(DelayConfig(), num_clients=5, seed=11)
    first = {p: forward.job(*p) for p in pairs}
    second = {p: backward.job(*p) for p in reversed(pairs)}
    assert first == second
    assert all(forward.job(*p) == first[p] for p in pairs)  # asking again gives the same value
    assert len({t.train for t in first.values()}) == len(pairs)  # each (client, job) has its own draw
    other_seed = DelayModel(DelayConfig(), num_clients=5, seed=12)
    assert other_seed.job(0, 0) != first[(0, 0)]


@pytest.mark.parametrize("shape", ["exponential", "constant", "uniform", "halfnormal", "pareto"])
def test_every_shape_has_the_configured_mean(shape):
    rng = np.random.default_rng(0)
    mean = 1.3
    samples = np.array([sample_train_time(shape, mean, rng, 2.5) for _ in range(40000)])
    # standard errors are <= 0.007 here (Pareto 2.5 has finite variance): 3% is over 5 sigma
    assert samples.mean() == pytest.approx(mean, rel=0.03)
    assert samples.min() >= 0.0


def test_shape_supports():
    rng = np.random.default_rng(1)
    draw = {shape: np.array([sample_train_time(shape, 2.0, rng, 3.0) for _ in range(5000)])
            for shape in ["constant", "uniform", "pareto", "exponential"]}
    assert np.all(draw["constant"] == 2.0)
    assert draw["uniform"].max() <= 4.0
    assert draw["pareto"].min() >= 2.0 * 2.0 / 3.0     # x_m = mean (a - 1) / a
    assert draw["exponential"].std() == pytest.approx(2.0, rel=0.1)   # an exponential's std is its mean


def test_unknown_shape():
    with pytest.raises(ValueError, match="'lognormal'.*exponential, constant, uniform, halfnormal, pareto"):
        sample_train_time("lognormal", 1.0, np.random.default_rng(0), 2.5)


def test_paper_schedule_values():
    model = DelayModel(DelayConfig(schedule="paper"), num_clients=200, seed=0)
    for client in range(200):
        times = model.job(client, 0)
        m = model.upload_mean[client]
        assert times.download == 0.1
        assert m - 0.02 <= times.upload <= m + 0.02
        assert times.total == pytest.approx(times.download + times.train + times.upload)


def test_shifted_schedule_values():
    assert SCHEDULES["shifted"] == Schedule("exponential", (0.1,), (1.0,), 0.02, (0.05, 0.10), 0.01)
    model = DelayModel(DelayConfig(schedule="shifted"), num_clients=400, seed=2)
    assert np.all(model.train_mean == 0.1)
    assert set(model.upload_mean.tolist()) == {0.05, 0.10}
    trains = []
    for client in range(400):
        times = model.job(client, 1)
        m = model.upload_mean[client]
        assert times.download == 0.02
        assert m - 0.01 <= times.upload <= m + 0.01
        trains.append(times.train)
    assert np.mean(trains) == pytest.approx(0.1, rel=0.2)  # 400 exponential draws: standard error 5%


def test_none_schedule_is_one_unit_per_job():
    model = DelayModel(DelayConfig(schedule="none"), num_clients=3, seed=0)
    assert all(model.job(c, j).total == 1.0 for c in range(3) for j in range(3))


def test_custom_schedule_from_config():
    cfg = DelayConfig(schedule="custom", train_shape="constant", train_means=[2.0, 5.0], train_probs=[0.2, 0.8],
                      download=0.3, upload_means=[0.5], upload_spread=0.0, pareto_shape=3.0)
    assert schedule_from(cfg) == Schedule("constant", (2.0, 5.0), (0.2, 0.8), 0.3, (0.5,), 0.0, 3.0)
    model = DelayModel(cfg, num_clients=2000, seed=5)
    assert set(model.train_mean.tolist()) == {2.0, 5.0}
    assert np.mean(model.train_mean == 5.0) == pytest.approx(0.8, abs=0.04)
    for client in range(20):
        times = model.job(client, 7)
        assert times.train == model.train_mean[client]   # constant shape: exactly the client's mean
        assert (times.download, times.upload) == (0.3, 0.5)


def test_named_schedules_ignore_custom_fields():
    cfg = DelayConfig(schedule="paper", train_means=[9.0], train_probs=[1.0], download=7.0)
    assert schedule_from(cfg) == SCHEDULES["paper"]
    assert SCHEDULES["paper"] == Schedule("exponential", (1.0, 1.3, 1.6), (0.25, 0.5, 0.25), 0.1, (0.15, 0.25), 0.02)


def test_high_schedule_gives_the_virtual_times_of_its_custom_form():
    """`delays.schedule = "high"` is the custom Pareto schedule the FedRevive and FedEcho experiments ran with
    (`--delays.schedule=custom --delays.train_shape=pareto --delays.train_means=1,2,6 --delays.train_probs=0.5,0.3,0.2
    --delays.pareto_shape=1.5`, the other fields at their defaults): the same clients and the same job times."""
    custom = DelayConfig(schedule="custom", train_shape="pareto", train_means=[1.0, 2.0, 6.0],
                         train_probs=[0.5, 0.3, 0.2], pareto_shape=1.5)
    assert schedule_from(DelayConfig(schedule="high")) == schedule_from(custom)
    named, spelled = DelayModel(DelayConfig(schedule="high"), 100, seed=3), DelayModel(custom, 100, seed=3)
    np.testing.assert_array_equal(named.train_mean, spelled.train_mean)
    np.testing.assert_array_equal(named.upload_mean, spelled.upload_mean)
    assert [named.job(c, j) for c in range(100) for j in range(5)] == \
           [spelled.job(c, j) for c in range(100) for j in range(5)]


def test_mean_job_time_of_the_named_schedules():
    assert mean_job_time(SCHEDULES["paper"]) == pytest.approx(1.6)
    assert mean_job_time(SCHEDULES["high"]) == pytest.approx(2.6)   # 32.5 units = the paper's 20 in updates
