"""Where a run came from, written as run.h5's root attributes: config, versions of the package and its
libraries, git commit, hosts and ranks, start time (docs/design.md "Output")."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .. import __version__
from .. import plugins
from ..config import Config


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_attrs(cfg: Config, size: int, placements: list[dict]) -> dict:
    import h5py
    import mpi4py
    import torch
    from mpi4py import MPI
    return {
        "config": cfg.to_json(), "label": f"{plugins.short_name(cfg.server.algorithm)} s{cfg.run.seed}",
        "package_version": __version__, "git_commit": git_commit(), "world_size": size, "seed": cfg.run.seed,
        "torch_version": str(torch.__version__), "mpi4py_version": mpi4py.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0], "h5py_version": h5py.__version__,
        "hostnames": sorted({p["host"] for p in placements}), "ranks": placements,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
