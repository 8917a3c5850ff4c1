"""Open an HDF5 file for reading in a way that fails on damage instead of hanging.

A run file whose writer is still running, or crashed, is marked "open for
write"; HDF5 opens such a file only as a SWMR reader. A SWMR reader retries a
metadata read whose checksum fails (the writer may be in the middle of an
update), by default 100 times with a growing back-off: on a damaged file that is
hours, a hang for any practical purpose (seen when resuming a run whose run.h5
header had flipped bytes). So:

1. a plain read-only open first: a file that was closed properly (a finished or
   stopped run) opens this way, and damage or truncation fails at once;
2. only for a file marked open for write, a SWMR open with the metadata read
   attempts bounded to READ_ATTEMPTS (about a second on a damaged file, plenty
   for a live writer's updates, which take microseconds).

h5py has no binding for H5Pset_metadata_read_attempts; it is called through
ctypes in the HDF5 library h5py is linked against (a symbol look-up through
h5py's own extension module finds exactly that library).
"""

from __future__ import annotations

import ctypes
import os

import h5py

READ_ATTEMPTS = 10


def open_readonly(path: str | os.PathLike) -> h5py.File:
    """h5py.File(path, "r"), or a bounded SWMR reader for a file still (or last) open for writing.

    Raises OSError from HDF5 for a file that is not HDF5, truncated or damaged."""
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if "already open for write" not in str(e):
            raise
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)   # as h5py.File does: closing the file closes its objects
    _bound_read_attempts(fapl, READ_ATTEMPTS)
    fid = h5py.h5f.open(os.fsencode(os.fspath(path)), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def _bound_read_attempts(fapl: h5py.h5p.PropFAID, attempts: int) -> None:
    setter = ctypes.CDLL(h5py.h5p.__file__).H5Pset_metadata_read_attempts
    setter.argtypes = (ctypes.c_int64, ctypes.c_uint)
    if setter(fapl.id, attempts) < 0:
        raise OSError(f"HDF5 refused H5Pset_metadata_read_attempts({attempts})")
