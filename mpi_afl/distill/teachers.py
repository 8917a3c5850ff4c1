"""The teacher buffer of the distillation algorithms: recent client models and their class proportions.

FedRevive (docs/algorithms.md §3.1 step 2) pushes every reconstructed client model
w_i = x_v + Δ_i to the front of a buffer of the c most recent client models,
the same client possibly several times. FedEcho (§4 step 2) keeps the latest
model of each of the C most recently heard-from *distinct* clients, with the
base version v_k of each model for its staleness τ_k = t − v_k. Both steer
their synthesis and KD draws by the teachers' class proportions q_k (§3.3):
the Gaussian-probe proxy, fed the first two uploads of every client; as
ablations, the true label histograms (the research code) or uniform
proportions (no estimate at all).

With a distillation group (distill/group.py, `distill.ranks` > 0) every teacher
has an owner, the group rank that evaluates it: each push goes to the rank
that owns the fewest teachers (the lowest such rank), so the shares differ by
at most one. Rank 0 keeps every model (it reconstructs them, feeds the proxy
and checkpoints the buffer); a member keeps only its own, which reach it with
the first call after they enter (`new_models_for`), and takes the rest of the
buffer (order, clients, versions, q_k) from each call's `view()` (`adopt`).
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mpi_afl.models.flat import flat_size, load_flat

from .ensemble import TeacherEnsemble
from .group import Solo
from .proxy import ProbeProxy, histogram_proportions


class TeacherBuffer:
    """The `capacity` most recent client models (flat vectors), most recent first.

    `distinct=True` keeps one model per client (FedEcho): a client already in
    the buffer moves to the front with its new model. `proportions` is where
    q_k comes from: "probe" feeds every pushed model to the probe proxy
    (which keeps only a client's first two) and takes q_k from it,
    "histogram" takes the client's true label histogram, "uniform" gives
    every class the same share. `generator` (CPU) draws the probe inputs; it
    belongs to the caller, which saves its state."""

    def __init__(self, capacity: int, make_model: Callable[[], nn.Module], device: torch.device, histograms: np.ndarray,
                 proxy: ProbeProxy, *, proportions: str, distinct: bool, generator: torch.Generator, group=None):
        if capacity < 1:
            raise ValueError(f"teacher buffer capacity must be >= 1, got {capacity}")
        if proportions not in ("probe", "histogram", "uniform"):
            raise ValueError(f"unknown class proportions {proportions!r}; allowed: probe, histogram, uniform")
        self.capacity, self.distinct, self.source = capacity, distinct, proportions
        self.device = torch.device(device)
        self.proxy = proxy
        self.clients: list[int] = []
        self.versions: list[int] = []             # base version v_k of each model
        self.models: list[torch.Tensor | None] = []   # a member: None where another rank owns the teacher
        self.group = Solo() if group is None else group
        self.owners: list[int] = []               # group rank that evaluates each teacher
        self.serials: list[int] = []              # push count at which each teacher entered (its identity)
        self.next_serial = 0
        self.delivered: set[int] = set()          # rank 0: serials whose owner already has the model
        self._given_q: torch.Tensor | None = None  # a member: q_k from the last view
        self._histograms = histograms
        self._generator = generator
        self._make_model = make_model
        self._scratch: nn.Module | None = None    # the probe proxy's module, made on first use
        self._ensemble = TeacherEnsemble(make_model())
        self._stacked: torch.Tensor | None = None  # the models stacked for the ensemble, None = stale

    def __len__(self) -> int:
        return len(self.models)

    def push(self, client_id: int, version: int, model: torch.Tensor) -> None:
        """Make `model`, the client's upload based on `version`, the most recent teacher; drop the oldest."""
        lists = (self.clients, self.versions, self.models, self.owners, self.serials)
        if self.distinct and client_id in self.clients:
            i = self.clients.index(client_id)
            for entries in lists:
                del entries[i]
        if len(self.clients) == self.capacity:
            for entries in lists:
                del entries[-1]
        load = [self.owners.count(r) for r in range(self.group.size)]
        for entries, value in zip(lists, (client_id, version, model, load.index(min(load)), self.next_serial)):
            entries.insert(0, value)
        self.next_serial += 1
        self._stacked = None
        if self.source == "probe":
            if self._scratch is None:
                self._scratch = self._make_model()
            load_flat(self._scratch, model)
            self.proxy.observe(client_id, self._scratch, self._generator)

    def ensemble(self) -> TeacherEnsemble:
        """This rank's buffered client models as one batched model, most recent first (restacked only after a
        change); with one rank, every teacher."""
        owned = [i for i, owner in enumerate(self.owners) if owner == self.group.rank]
        if self._stacked is None:
            self._stacked = (torch.stack([self.models[i] for i in owned]) if owned
                             else torch.zeros(0, flat_size(self._ensemble.template), device=self.device))
        return self._ensemble.load(self._stacked, owned, len(self.models), self.group)

    # -- a distillation group ---------------------------------------------------

    def view(self) -> dict:
        """What a member needs of the buffer for one call (all but the models): rank 0 sends it."""
        return {"clients": list(self.clients), "versions": list(self.versions), "owners": list(self.owners),
                "serials": list(self.serials), "proportions": self.proportions().cpu().numpy()}

    def new_models_for(self, member: int) -> dict[int, np.ndarray]:
        """Rank 0: the models `member` owns and does not have yet, by serial (then counted as delivered)."""
        new = {}
        for serial, owner, model in zip(self.serials, self.owners, self.models):
            if owner == member and serial not in self.delivered:
                new[serial] = model.cpu().numpy()
                self.delivered.add(serial)
        self.delivered &= set(self.serials)
        return new

    def adopt(self, view: dict, models: dict[int, np.ndarray]) -> None:
        """A member: take the buffer of rank 0's `view`, keeping the models it owns (already held or in `models`)."""
        held = {s: m for s, m in zip(self.serials, self.models) if m is not None}
        held.update({s: torch.from_numpy(m).to(self.device) for s, m in models.items()})
        self.clients, self.versions = view["clients"], view["versions"]
        self.owners, self.serials = view["owners"], view["serials"]
        self.models = [held[s] if o == self.group.rank else None for s, o in zip(self.serials, self.owners)]
        self._given_q = torch.from_numpy(view["proportions"]).to(self.device)
        self._stacked = None

    def proportions(self) -> torch.Tensor:
        """q_k of every buffered teacher, (teachers, classes), on the buffer's device."""
        if self._given_q is not None:
            return self._given_q
        if self.source == "probe":
            return torch.stack([self.proxy.proportions(c).to(self.device) for c in self.clients])
        if self.source == "uniform":
            return torch.full((len(self.clients), self.proxy.num_classes), 1.0 / self.proxy.num_classes,
                              device=self.device)
        return torch.stack([histogram_proportions(self._histograms[c]).to(self.device) for c in self.clients])

    def state_dict(self) -> dict:
        """The buffer and the proxy's estimates (the generator is the caller's to save)."""
        models = (torch.stack(self.models) if self.models  # stack copies
                  else torch.zeros(0, flat_size(self._ensemble.template)))
        return {"teacher_clients": torch.tensor(self.clients, dtype=torch.int64),
                "teacher_versions": torch.tensor(self.versions, dtype=torch.int64),
                "teacher_owners": torch.tensor(self.owners, dtype=torch.int64),
                "teacher_serials": torch.tensor(self.serials, dtype=torch.int64),
                "teacher_next_serial": self.next_serial, "teacher_group_size": self.group.size,
                "teacher_models": models, "proxy": self.proxy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the buffer. A checkpoint written with another group size (or none) gets its teachers dealt
        out again in buffer order, so every rank owns its share from the first call on."""
        self.clients = torch.as_tensor(state["teacher_clients"]).tolist()
        self.versions = torch.as_tensor(state["teacher_versions"]).tolist()
        self.models = [m.clone() for m in torch.as_tensor(state["teacher_models"]).to(self.device)]
        n = len(self.clients)
        if int(state.get("teacher_group_size", 1)) == self.group.size and "teacher_owners" in state:
            self.owners = torch.as_tensor(state["teacher_owners"]).tolist()
        else:
            self.owners = [i % self.group.size for i in range(n)]
        self.serials = torch.as_tensor(state.get("teacher_serials", torch.arange(n - 1, -1, -1))).tolist()
        self.next_serial = int(state.get("teacher_next_serial", n))
        self.delivered = set()
        self._stacked = None
        self.proxy.load_state_dict(state["proxy"], self.device)
