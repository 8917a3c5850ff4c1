"""Data sets as normalised tensors, and their train/validation/test/KD splits.

docs/design.md "Data": files are looked up in this order

1. the explicit ``root`` (``--data.root``),
2. ``$MPI_AFL_DATA``,
3. the user cache ``$XDG_CACHE_HOME/mpi_afl`` (default ``~/.cache/mpi_afl``),
4. Debian's ``/usr/share/datasets/<name>``,
5. a torchvision download, only when asked for (``--data.download=true``) and only on rank 0.

Directories 1-3 use torchvision's own layout (``<dir>/FashionMNIST/raw/...``,
``<dir>/cifar-10-batches-py/...``) and are handed to torchvision with ``download=False``.
Debian's ``dataset-fashion-mnist`` ships the original IDX files recompressed, so torchvision's MD5
checks of the ``.gz`` archives fail: ``prepare`` never lets torchvision download over them but
decompresses them into the user cache, where torchvision (which only checks that the
decompressed files exist) loads them. ``digits`` is bundled with scikit-learn and needs no files.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import pathlib
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError
from ..names import DATASETS, DatasetInfo
from ..plugins import call, callable_object, is_import_path, short_name
from ..storage.atomic import atomic_write


class DataNotFoundError(FileNotFoundError):
    """No local copy of a data set and no download allowed; the message lists the ways to provide one."""


class DataError(ValueError):
    """A data set's files are there but cannot be read (garbage, truncated); the message names the file."""


DEFAULT_SYSTEM_DIR = "/usr/share/datasets"


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; allowed: {sorted(DATASETS)}")
    return DATASETS[name]


def _torchvision_class(info: DatasetInfo) -> type:
    # Imported here: the digits quick start should not pay for importing torchvision.
    import torchvision.datasets
    return getattr(torchvision.datasets, info.torchvision_class)


def _is_idx(info: DatasetInfo) -> bool:
    """MNIST-family sets come as four IDX files (the format Debian ships)."""
    import torchvision.datasets
    return issubclass(_torchvision_class(info), torchvision.datasets.MNIST)


def _required_files(info: DatasetInfo) -> list[pathlib.Path]:
    """Files (relative to the root handed to torchvision) that its loader needs with download=False."""
    cls = _torchvision_class(info)
    if _is_idx(info):
        # MNIST._check_exists: the decompressed resources under <root>/<ClassName>/raw.
        return [pathlib.Path(cls.__name__, "raw", _strip_gz(filename)) for filename, _ in cls.resources]
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [pathlib.Path(cls.base_folder, f) for f in names]


def _strip_gz(filename: str) -> str:
    return filename[:-3] if filename.endswith(".gz") else filename


@dataclass(frozen=True)
class _Places:
    """The directories searched for one data set, in look-up order."""

    root: pathlib.Path | None
    env_dir: pathlib.Path | None
    cache: pathlib.Path
    system: pathlib.Path  # <system_dir>/<name>

    def torchvision_dirs(self) -> list[pathlib.Path]:
        # The system dir may hold a torchvision layout too (e.g. a site-wide copy of CIFAR).
        return [d for d in (self.root, self.env_dir, self.cache, self.system) if d is not None]

    def download_dir(self) -> pathlib.Path:
        """Where a download goes: the first place the user named, else the cache (never the system dir)."""
        return self.root or self.env_dir or self.cache


def _places(name: str, root: str | os.PathLike | None, env: Mapping[str, str] | None,
            cache_dir: str | os.PathLike | None, system_dir: str | os.PathLike) -> _Places:
    env = os.environ if env is None else env
    if cache_dir is None:
        cache_base = env.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
        cache_dir = pathlib.Path(cache_base) / "mpi_afl"
    return _Places(
        root=pathlib.Path(root) if root else None,  # the config's empty string means "not given"
        env_dir=pathlib.Path(env["MPI_AFL_DATA"]) if env.get("MPI_AFL_DATA") else None,
        cache=pathlib.Path(cache_dir),
        system=pathlib.Path(system_dir) / name,
    )


def _holds(info: DatasetInfo, directory: pathlib.Path) -> bool:
    return all((directory / f).is_file() for f in _required_files(info))


def _debian_sources(info: DatasetInfo, places: _Places) -> list[pathlib.Path] | None:
    """The IDX files of a Debian-style copy (``.gz`` or plain) in the system dir, or None if incomplete."""
    if not _is_idx(info):
        return None
    sources = []
    for target in _required_files(info):
        candidates = [places.system / (target.name + ".gz"), places.system / target.name]
        found = [c for c in candidates if c.is_file()]
        if not found:
            return None
        sources.append(found[0])
    return sources


