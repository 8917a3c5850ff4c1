"""Each teacher's class proportions q_k, estimated without client data.

docs/algorithms.md §3.3 "Class proportions": the paper feeds a client's first two
uploaded models i.i.d. Gaussian inputs (64 probes, in the normalised input
space the models see), averages softmax(logits / 0.8) over the probes, uses
the first estimate until the second arrives, then freezes the average of the
two. A model trained on skewed labels leans towards its frequent classes even
on noise, which is the signal this reads. The true label histograms (what the
research code uses) remain available as an ablation.
"""

import numpy as np
import torch
from torch import nn


def probe_proportions(model: nn.Module, image_shape: tuple[int, int, int], probes: int, temperature: float,
                      generator: torch.Generator) -> torch.Tensor:
    """Mean over `probes` N(0, I) inputs of softmax(model(x) / temperature), on the model's device.

    The model runs in eval mode (its own running statistics); `generator` is a CPU generator."""
    device = next(model.parameters()).device
    inputs = torch.randn((probes, *image_shape), generator=generator).to(device)
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(inputs) / temperature, dim=1).mean(dim=0)


def histogram_proportions(counts: np.ndarray) -> torch.Tensor:
    """Label counts of one client -> proportions (uniform when the client has no samples)."""
    q = torch.as_tensor(np.asarray(counts, dtype=np.float64), dtype=torch.float32)
    total = float(q.sum())
    return q / total if total > 0 else torch.full_like(q, 1.0 / len(q))


class ProbeProxy:
    """The frozen probe estimates of every client seen so far."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, probes: int, temperature: float):
        self.image_shape, self.num_classes = image_shape, num_classes
        self.probes, self.temperature = probes, temperature
        self.estimates: dict[int, torch.Tensor] = {}  # client id -> q
        self.seen: dict[int, int] = {}                # client id -> models probed (1 or 2)

    def observe(self, client_id: int, model: nn.Module, generator: torch.Generator) -> None:
        """Probe `model`, the client's newest upload, if it is the client's first or second one."""
        seen = self.seen.get(client_id, 0)
        if seen >= 2:
            return
        q = probe_proportions(model, self.image_shape, self.probes, self.temperature, generator)
        self.estimates[client_id] = q if seen == 0 else 0.5 * (self.estimates[client_id] + q)
        self.seen[client_id] = seen + 1

    def proportions(self, client_id: int) -> torch.Tensor:
        if client_id not in self.estimates:
            raise KeyError(f"client {client_id} has not uploaded a model yet, so it has no probe estimate")
        return self.estimates[client_id]

    def state_dict(self) -> dict:
        ids = sorted(self.estimates)
        q = (torch.stack([self.estimates[i].cpu() for i in ids]) if ids
             else torch.zeros(0, self.num_classes))
        return {"clients": torch.tensor(ids, dtype=torch.int64),
                "seen": torch.tensor([self.seen[i] for i in ids], dtype=torch.int64),
                "estimates": q}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        ids = torch.as_tensor(state["clients"]).tolist()
        seen = torch.as_tensor(state["seen"]).tolist()
        q = torch.as_tensor(state["estimates"]).to(device)
        self.estimates = {cid: q[i].clone() for i, cid in enumerate(ids)}
        self.seen = dict(zip(ids, seen))
