"""mpi_afl: MPI-based asynchronous federated learning for HPC clusters."""

__version__ = "0.1.0"