def _not_found_message(info: DatasetInfo, places: _Places, debian: list[pathlib.Path] | None) -> str:
    layout = _required_files(info)[0].parent
    searched = [f"  --data.root:     {places.root or '(not given)'}",
                f"  $MPI_AFL_DATA:   {places.env_dir or '(not set)'}",
                f"  user cache:      {places.cache}",
                f"  system:          {places.system}"]
    lines = [f"data set {info.name!r} not found. Searched (in this order, torchvision layout "
             f"<dir>/{layout}/...):", *searched]
    if debian is not None:
        lines.append(f"A Debian copy is in {places.system}: run prepare() (rank 0 does this in "
                     f"mpi_afl.train) to unpack it into {places.cache}.")
    lines += ["Provide it in one of these ways:",
              "  --data.root DIR           a directory holding the files in torchvision layout",
              "  MPI_AFL_DATA=DIR          the same, through the environment",
              f"  copy the files into the user cache {places.cache}"]
    if info.debian_package:
        lines.append(f"  apt-get install {info.debian_package}   (installs them in {places.system})")
    lines.append(f"  --data.download=true      on a machine with network access: torchvision downloads "
                 f"them into {places.download_dir()} (rank 0 only)")
    return "\n".join(lines)


def locate(name: str, root: str | None = None, *, env: Mapping[str, str] | None = None,
           cache_dir: str | os.PathLike | None = None,
           system_dir: str | os.PathLike = DEFAULT_SYSTEM_DIR) -> pathlib.Path:
    """Return the directory to hand to torchvision for ``name``; raise DataNotFoundError if none holds it.

    Read-only: a Debian copy that ``prepare`` has not unpacked yet is reported, not unpacked, so
    that only rank 0 writes. ``digits`` needs no files: the cache dir is returned.
    """
    info = _info(name)
    places = _places(name, root, env, cache_dir, system_dir)
    if info.torchvision_class is None:
        return places.cache
    for directory in places.torchvision_dirs():
        if _holds(info, directory):
            return directory
    raise DataNotFoundError(_not_found_message(info, places, _debian_sources(info, places)))


def prepare(name: str, root: str | None = None, download: bool = False, *,
            env: Mapping[str, str] | None = None, cache_dir: str | os.PathLike | None = None,
            system_dir: str | os.PathLike = DEFAULT_SYSTEM_DIR) -> None:
    """Make sure ``locate`` will find the files: run on rank 0 only, before the other ranks load.

    Unpacks a Debian copy into the user cache, or, with ``download=True`` and no local copy,
    lets torchvision download into ``root``, else ``$MPI_AFL_DATA``, else the cache.
    """
    if is_import_path(name):
        return   # a plug-in loader finds its own data, on every rank
    info = _info(name)
    if info.torchvision_class is None:
        return
    places = _places(name, root, env, cache_dir, system_dir)
    if any(_holds(info, d) for d in places.torchvision_dirs()):
        return
    debian = _debian_sources(info, places)
    if debian is not None:
        _unpack(debian, [places.cache / f for f in _required_files(info)])
    elif download:
        cls = _torchvision_class(info)
        target = places.download_dir()
        target.mkdir(parents=True, exist_ok=True)
        try:
            cls(str(target), train=True, download=True)  # fetches the test files as well
        except (OSError, RuntimeError, ValueError) as e:   # no network, a proxy, a failed checksum
            raise DataNotFoundError(f"data set {name!r}: the download into {target} failed ({_one_line(e)}); "
                                    f"without network access, copy the files there or into {places.cache}") from e
    else:
        raise DataNotFoundError(_not_found_message(info, places, None))


