"""Models (docs/algorithms.md §3.3 "Model note") and the flat state vector."""

import pytest
import torch
from torch import nn

from mpi_afl.models import build_model
from mpi_afl.models.flat import flat_size, flatten, load_flat, param_mask, variance_mask
from mpi_afl.models.layers import StatTracker
from mpi_afl.names import MODELS

torch.set_num_threads(1)

# (name, in_channels, image_size) for a shape each model is meant for.
SHAPES = [("cnn", 1, 8), ("convnet", 1, 28), ("resnet18", 3, 32)]


def _build(name: str, channels: int, size: int, norm: str, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, in_channels=channels, image_size=size, num_classes=classes, norm=norm)


def test_registry_and_unknown_name():
    assert set(MODELS) == {"cnn", "convnet", "resnet18"}
    with pytest.raises(ValueError, match="allowed: cnn, convnet, resnet18"):
        build_model("vgg", in_channels=1, image_size=28, num_classes=10, norm="stat")


def test_unknown_norm_rejected():
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model("cnn", in_channels=1, image_size=8, num_classes=10, norm="layer")


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
@pytest.mark.parametrize("norm", ["batchnorm", "stat", "none"])
def test_cnn_output_shape(channels, size, norm):
    model = _build("cnn", channels, size, norm, classes=7)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_convnet_matches_research_layout():
    model = _build("convnet", 1, 28, "stat", classes=62)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 62)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(64, (3, 3), (0, 0))] * 3
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(64 * 5 * 5, 200), (200, 100), (100, 62)]
    assert sum(isinstance(m, StatTracker) for m in model.modules()) == 3


def test_convnet_rejects_tiny_images():
    with pytest.raises(ValueError, match="image_size >= 12"):
        _build("convnet", 1, 8, "stat")


@pytest.mark.parametrize("norm", ["batchnorm", "stat"])
def test_resnet18_forward_and_stem(norm):
    model = _build("resnet18", 3, 32, norm)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    norm_type = nn.BatchNorm2d if norm == "batchnorm" else StatTracker
    # stem + 8 blocks x 2 + 3 projection shortcuts
    assert sum(isinstance(m, norm_type) for m in model.modules()) == 1 + 16 + 3
    # The usual CIFAR ResNet-18 has 11,173,962 parameters with BatchNorm; this
    # one has a bias-free classifier (-10) and StatTracker has no affine (-9,600).
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == (11_173_952 if norm == "batchnorm" else 11_164_352)


def _exercise_stats(model: nn.Module, channels: int, size: int) -> None:
    """One train-mode forward so running statistics differ from their init."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, channels, size, size) * 3 + 1)


@pytest.mark.parametrize("name,channels,size", SHAPES)
@pytest.mark.parametrize("norm", ["batchnorm", "stat"])
def test_flat_round_trip_bit_exact(name, channels, size, norm):
    src = _build(name, channels, size, norm, seed=1)
    _exercise_stats(src, channels, size)
    vec = flatten(src)
    assert vec.dtype == torch.float32 and vec.dim() == 1 and vec.numel() == flat_size(src)
    dst = _build(name, channels, size, norm, seed=2)
    assert not torch.equal(flatten(dst), vec)
    load_flat(dst, vec)
    assert torch.equal(flatten(dst), vec)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        if a.is_floating_point():
            assert torch.equal(a, b), k


def test_flat_layout_counts_params_and_float_buffers_only():
    model = _build("cnn", 1, 8, "batchnorm")
    n_params = sum(p.numel() for p in model.parameters())
    n_stats = 2 * (32 + 64)  # running_mean + running_var of the two BatchNorms
    assert flat_size(model) == n_params + n_stats
    assert any(k.endswith("num_batches_tracked") for k in model.state_dict())


def test_flatten_is_a_copy_and_out_is_filled():
    model = _build("cnn", 1, 8, "stat")
    vec = flatten(model)
    before = vec.clone()
    vec.add_(1.0)
    assert torch.equal(flatten(model), before)
    buf = torch.empty(flat_size(model))
    assert flatten(model, out=buf) is buf
    assert torch.equal(buf, before)


def test_wrong_sizes_raise():
    model = _build("cnn", 1, 8, "stat")
    n = flat_size(model)
    with pytest.raises(ValueError, match=f"needs \\({n},\\)"):
        load_flat(model, torch.zeros(n + 1))
    with pytest.raises(ValueError, match=f"{n} entries"):
        flatten(model, out=torch.zeros(n - 1))
    with pytest.raises(ValueError, match="float32"):
        flatten(model, out=torch.zeros(n, dtype=torch.float64))


@pytest.mark.parametrize("norm", ["batchnorm", "stat"])
def test_param_mask_marks_statistics_false(norm):
    model = _build("convnet", 1, 28, norm)
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.running_mean.fill_(-5.0)
            m.running_var.fill_(7.0)
        if hasattr(m, "tracked"):  # StatTracker's update count (a float, so it travels in the vector)
            m.tracked.fill_(3.0)
    mask = param_mask(model)
    vec = flatten(model)
    assert mask.dtype == torch.bool and mask.numel() == vec.numel()
    assert int(mask.sum()) == sum(p.numel() for p in model.parameters())
    stats = vec[~mask]
    counts = 3 if norm == "stat" else 0
    assert stats.numel() == 2 * 3 * 64 + counts
    assert torch.equal(stats.unique(), torch.tensor([-5.0, 3.0, 7.0] if counts else [-5.0, 7.0]))


def test_param_mask_all_true_without_norm():
    model = _build("cnn", 1, 8, "none")
    assert bool(param_mask(model).all())


def test_variance_mask_marks_exactly_the_running_variances():
    model = build_model("cnn", in_channels=1, image_size=8, num_classes=10, norm="batchnorm")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(7.0)
    mask = variance_mask(model)
    vec = flatten(model)
    assert mask.dtype == torch.bool and mask.shape == vec.shape
    expected = sum(m.running_var.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(mask.sum()) == expected > 0
    assert torch.all(vec[mask] == 7.0)
