"""The MPI launcher: finding mpiexec (benchmarks, tests), and checking that it started one world."""

import os
import shutil
import sys
from pathlib import Path

# How launchers tell each process how many tasks they started, with the matching rank variable.
# SLURM_STEP_NUM_TASKS is set by srun only (SLURM_NTASKS also lives in the batch script's environment).
TASK_COUNT_VARS = {"SLURM_STEP_NUM_TASKS": "SLURM_PROCID", "PMI_SIZE": "PMI_RANK",
                   "OMPI_COMM_WORLD_SIZE": "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE": "MV2_COMM_WORLD_RANK"}


def mpiexec_path() -> str:
    """The mpiexec next to this Python (the `mpich` extra installs it there), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("mpiexec not found next to the Python executable or on PATH; "
                                "pip install the 'mpich' extra, or load your site's MPI module")
    return found


def world_mismatch(world_size: int, library: str, environ=os.environ) -> tuple[str, bool] | None:
    """(message, this task is the launcher's first) when the launcher started several tasks but MPI sees a
    world of one: every task would then run alone as its own server."""
    if world_size != 1:
        return None
    for count_var, rank_var in TASK_COUNT_VARS.items():
        try:
            tasks = int(environ.get(count_var, "1"))
        except ValueError:
            continue
        if tasks > 1:
            break
    else:
        return None
    if count_var == "SLURM_STEP_NUM_TASKS":
        cause = ("srun did not connect the tasks through a PMI plug-in this MPI understands (SLURM's MpiDefault "
                 "is used when srun gets no --mpi). Fix: srun --mpi=pmi2 (MPICH, the mpich wheel, Intel MPI) or "
                 "--mpi=pmix (Open MPI); `srun --mpi=list` shows what the site has; jobs/*.sbatch take "
                 "MPI_AFL_SRUN_MPI")
    else:
        cause = ("mpi4py is linked to another MPI library than the launcher's (e.g. the mpich wheel in the venv "
                 "shadowing a module's MPI, or mpiexec from another installation). Fix: launch with the mpiexec "
                 "of the library shown here, or rebuild mpi4py against the launcher's MPI (README \"Running on "
                 "a cluster\")")
    library = " ".join(library.split())
    message = (f"the launcher started {tasks} tasks ({count_var}={tasks}) but MPI sees a world of 1 "
               f"(MPI library: {library}): each task would train alone. Likely cause: {cause}")
    return message, environ.get(rank_var, "0") == "0"
