"""Which device each rank computes on, and what each rank used.

`pick_device` is collective (every rank calls it): the ranks exchange whether
they see a GPU, so a `run.device=cuda` run that has a rank without one stops on
every rank with the same error, and `auto` says which ranks fall back to the CPU
instead of doing it quietly. `rank_record` is one rank's line in run.h5's
`ranks` attribute and summary.json's `ranks` list: host, device, GPU name and
the peak GPU memory torch allocated on it.
"""

from __future__ import annotations

import torch

from .config import ConfigError


def _gpu_slot(local_rank: int, gpus: int, reserved: list[int], placement: str) -> int:
    """GPU index of a rank on its node. 'server_gpu': the node's local ranks in `reserved` (the server and
    the ranks that distil with it, distill.ranks) get cuda:0.. to themselves, one each, and the other ranks
    of the node share the rest; with no more GPUs than reserved ranks, and on nodes without reserved ranks,
    every rank takes local rank % GPUs."""
    if placement == "server_gpu" and reserved and gpus > len(reserved):
        if local_rank in reserved:
            return reserved.index(local_rank)
        others = local_rank - sum(r < local_rank for r in reserved)   # its index among the other ranks
        return len(reserved) + others % (gpus - len(reserved))
    return local_rank % gpus


def pick_device(kind: str, placement: str, comm, distilling: int = 0) -> tuple[torch.device, list[str]]:
    """(this rank's device, warnings for rank 0 to print); ConfigError on every rank when cuda is impossible.
    `distilling`: ranks 1..distilling distil with rank 0 (distill.ranks) and are placed first as it is."""
    from mpi4py import MPI

    gpus = torch.cuda.device_count() if kind != "cpu" else 0
    seen = comm.allgather((MPI.Get_processor_name(), gpus))
    without = [r for r, (_, n) in enumerate(seen) if n == 0]
    warnings = []
    if kind == "cuda" and without:
        where = ", ".join(f"rank {r} on {seen[r][0]}" for r in without[:8]) + (" ..." if len(without) > 8 else "")
        raise ConfigError(f"config key 'run.device': 'cuda' was asked for but {len(without)} of {len(seen)} "
                          f"rank(s) see no GPU ({where}); check the job's GPU request (--gres/--gpus-per-task) "
                          f"and CUDA_VISIBLE_DEVICES, or use --run.device=auto")
    if kind == "auto" and without and len(without) < len(seen):
        warnings.append(f"run.device=auto: rank(s) {_ranges(without)} see no GPU and compute on the CPU while the "
                        f"others use GPUs; pass --run.device=cuda to make that an error")
    if gpus == 0:
        return torch.device("cpu"), warnings
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    reserved = [r for r, first in enumerate(node.allgather(comm.Get_rank() <= distilling)) if first]
    slot = _gpu_slot(node.Get_rank(), gpus, reserved, placement)
    node.Free()
    if placement == "server_gpu" and reserved and gpus <= len(reserved) and comm.Get_rank() == 0:
        warnings.append(f"run.placement=server_gpu: the server's node has {gpus} GPU(s) for {len(reserved)} "
                        f"distilling rank(s) (the server and distill.ranks), so they share them with the workers")
    return torch.device(f"cuda:{slot}"), warnings


def rank_record(rank: int, device: torch.device, role: str) -> dict:
    """Role ('server', 'distil': a rank of the distillation group, 'worker'), host, device, GPU name and peak
    GPU memory of this rank (peak so far: call it at the end)."""
    from mpi4py import MPI

    record = {"rank": rank, "role": role, "host": MPI.Get_processor_name(), "device": str(device), "gpu_name": "",
              "peak_gpu_bytes": 0}
    if device.type == "cuda":
        record["gpu_name"] = torch.cuda.get_device_name(device)
        record["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return record


def describe(records: list[dict]) -> str:
    """One line: which ranks use which device on which host."""
    groups: dict[tuple[str, str], list[int]] = {}
    for r in records:
        groups.setdefault((r["host"], r["device"] + (f" ({r['gpu_name']})" if r["gpu_name"] else "")),
                          []).append(r["rank"])
    return "; ".join(f"{host} {device}: rank(s) {_ranges(ranks)}" for (host, device), ranks in groups.items())


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def record_ranks(run_log, records: list[dict]) -> None:
    """Store the final rank records (with peak GPU memory) as run.h5's root attribute `ranks` (JSON), replacing
    the one written at the start; the run log is closed by then, so a plain read-write open is allowed."""
    import json

    import h5py

    try:
        with h5py.File(run_log, "r+") as f:
            f.attrs["ranks"] = json.dumps(records)
    except RuntimeError as e:   # HDF5's write failures; the stop's writes handle storage errors (OSError)
        raise OSError(f"HDF5 could not write {run_log}: {str(e).splitlines()[0]}") from e
