"""Snapshots of global model versions still referenced by jobs in flight.

A job trained from version v needs x_v on the server until its result is
processed (FedAsync and FedRevive rebuild the client model as x_v + Delta, and
a job not yet sent needs x_v as its payload). A snapshot is freed as soon as
no job references it and it is not the current version, so memory stays at
most (distinct base versions in flight + 1) models.
"""

from collections import Counter

import torch


class VersionStore:
    def __init__(self):
        self.models: dict[int, torch.Tensor] = {}
        self.refs: Counter = Counter()
        self.current = -1

    def put(self, version: int, model: torch.Tensor) -> None:
        """Record a new current version (the previous one may be freed)."""
        old = self.current
        self.models[version] = model
        self.current = version
        self._maybe_free(old)

    def get(self, version: int) -> torch.Tensor:
        try:
            return self.models[version]
        except KeyError:
            raise KeyError(f"version {version} is not kept (kept: {sorted(self.models)})") from None

    def acquire(self, version: int) -> None:
        if version not in self.models:
            raise KeyError(f"cannot reference version {version}: not kept")
        self.refs[version] += 1

    def release(self, version: int) -> None:
        self.refs[version] -= 1
        if self.refs[version] <= 0:
            del self.refs[version]
            self._maybe_free(version)

    def _maybe_free(self, version: int) -> None:
        if version != self.current and self.refs.get(version, 0) == 0:
            self.models.pop(version, None)

    def restore(self, models: dict[int, torch.Tensor], current: int) -> None:
        """Replace every snapshot by `models` of a checkpoint, `current` the current version; references
        are taken again by the jobs restored afterwards."""
        self.models, self.refs, self.current = models, Counter(), current

    def collect(self) -> None:
        """Free every snapshot nothing references (after a restore re-acquired what jobs need)."""
        for version in list(self.models):
            self._maybe_free(version)
