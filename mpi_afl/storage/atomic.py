"""Atomic file replacement and space allocation, shared by checkpoints, run logs, summaries and unpacked data
sets (no torch: the results reader imports it).

`atomic_write(path)` is the one way a file is replaced: write the temporary path it yields, and on leaving
the block the file is fsync'ed and renamed over `path`; on any exception the temporary file is removed and
`path` is left as it was. `atomic_write_bytes(path, data)` does it for data in memory.
"""

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A fresh hidden name next to `path`: same file system, so `os.replace` is atomic.
    (Not mkstemp: its 0600 mode would make run files unreadable for the user's group.)"""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; then fsync it, rename it over `path` and fsync the
    directory. The directory fsync makes the rename itself durable: without it a crash right after
    `os.replace` can leave the old directory entry on disk."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.resolve().parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview | str) -> None:
    """Write `data` (text as UTF-8) to `path` with `atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


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
