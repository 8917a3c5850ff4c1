"""Checkpoint round trip, atomic replacement and the errors for bad files."""

import os

import h5py
import numpy as np
import pytest
import torch

from mpi_afl.server.state import CHECKPOINT_FORMAT, check_server_format
from mpi_afl.storage import checkpoint
from mpi_afl.storage.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint, stored_bytes

torch.set_num_threads(1)


def rich_state() -> dict:
    gen = np.random.default_rng(1234)
    gen.random(3)  # move the state away from the seed
    torch.manual_seed(7)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    adam.param_groups[0]["params"][0].grad = torch.ones(3)
    adam.step()
    return {
        "version": 42,
        "lr": 0.1,
        "name": "fedrevive",
        "done": False,
        "nothing": None,
        "blob": b"\x00\x01raw",
        "model": torch.randn(5, 3),
        "tensors": {
            "f16": torch.randn(4).half(),
            "bf16": torch.randn(4).to(torch.bfloat16),
            "f64": torch.randn(2, 2, dtype=torch.float64),
            "i64": torch.arange(6).reshape(2, 3),
            "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
        },
        "numpy_rng": gen.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "snapshots": [torch.randn(3), torch.randn(3) * 2],
        "jobs": [{"client": 3, "base": 10, "model": torch.ones(2)}, {"client": 5, "base": 11, "model": torch.zeros(2)}],
        "q": np.array([[0.25, 0.75], [0.5, 0.5]]),
        "np_scalar": np.float32(0.5),
        "clients": [1, 2, 3],
        "history": {"loss": [1.0, float("inf")], "tag": "x"},
        "betas": (0.5, 0.999),
        "optimizer": adam.state_dict(),  # int-keyed per-parameter state, tuple betas
        "by_client": {7: torch.ones(1), "7b": 1},
    }


def assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a == b, where
    else:
        assert a == b, where


def test_round_trip_keeps_types_and_values(tmp_path):
    state = rich_state()
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert_same(state, loaded)
    # The restored RNG states reproduce the same streams.
    gen = np.random.default_rng()
    gen.bit_generator.state = loaded["numpy_rng"]
    ref = np.random.default_rng(1234)
    ref.random(3)
    assert np.array_equal(gen.random(4), ref.random(4))
    torch.set_rng_state(loaded["torch_rng"])
    first = torch.rand(3)
    torch.set_rng_state(state["torch_rng"])
    assert torch.equal(first, torch.rand(3))
    # The 128-bit PCG64 state integer came back exactly.
    assert loaded["numpy_rng"]["state"]["state"] == state["numpy_rng"]["state"]["state"] > 2**64


def test_optimizer_state_loads_back(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([param], lr=1e-2, betas=(0.5, 0.999))
    param.grad = torch.full((3,), 0.5)
    adam.step()
    save_checkpoint(tmp_path / "opt.h5", {"adam": adam.state_dict()})
    restored = torch.optim.Adam([torch.nn.Parameter(param.detach().clone())], lr=1.0)
    restored.load_state_dict(load_checkpoint(tmp_path / "opt.h5")["adam"])
    assert restored.param_groups[0]["lr"] == 1e-2
    assert restored.param_groups[0]["betas"] == (0.5, 0.999)
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], adam.state_dict()["state"][0]["exp_avg"])


def test_failed_write_keeps_old_checkpoint_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, {"version": 1, "model": torch.ones(3)})
    with pytest.raises(TypeError, match=r"state\['algo'\]\['bad'\].*set"):
        save_checkpoint(path, {"version": 2, "model": torch.zeros(3), "algo": {"bad": {1, 2}}})
    assert os.listdir(tmp_path) == ["ckpt.h5"]
    old = load_checkpoint(path)
    assert old["version"] == 1 and torch.equal(old["model"], torch.ones(3))


def test_failed_rename_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, {"version": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"version": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.h5"]
    assert load_checkpoint(path) == {"version": 1}


def test_file_mode_follows_umask_like_any_new_file(tmp_path):
    save_checkpoint(tmp_path / "ckpt.h5", {"version": 1})
    (tmp_path / "plain").write_text("x")
    assert (tmp_path / "ckpt.h5").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_overwrite_replaces_content(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, {"version": 1, "a": torch.ones(2)})
    save_checkpoint(path, {"version": 2})
    assert load_checkpoint(path) == {"version": 2}


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found.*nope\.h5"):
        load_checkpoint(tmp_path / "nope.h5")


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, {"model": torch.randn(1000), "more": [torch.randn(100) for _ in range(3)]})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.h5"):
        load_checkpoint(path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "ckpt.h5"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"not an HDF5 file.*ckpt\.h5|ckpt\.h5.*not an HDF5 file"):
        load_checkpoint(path)


def test_foreign_hdf5_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(CheckpointError, match=r"other\.h5 is not an mpi_afl checkpoint"):
        load_checkpoint(path)


def test_wrong_format_version(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, {"version": 1})
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CheckpointError, match=rf"ckpt\.h5 has checkpoint format_version {FORMAT_VERSION + 1}"):
        load_checkpoint(path)


def test_server_state_of_another_layout_is_refused():
    check_server_format({"server_format": CHECKPOINT_FORMAT})
    for other in (CHECKPOINT_FORMAT - 1, None):
        with pytest.raises(CheckpointError, match=rf"server state format {other!r}; this version reads"):
            check_server_format({"server_format": other} if other is not None else {})


def test_colliding_keys_rejected(tmp_path):
    with pytest.raises(ValueError, match="share the HDF5 name"):
        save_checkpoint(tmp_path / "c.h5", {1: torch.ones(1), "1": torch.zeros(1)})


@pytest.mark.parametrize("shape", ["tiny_tensors", "one_large", "nested_plain_and_scalars"])
def test_stored_bytes_bounds_the_file_size(tmp_path, shape):
    """save_checkpoint reserves stored_bytes(state) before HDF5 writes (a full disk is then an OSError, not a
    broken HDF5): the bound must hold for many small objects, large arrays and every leaf kind."""
    g = torch.Generator().manual_seed(0)
    if shape == "tiny_tensors":
        state = {"layers": [{"w": torch.randn(1, generator=g), "step": torch.tensor(3)} for _ in range(500)]}
    elif shape == "one_large":
        state = {"model": torch.randn(1_000_000, generator=g), "versions": [torch.randn(1000) for _ in range(8)]}
    else:
        state = {"rng": {"state": 2 ** 100, "inc": [1, 2, 3]}, "np": np.float32(1.5), "b": b"\x00" * 5000,
                 "t": (torch.zeros(3, dtype=torch.bfloat16), np.arange(10)), "text": "x" * 3000,
                 "int_keys": {i: torch.ones(2) for i in range(50)}}
    path = tmp_path / "c.h5"
    save_checkpoint(path, state)
    assert path.stat().st_size <= stored_bytes(state)
