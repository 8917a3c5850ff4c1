"""The `mpi-afl` console script: one entry point for every command.

    mpiexec -n 5 mpi-afl train --preset quickstart      (= python -m mpi_afl.train ...)
    mpi-afl report RUN_DIR ... --out plots               (= python -m mpi_afl.report ...)
    mpi-afl export RUN_DIR ... --out csv                 (= python -m mpi_afl.export ...)
    mpi-afl sweep --algorithms fedbuff,afl_dw --seeds 0,1,2 --out sweep   (= python -m mpi_afl.sweep ...)
    mpi-afl --version

Each command's module is imported only when it runs, so `report` and `export` never load torch (`sweep` checks
every run's config as `train` does, with the algorithm's own rules, so it imports the algorithm).
"""

from __future__ import annotations

import importlib
import sys

from . import __version__

# command -> (module, arguments put before the user's, what it does)
COMMANDS = {
    "train": ("mpi_afl.train", [], "run a job: under mpiexec/srun, or as one process"),
    "report": ("mpi_afl.report", [], "plots (PNG/PDF/SVG) and a summary table of run directories"),
    "export": ("mpi_afl.export", [], "write runs as CSV or TensorBoard event files"),
    "sweep": ("mpi_afl.sweep", [], "run a grid (algorithms x seeds x overrides) locally or as a SLURM array"),
}


def usage() -> str:
    lines = [f"usage: mpi-afl {{{','.join(COMMANDS)}}} [ARGS ...] | --version", "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "`mpi-afl COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"mpi_afl {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"mpi-afl: error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, prefix, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main([*prefix, *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
