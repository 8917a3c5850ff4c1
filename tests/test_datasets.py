"""Data set look-up order, Debian unpacking, offline errors, and the pooled splits.

The torchvision sets are faked with tiny IDX files (magic, big-endian dims, uint8 data) so the
real torchvision loaders run without any network or real data.
"""

import gzip
import struct

import numpy as np
import pytest
import torch
import torchvision.datasets

from mpi_afl.data.datasets import DataNotFoundError, locate, load_splits, prepare
from mpi_afl.names import DATASETS

torch.set_num_threads(1)

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_idx_set(n_train: int = 20, n_test: int = 10) -> dict[str, bytes]:
    """Constant images with pixel value = sample number (test set from 100 on), label = value % 7."""
    files = {}
    for prefix, values in (("train", np.arange(n_train)), ("t10k", 100 + np.arange(n_test))):
        images = np.broadcast_to(values[:, None, None], (len(values), 28, 28))
        files[f"{prefix}-images-idx3-ubyte"] = idx_bytes(images)
        files[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(values % 7)
    return files


def write_torchvision_layout(root, files, folder="FashionMNIST"):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for name, data in files.items():
        (raw / name).write_bytes(data)


def write_debian_layout(system_dir, files, name="fashion-mnist", compress=True):
    target = system_dir / name
    target.mkdir(parents=True)
    for fname, data in files.items():
        if compress:
            (target / (fname + ".gz")).write_bytes(gzip.compress(data))
        else:
            (target / fname).write_bytes(data)


@pytest.fixture
def places(tmp_path):
    """Separate empty dirs for every look-up place; no $MPI_AFL_DATA and no real ~/.cache."""
    return {k: tmp_path / k for k in ("root", "env", "cache", "system")}


def lookup(places, with_env=True):
    env = {"MPI_AFL_DATA": str(places["env"])} if with_env else {}
    return {"env": env, "cache_dir": places["cache"], "system_dir": places["system"]}


def test_registry_describes_every_data_set():
    assert sorted(DATASETS) == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist"]
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.channels
    assert (DATASETS["cifar100"].num_classes, DATASETS["cifar10"].channels) == (100, 3)
    assert (DATASETS["digits"].image_size, DATASETS["fashion-mnist"].image_size) == (8, 28)


def test_lookup_order_root_env_cache_debian(places):
    files = fake_idx_set()
    for key in ("root", "env", "cache"):
        write_torchvision_layout(places[key], files)
    write_debian_layout(places["system"], files)
    kw = lookup(places)
    assert locate("fashion-mnist", str(places["root"]), **kw) == places["root"]
    assert locate("fashion-mnist", None, **kw) == places["env"]
    assert locate("fashion-mnist", "", **kw) == places["env"]  # the config's empty root = not given
    assert locate("fashion-mnist", None, **lookup(places, with_env=False)) == places["cache"]
    # A root without the files falls through to the next place.
    assert locate("fashion-mnist", str(places["root"] / "empty"), **kw) == places["env"]


def test_debian_copy_is_unpacked_into_cache_by_prepare(places):
    files = fake_idx_set()
    write_debian_layout(places["system"], files)
    debian_before = sorted(p.name for p in (places["system"] / "fashion-mnist").iterdir())
    kw = lookup(places, with_env=False)
    with pytest.raises(DataNotFoundError, match="A Debian copy is in .*run prepare"):
        locate("fashion-mnist", **kw)  # read-only: only rank 0's prepare writes
    prepare("fashion-mnist", **kw)
    assert locate("fashion-mnist", **kw) == places["cache"]
    raw = places["cache"] / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_NAMES)
    assert all((raw / name).read_bytes() == data for name, data in files.items())
    assert sorted(p.name for p in (places["system"] / "fashion-mnist").iterdir()) == debian_before


