#!/usr/bin/env bash
# Run mpi_afl on one machine (a workstation, or a node you are logged into).
#   jobs/local.sh [RANKS] [mpi_afl.train options...]
# Example: jobs/local.sh 5 --algorithm fedrevive --preset paper_28x28 --out runs/fr
# Ranks beyond the core count are fine (oversubscription): every rank polls with a back-off instead of
# busy-waiting, and the virtual clock pins torch to one thread per rank.
# Ctrl-C, SIGTERM or SIGUSR1 to this script reach every rank (MPICH's mpiexec forwards INT, TERM and USR1):
# the server writes OUT/checkpoint.h5 and every rank exits 0. Continue with: jobs/local.sh N --resume OUT
set -euo pipefail
RANKS=${1:-5}
shift || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec mpiexec -n "$RANKS" python -m mpi_afl.train "$@"
