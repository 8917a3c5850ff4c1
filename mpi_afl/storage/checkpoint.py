"""Checkpoints: one HDF5 file holding a nested state dict, written atomically.

Why atomic: SLURM pre-emption (SIGTERM/SIGUSR1) or a node failure can stop
the job while a checkpoint is being written (docs/design.md "Output"). The file is
written to a temporary file in the same directory, flushed and fsync'ed, then
`os.replace`d over the old one and the directory is fsync'ed, so at any moment
the path holds either the complete old checkpoint or the complete new one.

Layout (the exact inverse is `load_checkpoint`):

- root attributes `format = "mpi_afl-checkpoint"`, `format_version`;
- every dict, list and tuple that holds arrays is an HDF5 group with attribute
  `kind` ("dict" | "list" | "tuple"); the root group is the state dict;
- in each such group a uint8 dataset `__index__` holds UTF-8 JSON
  `{"keys": [...], "plain": {name: value}}`: the keys in order (dict keys may
  be str or int, e.g. a torch optimizer's per-parameter state; list items
  are 0, 1, ...) and every entry that is plain JSON (None, bool, int, float,
  str and lists / str-keyed dicts of those). JSON keeps Python ints exact, so
  numpy's 128-bit PCG64 `bit_generator.state` survives;
- every other entry is a child named `str(key)`: a group (nested container)
  or a dataset with attribute `kind`: "tensor" (plus `dtype`, the torch dtype
  name; dtypes numpy lacks, such as bfloat16, are stored as the integer type
  of the same width and viewed back), "ndarray", "npscalar" or "bytes".

Damage is detected rather than misread: the file uses the latest HDF5 format
(checksummed metadata) and array data carries Fletcher-32 checksums.
"""

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from mpi_afl.storage.atomic import allocate, atomic_write

FORMAT = "mpi_afl-checkpoint"
FORMAT_VERSION = 1
_INDEX = "__index__"
_PLAIN_SCALARS = (type(None), bool, int, float, str)
# Same-width integer types for tensor dtypes that numpy cannot hold (bfloat16, float8...).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class CheckpointError(Exception):
    """A checkpoint file is missing, damaged, foreign or of another format version."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` (nested dicts/lists of tensors, arrays and plain values) to `path` atomically.

    Raises TypeError, naming the entry, for a value it cannot store; the old
    file at `path` is then left untouched and no temporary file remains."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    state = _on_host(state)   # device copies first: an error there is not a storage error
    try:
        with atomic_write(path) as tmp:
            _reserve(tmp, stored_bytes(state))
            # libver="latest": checksummed metadata, so damage is reported instead of misread.
            with h5py.File(tmp, "w", libver="latest") as f:
                _put_str(f, "format", FORMAT)
                f.attrs["format_version"] = FORMAT_VERSION
                _write_container(f, state, "state")
    except RuntimeError as e:   # HDF5 reports a failed write as RuntimeError; callers handle storage errors
        raise OSError(f"HDF5 could not write {path}: {str(e).splitlines()[0]}") from e


# HDF5 bytes per stored object beyond its data (object header, chunk index, Fletcher-32 sums) and per file
# (superblock, root group): generous bounds (an object takes a few hundred bytes); tests/test_checkpoint.py
# checks that stored_bytes() bounds the file for many small objects, large arrays and every leaf kind.
_OBJECT_BYTES = 4096
_FILE_BYTES = 64 * 1024


def stored_bytes(state: dict) -> int:
    """An upper bound of the size of `state`'s checkpoint file."""
    total, stack = _FILE_BYTES, [state]
    while stack:
        container = stack.pop()
        values = container.values() if isinstance(container, dict) else container
        total += _OBJECT_BYTES + len(json.dumps(list(container.keys()) if isinstance(container, dict) else []))
        for value in values:
            if isinstance(value, (dict, list, tuple)) and not _is_plain(value):
                stack.append(value)
            elif isinstance(value, torch.Tensor):
                total += _leaf_bytes(value.numel() * value.element_size())
            elif isinstance(value, bytes):
                total += _leaf_bytes(len(value))
            elif isinstance(value, (np.ndarray, np.generic)):
                total += _leaf_bytes(np.asarray(value).nbytes)
            else:
                total += len(json.dumps(value, default=str)) + 16
    return total


def _leaf_bytes(nbytes: int) -> int:
    """A dataset's data plus its object header, and 1/64 for the chunk index and the Fletcher-32 sums of a
    large array (h5py's automatic chunks are at least 8 KiB, each with a ~40-byte index entry and a sum)."""
    return _OBJECT_BYTES + nbytes + nbytes // 64


def _on_host(value):
    """`value` with every tensor moved to the host (CPU tensors are returned as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_host(v) for v in value)
    return value


def _reserve(tmp: Path, nbytes: int) -> None:
    """Create `tmp` with `nbytes` allocated, so that a full disk (or quota) is an OSError here, before HDF5
    writes: HDF5 that meets a full disk half-way leaves its library state broken, and the process then
    segfaults at exit (seen with h5py 3 on a full tmpfs). h5py's "w" then truncates the file and writes into
    the space just given back; only another process filling the disk in that moment can still fail it.
    Without posix_fallocate (macOS) the file system's free space is checked instead (quotas then unseen)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        allocate(fd, 0, max(nbytes, 1))
    finally:
        os.close(fd)