def test_uncompressed_debian_copy_and_mnist(places):
    write_debian_layout(places["system"], fake_idx_set(), name="mnist", compress=False)
    kw = lookup(places, with_env=False)
    prepare("mnist", **kw)
    assert (places["cache"] / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    assert locate("mnist", **kw) == places["cache"]


def test_prepare_prefers_local_copy_over_debian(places):
    write_torchvision_layout(places["env"], fake_idx_set())
    write_debian_layout(places["system"], fake_idx_set())
    prepare("fashion-mnist", **lookup(places))
    assert not places["cache"].exists()


def test_offline_error_lists_every_way(places):
    kw = lookup(places)
    with pytest.raises(DataNotFoundError) as caught:
        prepare("fashion-mnist", str(places["root"]), **kw)
    message = str(caught.value)
    for expected in ("--data.root DIR", "MPI_AFL_DATA=DIR", "apt-get install dataset-fashion-mnist",
                     "--data.download=true", str(places["root"]), str(places["env"]), str(places["cache"]),
                     str(places["system"] / "fashion-mnist"), "FashionMNIST/raw"):
        assert expected in message
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(DataNotFoundError) as caught:
        locate("mnist", **lookup(places, with_env=False))
    assert "apt-get" not in str(caught.value)  # no Debian package for MNIST
    assert "$MPI_AFL_DATA:   (not set)" in str(caught.value)


def test_default_cache_follows_xdg(tmp_path):
    assert locate("digits", env={"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "mpi_afl"


@pytest.mark.parametrize("given, expected", [("root", "root"), ("env", "env"), ("none", "cache")])
def test_download_goes_to_first_named_place(places, monkeypatch, given, expected):
    calls = []

    def fake_download(self):  # stands in for the network: writes the files torchvision would
        calls.append(self.raw_folder)
        write_torchvision_layout(places[expected], fake_idx_set())

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    kw = lookup(places, with_env=given == "env")
    root = str(places["root"]) if given == "root" else None
    prepare("fashion-mnist", root, download=True, **kw)
    assert calls == [str(places[expected] / "FashionMNIST" / "raw")]
    assert locate("fashion-mnist", root, **kw) == places[expected]


def test_download_never_runs_over_a_debian_copy(places, monkeypatch):
    def no_download(self):
        raise AssertionError("torchvision must not download when a Debian copy exists")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_download)
    write_debian_layout(places["system"], fake_idx_set())
    prepare("fashion-mnist", download=True, **lookup(places, with_env=False))
    assert locate("fashion-mnist", **lookup(places, with_env=False)) == places["cache"]


def test_cifar_layout_is_recognised(places):
    folder = places["root"] / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    for name in names[:-1]:
        (folder / name).write_bytes(b"")
    kw = lookup(places)
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        locate("cifar10", str(places["root"]), **kw)
    (folder / names[-1]).write_bytes(b"")
    assert locate("cifar10", str(places["root"]), **kw) == places["root"]


def test_idx_splits_pool_train_and_test(places):
    files = fake_idx_set(n_train=20, n_test=10)
    write_debian_layout(places["system"], files)
    kw = lookup(places, with_env=False)
    prepare("fashion-mnist", **kw)
    s = load_splits("fashion-mnist", seed=3, val_fraction=0.2, test_fraction=0.1, kd_fraction=0.1, **kw)
    assert [len(y) for y in (s.train_y, s.val_y, s.test_y, s.kd_y)] == [18, 6, 3, 3]
    assert s.train_x.shape == (18, 1, 28, 28) and s.train_x.dtype == torch.float32
    assert s.train_y.dtype == torch.int64
    xs = torch.cat([s.train_x, s.val_x, s.test_x, s.kd_x])
    ys = torch.cat([s.train_y, s.val_y, s.test_y, s.kd_y])
    info = DATASETS["fashion-mnist"]
    pixels = torch.round((xs[:, 0, 0, 0] * info.std[0] + info.mean[0]) * 255).long()
    assert torch.equal(xs, xs[:, :, :1, :1].expand_as(xs))  # every image stays constant
    assert torch.equal(pixels % 7, ys)  # labels stay with their images
    # Both official sets pooled, each sample in exactly one split, shuffled across the splits.
    assert sorted(pixels.tolist()) == list(range(20)) + list(range(100, 110))
    assert (pixels[:18] >= 100).any() and (pixels[18:] < 100).any()


def test_digits_splits_sizes_values_and_partition_of_pool():
    s = load_splits("digits", seed=0)
    assert [len(y) for y in (s.train_y, s.val_y, s.test_y, s.kd_y)] == [1259, 269, 269, 0]
    assert s.kd_x.shape == (0, 1, 8, 8) and s.train_x.shape == (1259, 1, 8, 8)
    info = s.info
    xs = torch.cat([s.train_x, s.val_x, s.test_x]) * info.std[0] + info.mean[0]
    assert abs(float(xs.min())) < 1e-5 and abs(float(xs.max()) - 1.0) < 1e-5
    assert abs(float(s.train_x.mean())) < 0.05 and abs(float(s.train_x.std()) - 1.0) < 0.05
    from sklearn.datasets import load_digits
    digits = load_digits()
    ys = torch.cat([s.train_y, s.val_y, s.test_y]).numpy()
    assert np.array_equal(np.bincount(ys), np.bincount(digits.target))
    pooled = np.round(xs.reshape(len(xs), -1).numpy() * 16)
    ordered = pooled[np.lexsort(pooled.T)]
    original = digits.data[np.lexsort(digits.data.T)]
    assert np.array_equal(ordered, original)


def test_digits_kd_share_and_determinism():
    a = load_splits("digits", seed=7, kd_fraction=0.1)
    b = load_splits("digits", seed=7, kd_fraction=0.1)
    c = load_splits("digits", seed=8, kd_fraction=0.1)
    assert (len(a.kd_y), len(a.train_y)) == (179, 1797 - 269 - 269 - 179)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.kd_y, b.kd_y)
    assert not torch.equal(a.train_y, c.train_y)


@pytest.mark.parametrize("kwargs, field", [
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"kd_fraction": 1.5}, "kd_fraction"),
    ({"val_fraction": 0.5, "test_fraction": 0.3, "kd_fraction": 0.2}, "must be < 1"),
])
def test_fraction_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        load_splits("digits", seed=0, **kwargs)


