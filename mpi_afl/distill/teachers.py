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
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mpi_afl.models.flat import flat_size, load_flat

from .ensemble import TeacherEnsemble
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
                 proxy: ProbeProxy, *, proportions: str, distinct: bool, generator: torch.Generator):
        if capacity < 1:
            raise ValueError(f"teacher buffer capacity must be >= 1, got {capacity}")
        if proportions not in ("probe", "histogram", "uniform"):
            raise ValueError(f"unknown class proportions {proportions!r}; allowed: probe, histogram, uniform")
        self.capacity, self.distinct, self.source = capacity, distinct, proportions
        self.device = torch.device(device)
        self.proxy = proxy
        self.clients: list[int] = []
        self.versions: list[int] = []             # base version v_k of each model
        self.models: list[torch.Tensor] = []
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
        if self.distinct and client_id in self.clients:
            i = self.clients.index(client_id)
            del self.clients[i], self.versions[i], self.models[i]
        self.clients.insert(0, client_id)
        self.versions.insert(0, version)
        self.models.insert(0, model)
        del self.clients[self.capacity:], self.versions[self.capacity:], self.models[self.capacity:]
        self._stacked = None
        if self.source == "probe":
            if self._scratch is None:
                self._scratch = self._make_model()
            load_flat(self._scratch, model)
            self.proxy.observe(client_id, self._scratch, self._generator)

    def ensemble(self) -> TeacherEnsemble:
        """The buffered client models as one batched model, most recent first (restacked only after a push)."""
        if self._stacked is None:
            self._stacked = torch.stack(self.models)
        return self._ensemble.load(self._stacked)

    def proportions(self) -> torch.Tensor:
        """q_k of every buffered teacher, (teachers, classes), on the buffer's device."""
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
                "teacher_models": models, "proxy": self.proxy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.clients = torch.as_tensor(state["teacher_clients"]).tolist()
        self.versions = torch.as_tensor(state["teacher_versions"]).tolist()
        self.models = [m.clone() for m in torch.as_tensor(state["teacher_models"]).to(self.device)]
        self._stacked = None
        self.proxy.load_state_dict(state["proxy"], self.device)
