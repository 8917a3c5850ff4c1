"""Client partitions: exact counts, determinism, skew against alpha, error cases."""

import numpy as np
import pytest

from mpi_afl.data.partition import PARTITIONS, class_histograms, partition, summary_lines

NUM_CLASSES = 10


def make_labels(per_class: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(NUM_CLASSES), per_class))


@pytest.mark.parametrize("scheme", sorted(PARTITIONS))
def test_every_index_used_exactly_once(scheme):
    labels = make_labels()
    parts = partition(labels, 20, scheme, seed=1, num_classes=NUM_CLASSES)
    assert len(parts) == 20
    assert all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert class_histograms(parts, labels, NUM_CLASSES).sum() == len(labels)


def test_iid_sizes_differ_by_at_most_one():
    parts = partition(make_labels()[:1999], 7, "iid", seed=3, num_classes=NUM_CLASSES)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) == 1 and sum(sizes) == 1999


def test_shards_give_few_classes_per_client():
    labels = make_labels()  # 2000 samples, 40 shards of 50: each shard holds one or two labels
    parts = partition(labels, 20, "shards", seed=0, num_classes=NUM_CLASSES, shards_per_client=2)
    classes_per_client = (class_histograms(parts, labels, NUM_CLASSES) > 0).sum(axis=1)
    assert [len(p) for p in parts] == [100] * 20
    assert classes_per_client.max() <= 4


def test_fixed_samples_per_client_exact_and_overlapping():
    labels = make_labels(per_class=100)  # 1000 samples, but 30 clients x 350 = 10500 draws
    parts = partition(labels, 30, "dirichlet", seed=5, num_classes=NUM_CLASSES, samples_per_client=350)
    assert [len(p) for p in parts] == [350] * 30
    # No duplicates inside a client unless one class is asked for more than it holds (100).
    hist = class_histograms(parts, labels, NUM_CLASSES)
    for p, h in zip(parts, hist):
        if h.max() <= 100:
            assert len(np.unique(p)) == 350
    assert len(np.concatenate(parts)) > len(np.unique(np.concatenate(parts)))  # clients overlap


def test_fixed_samples_spread_over_the_pool_before_reuse():
    labels = make_labels(per_class=1000)  # 10000 samples, 20 x 350 = 7000 draws
    parts = partition(labels, 20, "dirichlet", seed=2, num_classes=NUM_CLASSES, samples_per_client=350,
                      alpha=100.0)
    # With an almost uniform mix no class pool runs out (700 of 1000 drawn): no overlap at all.
    assert len(np.unique(np.concatenate(parts))) == 7000


@pytest.mark.parametrize("kwargs", [{"scheme": "dirichlet"}, {"scheme": "iid"}, {"scheme": "shards"},
                                    {"scheme": "dirichlet", "samples_per_client": 50}])
def test_deterministic_from_seed(kwargs):
    labels = make_labels()
    a = partition(labels, 10, seed=11, num_classes=NUM_CLASSES, **kwargs)
    b = partition(labels, 10, seed=11, num_classes=NUM_CLASSES, **kwargs)
    c = partition(labels, 10, seed=12, num_classes=NUM_CLASSES, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def mean_max_class_share(parts, labels):
    hist = class_histograms(parts, labels, NUM_CLASSES)
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


@pytest.mark.parametrize("samples_per_client", [0, 100])
def test_skew_grows_as_alpha_falls(samples_per_client):
    labels = make_labels()
    skew = [mean_max_class_share(partition(labels, 20, "dirichlet", seed=4, num_classes=NUM_CLASSES,
                                           alpha=alpha, samples_per_client=samples_per_client), labels)
            for alpha in (100.0, 1.0, 0.1)]
    assert skew[0] < skew[1] < skew[2]
    assert skew[0] < 0.25 and skew[2] > 0.6


def test_min_samples_respected_and_infeasible_is_an_error():
    labels = make_labels(per_class=20)  # 200 samples
    parts = partition(labels, 10, "dirichlet", seed=0, num_classes=NUM_CLASSES, alpha=0.3, min_samples=5)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ValueError, match="min_samples=19"):
        partition(labels, 10, "dirichlet", seed=0, num_classes=NUM_CLASSES, alpha=0.05, min_samples=19)


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "bogus"}, "unknown partition scheme 'bogus'.*dirichlet.*iid.*shards"),
    ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0, got 0.0"),
    ({"scheme": "dirichlet", "alpha": -1.0}, "alpha must be > 0"),
    ({"scheme": "iid", "num_clients": 0}, "num_clients must be >= 1, got 0"),
    ({"scheme": "iid", "num_clients": 101}, "num_clients=101 is more than the 100 samples"),
    ({"scheme": "iid", "samples_per_client": 350}, "needs scheme 'dirichlet'"),
    ({"scheme": "shards", "shards_per_client": 11}, "110 shards but only 100 samples"),
    ({"scheme": "dirichlet", "num_classes": 5}, r"labels must lie in \[0, num_classes=5\)"),
])
def test_errors(kwargs, message):
    args = {"num_clients": 10, "seed": 0, "num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ValueError, match=message):
        partition(make_labels(per_class=10), **args)


def test_class_histograms_and_summary_lines():
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1, 3]), np.array([2, 4, 5])]
    assert class_histograms(parts, labels, 3).tolist() == [[2, 0, 1], [0, 1, 2]]
    assert class_histograms(parts, labels, 3).dtype == np.int64
    assert summary_lines(parts, labels, 3) == ["client 0: 3 samples, classes [0:2 2:1]",
                                               "client 1: 3 samples, classes [1:1 2:2]"]
