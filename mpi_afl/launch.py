"""Finding the MPI launcher, for the benchmarks and tests that start real mpiexec jobs."""

import shutil
import sys
from pathlib import Path


def mpiexec_path() -> str:
    """The mpiexec next to this Python (the `mpich` extra installs it there), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("mpiexec not found next to the Python executable or on PATH; "
                                "pip install the 'mpich' extra, or load your site's MPI module")
    return found
