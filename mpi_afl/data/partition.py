"""Split a training set over the logical clients (docs/design.md "Data", docs/algorithms.md §3.5).

A partition is a list of index arrays into the training labels, one per client (sorted int64).
Every rank computes it from the same seed, so no index lists travel over MPI.

Schemes (plain dict registry ``PARTITIONS``):

- ``dirichlet``: for each class, the class's samples are split over the clients with proportions
  ~ Dirichlet(alpha * 1_N) (Hsu et al. 2019; Yurochkin et al. 2019). Small alpha gives few
  classes per client. Every sample goes to exactly one client.
- ``dirichlet`` with ``samples_per_client > 0``: the FedRevive protocol (§3.5: N = 1000 clients,
  350 samples each, alpha = 0.5, "shards may overlap"): each client draws its own class mix
  p ~ Dirichlet(alpha * 1_C) and takes round(p * samples_per_client) samples per class.
- ``iid``: a shuffled equal split (sizes differ by at most one).
- ``shards``: the FedAvg paper's pathological split: sort by label, cut
  ``num_clients * shards_per_client`` shards, deal them out at random.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Redraws of the per-class Dirichlet split before giving up on min_samples: with the
# defaults a redraw is rarely needed, so hitting this bound means the request is infeasible
# in practice (too many clients or too small alpha for the data), not bad luck.
_MAX_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class PartitionOptions:
    """Scheme parameters; each scheme reads the ones it documents."""

    num_classes: int
    alpha: float
    shards_per_client: int
    samples_per_client: int
    min_samples: int


def _dirichlet(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
               opts: PartitionOptions) -> list[list[np.ndarray]]:
    if opts.samples_per_client > 0:
        return _dirichlet_fixed_size(labels, num_clients, rng, opts)
    by_class = [np.flatnonzero(labels == c) for c in range(opts.num_classes)]
    for _ in range(_MAX_DIRICHLET_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(num_clients, opts.alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                chunks[client].append(chunk)
        sizes = [sum(len(c) for c in client) for client in chunks]
        if min(sizes) >= opts.min_samples:
            return chunks
    raise ValueError(
        f"dirichlet partition: no draw in {_MAX_DIRICHLET_TRIES} tries gave every one of "
        f"{num_clients} clients >= min_samples={opts.min_samples} of {len(labels)} samples "
        f"(alpha={opts.alpha}); use fewer clients, a larger alpha or a smaller min_samples")


class _ClassPool:
    """One class's indices handed out in a shuffled cycle.

    Like the FedRevive reference (``split_dirichlet``), a request that the rest of the cycle
    cannot serve starts a fresh shuffle, so one client never gets an index twice unless it asks
    for more than the class holds, while different clients overlap only once a class runs out.
    """

    def __init__(self, indices: np.ndarray, rng: np.random.Generator):
        self.rng = rng
        self.order = rng.permutation(indices)
        self.cursor = 0

    def take(self, n: int) -> np.ndarray:
        size = len(self.order)
        whole, n = divmod(n, size)  # asking for more than the class holds: every index, repeated
        taken = [self.order.copy() for _ in range(whole)]
        if self.cursor + n > size:
            self.order = self.rng.permutation(self.order)
            self.cursor = 0
        taken.append(self.order[self.cursor:self.cursor + n])
        self.cursor += n
        return np.concatenate(taken)


def _apportion(share: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, closest to ``share * total`` (largest remainder)."""
    exact = share * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(counts - exact, kind="stable")[:short]] += 1
    return counts


def _dirichlet_fixed_size(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
                          opts: PartitionOptions) -> list[list[np.ndarray]]:
    # Classes absent from this training set cannot be drawn; the mix is over the present ones.
    present = [c for c in range(opts.num_classes) if np.any(labels == c)]
    pools = [_ClassPool(np.flatnonzero(labels == c), rng) for c in present]
    chunks = []
    for _ in range(num_clients):
        mix = rng.dirichlet(np.full(len(present), opts.alpha))
        counts = _apportion(mix, opts.samples_per_client)
        chunks.append([pool.take(int(n)) for pool, n in zip(pools, counts) if n > 0])
    return chunks


def _iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
         opts: PartitionOptions) -> list[list[np.ndarray]]:
    return [[part] for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def _shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
            opts: PartitionOptions) -> list[list[np.ndarray]]:
    num_shards = num_clients * opts.shards_per_client
    if num_shards > len(labels):
        raise ValueError(f"shards partition: num_clients * shards_per_client = {num_shards} shards "
                         f"but only {len(labels)} samples")
    # Shuffle first so that the order inside a class (hence which samples share a shard) is random.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, opts.shards_per_client)
    return [[shards[s] for s in row] for row in deal]


PartitionFn = Callable[[np.ndarray, int, np.random.Generator, PartitionOptions], list[list[np.ndarray]]]

PARTITIONS: dict[str, PartitionFn] = {
    "dirichlet": _dirichlet,
    "iid": _iid,
    "shards": _shards,
}


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, seed: int, num_classes: int,
              alpha: float = 0.5, shards_per_client: int = 2, samples_per_client: int = 0,
              min_samples: int = 1) -> list[np.ndarray]:
    """Return one sorted int64 index array into ``labels`` per client, deterministic from ``seed``.

    Without ``samples_per_client`` every index is used exactly once; with it (dirichlet only)
    every client gets exactly ``samples_per_client`` indices and clients may share indices.
    ``min_samples`` is the least a client may get from the plain dirichlet split.
    """
    labels = np.asarray(labels)
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {sorted(PARTITIONS)}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise ValueError(f"num_clients={num_clients} is more than the {len(labels)} samples to split")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), "
                         f"got range [{labels.min()}, {labels.max()}]")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    if samples_per_client < 0:
        raise ValueError(f"samples_per_client must be >= 0, got {samples_per_client}")
    if samples_per_client > 0 and scheme != "dirichlet":
        raise ValueError(f"samples_per_client={samples_per_client} needs scheme 'dirichlet', got {scheme!r}")
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    if scheme == "dirichlet" and samples_per_client == 0 and min_samples * num_clients > len(labels):
        raise ValueError(f"min_samples={min_samples} for {num_clients} clients needs "
                         f"{min_samples * num_clients} samples, only {len(labels)} exist")
    opts = PartitionOptions(num_classes=num_classes, alpha=alpha, shards_per_client=shards_per_client,
                            samples_per_client=samples_per_client, min_samples=min_samples)
    rng = np.random.default_rng(seed)
    chunks = PARTITIONS[scheme](labels, num_clients, rng, opts)
    return [np.sort(np.concatenate(c)).astype(np.int64) for c in chunks]


def class_histograms(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_clients, num_classes) int64 sample counts per client and class."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


def summary_lines(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> list[str]:
    """One line per client for the run log: size and ``class:count`` for the classes it holds."""
    lines = []
    for client, hist in enumerate(class_histograms(parts, labels, num_classes)):
        held = " ".join(f"{c}:{n}" for c, n in enumerate(hist) if n > 0)
        lines.append(f"client {client}: {int(hist.sum())} samples, classes [{held}]")
    return lines
