"""Rank 0's start-up: the command line (and with it the console's level, mpi_afl/console.py) and the run
directory (locked, checked, then its first files).

Nothing is written into the directory before every check has passed: a refused run or resume leaves it as it
was. This module imports no torch, so that the stop signals armed by train.main() come before anything slow.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .. import console, plugins, signals
from ..config import Config, ConfigError, parse_args
from ..storage.lock import LockError, RunLock
from .errors import EXIT_CONFIG, stopped_at_start


@dataclass
class Setup:
    """What rank 0's start-up hands to the rest of the run."""
    result: tuple = ("exit", 0)          # ('ok', cfg_dict) or ('exit', code), broadcast to every rank
    resume_state: dict | None = None     # the checkpoint, when resuming
    run_id: str = ""
    new_log: bool = False                # --new-log: the resumed run starts a fresh run.h5
    lock: RunLock | None = None          # held on the run directory until the run ends
    final_error: str = ""                # the run's final files were not all written (storage/final_writes.py)
    created: Path | None = None          # the run directory, if this start created it

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.created is not None and self.created.is_dir() and not any(self.created.iterdir()):
            self.created.rmdir()   # a start refused before writing anything leaves no trace

    def exit(self, code: int) -> "Setup":
        self.release()
        self.result = ("exit", code)
        return self


def rank0_setup(argv) -> Setup:
    """Parse the command line, lock the output directory and check it on rank 0."""
    from ..storage.checkpoint import CheckpointError, load_checkpoint
    from ..server.state import check_server_format
    from ..storage.rundir import (RunDirError, check_resume, check_run_files, holds_a_run, new_run_id,
                                  no_checkpoint_advice)
    checkpoint = {}
    setup = Setup()

    def resume_config(directory: str) -> dict:
        if not (Path(directory) / "checkpoint.h5").exists() and holds_a_run(Path(directory)):
            raise ConfigError(f"cannot resume: {no_checkpoint_advice(Path(directory))}")
        try:
            checkpoint["state"] = load_checkpoint(Path(directory) / "checkpoint.h5")
            check_server_format(checkpoint["state"])   # before anything else reads the state
            return json.loads(checkpoint["state"]["config"])
        except CheckpointError as e:
            raise ConfigError(f"cannot resume from {directory}: {e}") from None
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"cannot resume from {directory}: its checkpoint.h5 holds no run config") from None

    try:
        cfg, args = parse_args(argv, resume_config)
        console.set_level(cfg.run.log_level)
        if args.print_config:
            _print_closed_ok(json.dumps(cfg.to_dict(), indent=2) + "\n" if args.format == "json" else cfg.to_toml())
            return setup.exit(0)
        out = Path(cfg.run.out or _default_out(cfg))
        if out.exists() and not out.is_dir():
            raise ConfigError(f"config key 'run.out': {out} is a file, not a directory")
        try:
            if not out.exists():
                setup.created = out
            out.mkdir(parents=True, exist_ok=True)
            setup.lock = RunLock(out)   # before any check of the files: another run may be writing them
        except OSError as e:
            raise ConfigError(f"config key 'run.out': cannot write to {out}: {e.strerror}") from None
        check_run_files(out)
        if not args.resume and holds_a_run(out) and not cfg.run.overwrite:
            if not (out / "checkpoint.h5").exists():
                raise ConfigError(no_checkpoint_advice(out))
            raise ConfigError(f"output directory {out} already holds a run; continue it with --resume {out}, "
                              f"choose another --out, or pass --run.overwrite=true to replace it")
        setup.run_id = check_resume(out, checkpoint["state"], args.new_log) if args.resume else new_run_id()
        cfg.run.out = str(out)
        plugins.check(cfg)
        if signals.received() is not None:
            stopped_at_start(signals.received())
            return setup.exit(0)
        setup.result = ("ok", cfg.to_dict())
        setup.resume_state, setup.new_log = checkpoint.get("state"), args.new_log
        return setup
    except (ConfigError, LockError, RunDirError) as e:
        console.error(str(e))
        return setup.exit(EXIT_CONFIG)
    except SystemExit as e:  # --help, or argparse's own usage errors
        return setup.exit(e.code if isinstance(e.code, int) else 0)
    except BaseException:
        setup.release()
        raise


def _print_closed_ok(text: str) -> None:
    """Print to stdout; a reader that closed it early (`--print-config | head`) is not an error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so the exit's flush does not fail


def _default_out(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    algorithm, dataset = plugins.short_name(cfg.server.algorithm), plugins.short_name(cfg.data.dataset)
    return f"runs/{algorithm}-{dataset}-{cfg.run.clock}-s{cfg.run.seed}-{stamp}"


def prepare_run_dir(cfg: Config, out: Path, new_log: bool, clients: str) -> None:
    """The start's first writes: clear what a killed run left mid-write, set an old run log aside
    (--new-log), then record the config, the command line and the clients' data (`clients`: clients.txt)."""
    from ..storage.rundir import remove_temp_files, set_aside_log
    for tmp in remove_temp_files(out):
        console.server.info(f"removed {tmp.name}, left by a run stopped while writing it")
    if new_log and (aside := set_aside_log(out)):
        console.server.info(f"--new-log: the old run log is kept as {aside}")
    _describe_run(cfg, out)
    (out / "clients.txt").write_text(clients)


def _describe_run(cfg: Config, out: Path) -> None:
    """How the run was made, next to its results: the resolved config as TOML (`--config` reads it back)
    and one command line per start (the first and every --resume)."""
    (out / "config.toml").write_text(f"# resolved config of {out}, written by mpi_afl {__version__}\n"
                                     + cfg.to_toml())
    # surrogateescape: an argument that is not UTF-8 (a --config path) is written back as its original bytes
    with open(out / "command.txt", "a", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  {shlex.join(sys.orig_argv)}\n")