def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; tensors are moved to `map_location`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path}: not an HDF5 file, or truncated/corrupt ({e})") from e
    with f:
        try:
            marker = _get_str(f, "format")
            if marker != FORMAT:
                raise CheckpointError(
                    f"{path} is not an mpi_afl checkpoint: root attribute format={marker!r}, expected {FORMAT!r}")
            version = f.attrs.get("format_version")
            if version != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path} has checkpoint format_version {version}; this code reads version {FORMAT_VERSION}")
            return _read_container(f, map_location)
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} is damaged or incomplete: {e!r}") from e


# Strings are stored as fixed-length attributes, which live inside the checksummed object
# header; variable-length strings live in a global heap whose damage made HDF5 spin forever
# in a corruption test instead of failing.
def _put_str(obj: h5py.HLObject, key: str, value: str) -> None:
    obj.attrs[key] = np.bytes_(value.encode())


def _get_str(obj: h5py.HLObject, key: str) -> str | None:
    value = obj.attrs.get(key)
    return value.decode() if isinstance(value, bytes) else value


def _is_plain(value: Any) -> bool:
    """True for values JSON stores exactly: scalars, lists and str-keyed dicts of them (no tuples)."""
    if type(value) in _PLAIN_SCALARS:
        return True
    if type(value) is list:
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _is_plain(v) for k, v in value.items())
    return False


def _check_key(key: Any, where: str) -> None:
    if type(key) not in (str, int):
        raise TypeError(f"{where}: checkpoint dict keys must be str or int, got {key!r}")
    if type(key) is str and (not key or "/" in key or key in (".", _INDEX)):
        raise ValueError(f"{where}: key {key!r} cannot name an HDF5 object (empty, '/', '.' or {_INDEX!r})")


def _write_container(group: h5py.Group, container: dict | list | tuple, where: str) -> None:
    if isinstance(container, dict):
        kind, items = "dict", list(container.items())
    else:
        kind, items = ("tuple" if isinstance(container, tuple) else "list"), list(enumerate(container))
    _put_str(group, "kind", kind)
    keys, plain, names = [], {}, set()
    for key, value in items:
        at = f"{where}[{key!r}]"
        _check_key(key, at)
        name = str(key)
        if name in names:
            raise ValueError(f"{at}: keys {key!r} and {name!r} would share the HDF5 name {name!r}")
        names.add(name)
        keys.append(key)
        if _is_plain(value):
            plain[name] = value
        elif isinstance(value, (dict, list, tuple)):
            _write_container(group.create_group(name), value, at)
        else:
            _write_leaf(group, name, value, at)
    index = json.dumps({"keys": keys, "plain": plain}).encode()
    group.create_dataset(_INDEX, data=np.frombuffer(index, np.uint8), fletcher32=True)


def _write_leaf(group: h5py.Group, name: str, value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{where}: cannot store a {value.layout} tensor; convert it to dense first")
        t = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        try:
            data = t.numpy()
        except TypeError:  # numpy has no such dtype: keep the bits
            data = t.view(_BITS[t.element_size()]).numpy()
        strings = {"kind": "tensor", "dtype": str(t.dtype).removeprefix("torch.")}
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "OU":
            raise TypeError(f"{where}: cannot store a numpy array of dtype {value.dtype} (object/unicode)")
        data, strings = value, {"kind": "ndarray"}
    elif isinstance(value, np.generic):
        data, strings = value, {"kind": "npscalar"}
    elif isinstance(value, bytes):
        data, strings = np.frombuffer(value, dtype=np.uint8), {"kind": "bytes"}
    else:
        raise TypeError(
            f"{where}: cannot store a value of type {type(value).__name__} in a checkpoint; allowed: torch "
            "tensors, numpy arrays/scalars, bytes, None, bool, int, float, str, and dicts/lists/tuples of these")
    # Checksum the array data too (needs chunked storage, so not for scalars and empty arrays).
    checksum = np.ndim(data) > 0 and np.size(data) > 0
    ds = group.create_dataset(name, data=data, fletcher32=checksum)
    for key, text in strings.items():
        _put_str(ds, key, text)


def _read_container(group: h5py.Group, map_location: str | torch.device) -> dict | list | tuple:
    index = json.loads(group[_INDEX][()].tobytes())
    plain = index["plain"]
    items = []
    for key in index["keys"]:
        name = str(key)
        if name in plain:
            value = plain[name]
        else:
            obj = group[name]
            value = _read_container(obj, map_location) if isinstance(obj, h5py.Group) else _read_leaf(obj, map_location)
        items.append((key, value))
    kind = _get_str(group, "kind")
    if kind == "dict":
        return dict(items)
    values = [v for _, v in items]
    return tuple(values) if kind == "tuple" else values


def _read_leaf(ds: h5py.Dataset, map_location: str | torch.device) -> Any:
    kind = _get_str(ds, "kind")
    if kind == "tensor":
        dtype = getattr(torch, _get_str(ds, "dtype"))
        t = torch.from_numpy(ds[...])  # `[...]` keeps 0-d data an array, not a numpy scalar
        return (t if t.dtype == dtype else t.view(dtype)).to(map_location)
    if kind == "ndarray":
        return ds[...]
    if kind == "npscalar":
        return ds[()]
    if kind == "bytes":
        return ds[()].tobytes()
    raise ValueError(f"dataset {ds.name} has unknown kind {kind!r}")

