"""The stages of a run that mpi_afl/train.py calls in order: start-up on rank 0, the build every rank does,
the distillation group, the end of the run, and how errors end every rank."""
