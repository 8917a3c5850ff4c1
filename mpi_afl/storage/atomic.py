"""Atomic file replacement and space allocation, shared by checkpoints and run logs (no torch: the results
reader imports it)."""

import errno
import os
import secrets
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A fresh hidden name next to `path`: same file system, so `os.replace` is atomic.
    (Not mkstemp: its 0600 mode would make run files unreadable for the user's group.)"""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync `tmp`, rename it over `path` and fsync the directory.

    The directory fsync makes the rename itself durable: without it a crash
    right after `os.replace` can leave the old directory entry on disk."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(Path(path).resolve().parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview | str) -> None:
    """Write `data` (text as UTF-8) to `path` atomically: a temporary file, then `atomic_replace`. On any
    failure (an OSError such as a full disk) the old file is left as it was and the temporary file is gone."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        atomic_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def allocate(fd: int, offset: int, nbytes: int) -> None:
    """Allocate `nbytes` of the open file `fd` from `offset`, so that later writes there cannot meet a full
    disk: posix_fallocate where the platform has it (quotas count too), else an OSError(ENOSPC) when the file
    system's free space is short (macOS)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, offset, nbytes)
        return
    st = os.fstatvfs(fd)
    if st.f_bavail * st.f_frsize < nbytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