def test_unknown_data_set():
    with pytest.raises(ValueError, match=r"unknown data set 'svhn'.*cifar10.*digits"):
        locate("svhn")


def _unpack_together(barrier, sources, targets, failures):
    from mpi_afl.data.datasets import _unpack
    barrier.wait()
    try:
        _unpack(sources, targets)
    except OSError as e:
        failures.put(repr(e))


@pytest.mark.slow
def test_concurrent_unpacks_of_the_same_files_all_succeed(tmp_path):
    """Runs started together (a sweep) unpack Debian's recompressed files at the same time; each writes its own
    temporary file, so no rename can take another's (with one shared '.partial' name, a run failed with
    FileNotFoundError: its partial file had been renamed away by the other)."""
    import gzip
    import multiprocessing

    payload = bytes(range(256)) * 65536   # 16 MB: long enough for the copies to overlap
    sources, targets = [], []
    for i in range(3):
        source = tmp_path / f"f{i}.gz"
        source.write_bytes(gzip.compress(payload, compresslevel=1))
        sources.append(source)
        targets.append(tmp_path / "raw" / f"f{i}")
    ctx = multiprocessing.get_context("spawn")
    barrier, failures = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_unpack_together, args=(barrier, sources, targets, failures)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = [failures.get() for _ in range(failures.qsize())]
    assert not errors and all(p.exitcode == 0 for p in procs)
    assert all(t.read_bytes() == payload for t in targets)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["f0", "f1", "f2"]   # no temporary file left