def _unpack(sources: list[pathlib.Path], targets: list[pathlib.Path]) -> None:
    """Decompress (or copy) each source to its target, atomically so a reader never sees half a file.

    The temporary file is private to this process (storage/atomic.py): two runs started together on one
    machine (a sweep) unpack concurrently, and with a shared name the first rename left the second without its
    file."""
    for source, target in zip(sources, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if source.suffix == ".gz" else open
        with atomic_write(target) as tmp, opener(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)


@dataclass
class Splits:
    """Normalised float32 images (N, C, H, W) and int64 labels; ``kd_*`` may have 0 rows."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    kd_x: torch.Tensor
    kd_y: torch.Tensor


def _load_pooled(info: DatasetInfo, directory: pathlib.Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Official train then test set: uint8 pixels (N, C, H, W), int64 labels, and the pixel maximum.

    Pixels stay uint8 until the split is cut so that CIFAR's pooled set costs 180 MB, not 740 MB.
    """
    if info.torchvision_class is None:
        from sklearn.datasets import load_digits
        digits = load_digits()  # 8x8 images with integer grey levels 0..16
        return digits.images[:, None].astype(np.uint8), digits.target.astype(np.int64), 16.0
    cls = _torchvision_class(info)
    if _is_idx(info):
        for name in _required_files(info):
            _check_idx(directory / name)
    images, labels = [], []
    for train in (True, False):
        try:
            data = cls(str(directory), train=train, download=False)
        except (AssertionError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise DataError(f"data set {info.name!r}: cannot read its files in {directory} ({_one_line(e)}); "
                            "they are damaged or incomplete: replace them") from e
        pixels = np.asarray(data.data, dtype=np.uint8)
        # MNIST family: (N, H, W) tensors; CIFAR: (N, H, W, C) arrays.
        images.append(pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2))
        labels.append(np.asarray(data.targets, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels), 255.0


def _load_plugin(spec: str, root: str | None) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """Call a plug-in loader (docs/extending.md "Data sets"): `loader(root)` returns (images, labels),
    images (N, C, H, H) numbers, labels (N,) integers 0..K-1. Normalised per channel with the pooled
    data's own mean and standard deviation."""
    result = call(callable_object(spec, "data.dataset"), spec, "data.dataset", root)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ConfigError(f"config key 'data.dataset': {spec!r} must return (images, labels), "
                          f"got {type(result).__name__}")
    images, labels = np.asarray(result[0], dtype=np.float32), np.asarray(result[1])
    if images.ndim != 4 or images.shape[2] != images.shape[3] or len(images) < 2:
        raise ConfigError(f"config key 'data.dataset': {spec!r} returned images of shape {images.shape}; "
                          "expected (N, channels, size, size) with N >= 2")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ConfigError(f"config key 'data.dataset': {spec!r} returned labels of shape {labels.shape} and "
                          f"dtype {labels.dtype}; expected ({len(images)},) integers >= 0")
    mean = images.mean(axis=(0, 2, 3), dtype=np.float64)
    std = images.std(axis=(0, 2, 3), dtype=np.float64)
    std[std == 0] = 1.0   # a constant channel stays constant instead of dividing by zero
    info = DatasetInfo(short_name(spec), int(labels.max()) + 1, images.shape[1], images.shape[2],
                       tuple(float(m) for m in mean), tuple(float(v) for v in std))
    return images, labels.astype(np.int64), info


def _check_idx(path: pathlib.Path) -> None:
    """DataError naming `path` unless it is a complete IDX file of unsigned bytes (labels or images).

    torchvision's reader fails on a damaged file with a bare AssertionError that names no file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else -1
    ndim = {0x0801: 1, 0x0803: 3}.get(magic)   # unsigned-byte labels (N) and images (N, H, W)
    if ndim is None or len(head) < 4 + 4 * ndim:
        raise DataError(f"{path} is not an IDX file of labels or images (damaged or another format); replace it")
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        raise DataError(f"{path} is truncated or damaged: its header says {'x'.join(map(str, dims))} "
                        f"({expected} bytes) but it has {size} bytes; replace it")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def load_splits(name: str, root: str | None = None, *, seed: int, val_fraction: float = 0.15,
                test_fraction: float = 0.15, kd_fraction: float = 0.0,
                env: Mapping[str, str] | None = None, cache_dir: str | os.PathLike | None = None,
                system_dir: str | os.PathLike = DEFAULT_SYSTEM_DIR) -> Splits:
    """Pool the official train and test sets and cut test, validation and KD shares (docs/algorithms.md §3.5).

    The shuffle comes from ``numpy.random.default_rng(seed)``, so every MPI rank gets the same
    splits. Each share is ``floor(fraction * N)`` samples; the rest is the training set.
    """
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction, "kd_fraction": kd_fraction}
    for field, value in fractions.items():
        if not 0 <= value < 1:
            raise ValueError(f"{field} must be in [0, 1), got {value}")
    if sum(fractions.values()) >= 1:
        raise ValueError(f"val_fraction + test_fraction + kd_fraction must be < 1 to leave a training set, "
                         f"got {val_fraction} + {test_fraction} + {kd_fraction} = {sum(fractions.values())}")
    if is_import_path(name):
        images, labels, info = _load_plugin(name, root)
        pixel_max = 1.0
    else:
        info = _info(name)
        directory = locate(name, root, env=env, cache_dir=cache_dir, system_dir=system_dir)
        images, labels, pixel_max = _load_pooled(info, directory)
    mean = np.asarray(info.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(info.std, dtype=np.float32)[:, None, None]

    order = np.random.default_rng(seed).permutation(len(labels))
    sizes = [int(f * len(labels)) for f in (test_fraction, val_fraction, kd_fraction)]
    test, val, kd, train = np.split(order, np.cumsum(sizes))

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = images[idx].astype(np.float32) / np.float32(pixel_max)  # to [0, 1], then normalise
        return torch.from_numpy((scaled - mean) / std), torch.from_numpy(labels[idx])

    train_x, train_y = take(train)
    val_x, val_y = take(val)
    test_x, test_y = take(test)
    kd_x, kd_y = take(kd)
    return Splits(info, train_x, train_y, val_x, val_y, test_x, test_y, kd_x, kd_y)
