"""The FIFO pool of synthetic images and class-conditional batch drawing.

docs/algorithms.md §3.3: each synthesis appends its kept batch and labels to a pool
of at most `pool_size` images (oldest dropped first); each KD iteration draws,
for every teacher k, a batch whose labels follow that teacher's class
proportions q_k. DD-FedRevive draws its real KD batches the same way (§3.4),
so the drawing is a free function on a label vector.
"""

import torch


def sample_by_class(labels: torch.Tensor, proportions: torch.Tensor, n: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Indices into `labels` (1-D int64 on the CPU) for a batch of `n` whose labels follow `proportions`.

    As the research code does: draw the n labels from the proportions, then
    for each class take distinct samples of that class when it has enough,
    with replacement when it has too few, and random samples of any class
    when it has none; finally shuffle. `generator` is a CPU generator."""
    if len(labels) == 0:
        raise ValueError("cannot draw a batch from an empty set")
    probs = proportions.detach().to("cpu", torch.float64)
    if probs.dim() != 1 or not bool((probs >= 0).all()) or float(probs.sum()) <= 0:
        raise ValueError(f"proportions must be a 1-D non-negative vector with a positive sum, got {probs.tolist()}")
    wanted = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)
    counts = torch.bincount(wanted, minlength=len(probs))
    picks = []
    for c in counts.nonzero().flatten().tolist():
        k = int(counts[c])
        candidates = (labels == c).nonzero().flatten()
        if len(candidates) >= k:
            picks.append(candidates[torch.randperm(len(candidates), generator=generator)[:k]])
        elif len(candidates) > 0:
            picks.append(candidates[torch.randint(len(candidates), (k,), generator=generator)])
        else:
            picks.append(torch.randint(len(labels), (k,), generator=generator))
    indices = torch.cat(picks)
    return indices[torch.randperm(len(indices), generator=generator)]


class SyntheticPool:
    """A ring buffer of at most `capacity` images (on their device) with labels (on the CPU).

    Storage is allocated on the first `add`. The state keeps the ring layout
    as it is (not re-ordered), so a restored pool maps the same index to the
    same image and a resumed run draws exactly the same batches."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"pool capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.images: torch.Tensor | None = None
        self.labels = torch.zeros(0, dtype=torch.int64)
        self.size = 0
        self.head = 0  # next slot to write; the oldest image once the ring is full

    def __len__(self) -> int:
        return self.size

    def _allocate(self, like: torch.Tensor) -> None:
        self.images = torch.zeros((self.capacity, *like.shape[1:]), dtype=like.dtype, device=like.device)
        self.labels = torch.zeros(self.capacity, dtype=torch.int64)

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch; once full, each new image overwrites the oldest one."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if self.images is None:
            self._allocate(images)
        images, labels = images.detach()[-self.capacity:], labels.detach().cpu()[-self.capacity:]
        slots = (self.head + torch.arange(len(images))) % self.capacity
        self.images[slots.to(self.images.device)] = images.to(self.images.device, self.images.dtype)
        self.labels[slots] = labels
        self.head = (self.head + len(images)) % self.capacity
        self.size = min(self.capacity, self.size + len(images))

    def sample(self, proportions: torch.Tensor, n: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of n (images, labels) drawn class-conditionally from `proportions`."""
        if self.size == 0:
            raise ValueError("the synthetic pool is empty: synthesise before distilling")
        indices = sample_by_class(self.labels[:self.size], proportions, n, generator)
        return self.images[indices.to(self.images.device)], self.labels[indices]

    def state_dict(self) -> dict:
        images = self.images[:self.size].clone() if self.images is not None else torch.zeros(0)
        return {"images": images, "labels": self.labels[:self.size].clone(), "head": self.head}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        size = len(state["labels"])
        if size > self.capacity:
            raise ValueError(f"pool state holds {size} images, more than the capacity {self.capacity}")
        self.images, self.labels, self.size, self.head = None, torch.zeros(0, dtype=torch.int64), 0, 0
        if size:
            images = torch.as_tensor(state["images"]).to(device)
            self._allocate(images)
            self.images[:size] = images
            self.labels[:size] = torch.as_tensor(state["labels"])
            self.size, self.head = size, int(state["head"])
