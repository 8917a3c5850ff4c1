"""Client local training and evaluation (docs/algorithms.md §1)."""

import math

import pytest
import torch
from torch import nn

from mpi_afl.client.local_train import OPTIMIZERS, job_generator, train_job
from mpi_afl.models import build_model
from mpi_afl.models.evaluate import evaluate
from mpi_afl.models.flat import flatten, param_mask
from mpi_afl.transport.messages import JobSpec

torch.set_num_threads(1)

CLASSES = 4


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian bumps on 8x8 images, one position per class, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    grid = torch.arange(8.0)
    centres = torch.tensor([[2.0, 2.0], [2.0, 5.0], [5.0, 2.0], [5.0, 5.0]])[y]
    dy = (grid[None, :] - centres[:, 0:1]) ** 2  # (n, 8)
    dx = (grid[None, :] - centres[:, 1:2]) ** 2
    img = torch.exp(-(dy[:, :, None] + dx[:, None, :]) / 2.0)
    x = img[:, None] + 0.2 * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


def _model(norm: str = "batchnorm") -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", in_channels=1, image_size=8, num_classes=CLASSES, norm=norm)


def _train(model, base, x, y, indices, client_id=1, job_index=0, **overrides):
    kwargs = dict(iterations=5, batch_size=16, optimizer="adam", lr=1e-2, momentum=0.9, weight_decay=0.0,
                  augment=False, seed=3, job=JobSpec(job_index, client_id, 0, 0.0))
    kwargs.update(overrides)
    return train_job(model, base, x, y, indices, **kwargs)


@pytest.mark.parametrize("norm,optimizer,lr", [("batchnorm", "adam", 1e-2), ("stat", "sgd", 5e-2)])
def test_training_learns_blobs(norm, optimizer, lr):
    x, y = _blobs(256, seed=0)
    x_test, y_test = _blobs(200, seed=1)
    model = _model(norm)
    base = flatten(model)
    loss0, acc0 = evaluate(model, base, x_test, y_test)
    result = _train(model, base, x, y, torch.arange(256), iterations=60, optimizer=optimizer, lr=lr)
    loss1, acc1 = evaluate(model, base + result.delta, x_test, y_test)
    assert acc0 < 0.6
    assert acc1 == 1.0
    assert loss1 < 0.2 * loss0
    assert result.num_samples == 256 and result.compute_seconds > 0
    assert 0 < result.loss < loss0


def test_delta_includes_running_statistics():
    x, y = _blobs(64, seed=0)
    model = _model("batchnorm")
    base = flatten(model)
    result = _train(model, base, x, y, torch.arange(64))
    stats = ~param_mask(model)
    assert result.delta[stats].abs().sum() > 0
    assert torch.allclose(base + result.delta, flatten(model), atol=1e-6)  # up to float rounding


def test_same_job_is_reproducible_despite_global_rng():
    x, y = _blobs(100, seed=0)
    idx = torch.arange(10, 90)
    model = _model()
    base = flatten(model)
    first = _train(model, base, x, y, idx, augment=True)
    torch.manual_seed(12345)
    torch.rand(1000)
    second = _train(model, base, x, y, idx, augment=True)
    assert torch.equal(first.delta, second.delta)
    assert first.loss == second.loss
    other_job = _train(model, base, x, y, idx, augment=True, job_index=1)
    other_client = _train(model, base, x, y, idx, augment=True, client_id=2)
    assert not torch.equal(first.delta, other_job.delta)
    assert not torch.equal(first.delta, other_client.delta)


def test_job_generator_depends_on_triple_only():
    a = torch.rand(5, generator=job_generator(7, 3, 2))
    assert torch.equal(a, torch.rand(5, generator=job_generator(7, 3, 2)))
    for triple in [(7, 3, 3), (7, 2, 2), (8, 3, 2)]:
        assert not torch.equal(a, torch.rand(5, generator=job_generator(*triple)))


def _record_batches(model: nn.Module) -> list[list[int]]:
    """Sample ids seen by each forward; the tests code sample i as an image filled with i."""
    seen: list[list[int]] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, 0, 0, 0].long().tolist()))
    return seen


def test_batches_cycle_through_client_data():
    x = torch.arange(20.0)[:, None, None, None].expand(20, 1, 8, 8).contiguous()
    y = torch.zeros(20, dtype=torch.long)
    idx = torch.tensor([1, 3, 4, 8, 9, 11, 12, 15, 17, 19])
    model = _model("none")
    seen = _record_batches(model)
    _train(model, flatten(model), x, y, idx, iterations=6, batch_size=4, lr=0.0)
    assert [len(b) for b in seen] == [4, 4, 2, 4, 4, 2]
    for epoch in (seen[:3], seen[3:]):
        assert sorted(sum(epoch, [])) == idx.tolist()
    assert sum(seen[:3], []) != sum(seen[3:], [])  # the permutation is re-drawn


def test_small_client_uses_all_samples_each_step():
    x = torch.arange(5.0)[:, None, None, None].expand(5, 1, 8, 8).contiguous()
    y = torch.zeros(5, dtype=torch.long)
    model = _model("none")
    seen = _record_batches(model)
    result = _train(model, flatten(model), x, y, torch.arange(5), iterations=3, batch_size=32)
    assert [sorted(b) for b in seen] == [[0, 1, 2, 3, 4]] * 3
    assert result.num_samples == 5


def test_unknown_optimizer_rejected():
    x, y = _blobs(8, seed=0)
    model = _model()
    with pytest.raises(ValueError, match="allowed: adam, sgd"):
        _train(model, flatten(model), x, y, torch.arange(8), optimizer="rmsprop")
    assert set(OPTIMIZERS) == {"adam", "sgd"}


def test_evaluate_against_hand_built_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    flat = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # identity weight, zero bias: logits = x
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-3.0)), math.log(1 + math.exp(1.0))]
    for batch_size in (1024, 2):
        loss, acc = evaluate(model, flat, x, y, batch_size=batch_size)
        assert acc == pytest.approx(2 / 3)
        assert loss == pytest.approx(sum(ce) / 3, rel=1e-6)
    assert not model.training
