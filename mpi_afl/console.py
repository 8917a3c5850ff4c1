"""A run's lines on the console and in OUT/server.log: one logger tree, `mpi_afl` (docs/design.md "Console
and server.log").

Every line is `TIME LEVEL TAG MESSAGE`:

    2026-12-08 01:02:03 INFO [server] version    20/100  virtual     31.64  wall  4.8s ...
    2026-12-08 01:02:09 WARNING [server] warning: the checkpoint of version 30 was not written ...

TIME is the local time to the second; LEVEL is DEBUG, INFO, WARNING or ERROR; TAG is `[server]` for rank 0's
lines about the run (logger `mpi_afl.server`) and `mpi_afl:` for the command's own (logger `mpi_afl`). Lines
below ERROR go to stdout from the level of `run.log_level` on: "info", "quiet" (`--quiet`: warnings only) or
"verbose" (`--verbose`: also the DEBUG lines, one per arrival).

An error line is the command's last word before a non-zero exit (train.py lists the codes); on stderr it is the
plain `mpi_afl: error: ...` of a command-line tool, at start-up as at the end of a run, so that a user and a job
script find it the same way whenever it happens; a crash's traceback comes just before it.

OUT/server.log, opened by rank 0 once the run directory is prepared (appended to on resume), gets every line at
INFO and above whatever the console shows (with "verbose" the DEBUG lines too), errors and tracebacks with TIME
and LEVEL like every line. The handlers are installed when this module is imported, so a run's modules print the
same lines in `mpi-afl train` and in a test that calls them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LEVELS = {"quiet": logging.WARNING, "info": logging.INFO, "verbose": logging.DEBUG}   # run.log_level

tool = logging.getLogger("mpi_afl")
server = logging.getLogger("mpi_afl.server")


class _Line(logging.Formatter):
    """TAG MESSAGE, after TIME LEVEL when `stamped`; a crash's traceback (`extra={"traceback": ...}`) first."""

    def __init__(self, stamped: bool):
        super().__init__()
        self.stamped = stamped

    def format(self, record: logging.LogRecord) -> str:
        tag = "mpi_afl:" if record.name == tool.name else f"[{record.name.rpartition('.')[2]}]"
        line = f"{tag} {record.getMessage()}"
        if self.stamped:
            line = f"{self.formatTime(record, '%Y-%m-%d %H:%M:%S')} {record.levelname} {line}"
        return getattr(record, "traceback", "") + line


class _Console(logging.Handler):
    """sys.stdout or sys.stderr as they are when the line is written (a test's capture replaces them)."""

    def __init__(self, errors: bool):
        super().__init__(logging.ERROR if errors else logging.INFO)
        self.errors = errors
        self.setFormatter(_Line(stamped=not errors))
        if not errors:
            self.addFilter(lambda record: record.levelno < logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if self.errors else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _RunLog(logging.FileHandler):
    """OUT/server.log. A full disk or a file system gone read-only must not make every line fail: the console
    goes on, the copy stops (the run's own warning or error line says what could not be written)."""

    stopped = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.stopped:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            self.stopped = True
        else:
            super().handleError(record)


_stdout, _stderr = _Console(errors=False), _Console(errors=True)
tool.handlers[:] = [_stdout, _stderr]
tool.propagate = False   # a plug-in's logging.basicConfig() must not print every line twice
tool.setLevel(logging.INFO)


def set_level(name: str) -> None:
    """The console's level, run.log_level: "info", "quiet" or "verbose"."""
    _stdout.setLevel(LEVELS[name])
    tool.setLevel(min(LEVELS[name], logging.INFO))
    for handler in tool.handlers:
        if isinstance(handler, _RunLog):
            handler.setLevel(tool.level)


def log_to(path: Path) -> None:
    """From now on every line at INFO and above (DEBUG with "verbose") is also appended to `path`."""
    close_log()
    handler = _RunLog(path, mode="a", encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(_Line(stamped=True))
    handler.setLevel(tool.level)
    tool.addHandler(handler)


def close_log() -> None:
    for handler in [h for h in tool.handlers if isinstance(h, _RunLog)]:
        tool.removeHandler(handler)
        try:
            handler.close()
        except OSError:   # its last flush, on a full disk
            pass


def error(text: str) -> None:
    """The error line `mpi_afl: error: TEXT`."""
    tool.error(f"error: {text}")
