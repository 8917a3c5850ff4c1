"""The distillation group (distill.ranks, distill/group.py): its checks at start-up, its communicator, and what a
distilling rank runs instead of the worker loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Config, ConfigError

if TYPE_CHECKING:
    from .build import Built


def check_group(cfg: Config, size: int) -> None:
    """distill.ranks must leave a worker, name an algorithm that can use a group, and give every rank a teacher."""
    from ..algorithms import algorithm_class
    d = cfg.distill.ranks
    if not d:
        return
    if d >= size - 1:
        raise ConfigError(f"config key 'distill.ranks': {d} distilling rank(s) besides the server leave no worker "
                          f"among {size} rank(s); allowed: 0..{max(size - 2, 0)} (or start more ranks)")
    algorithm = algorithm_class(cfg.server.algorithm)
    if not algorithm.group_methods:
        raise ConfigError(f"config key 'distill.ranks': server.algorithm = {cfg.server.algorithm!r} does not distil "
                          f"on the server, so it has nothing to share; distill.ranks applies to fedrevive, "
                          f"dd_fedrevive and fedecho; use 0")
    teachers = cfg.echo.teachers if cfg.server.algorithm == "fedecho" else cfg.distill.teachers
    key = "echo.teachers" if cfg.server.algorithm == "fedecho" else "distill.teachers"
    if d + 1 > teachers:
        raise ConfigError(f"config key 'distill.ranks': {d + 1} distilling ranks for {key} = {teachers} teachers "
                          f"would leave a rank without a teacher; allowed: 0..{teachers - 1}")


def distillation_group(comm, distilling: int):
    """Ranks 0..distilling on their own communicator (collective: every rank calls it); None without a group."""
    if not distilling:
        return None
    from mpi4py import MPI

    from ..distill.group import Group
    sub = comm.Split(0 if comm.Get_rank() <= distilling else MPI.UNDEFINED, comm.Get_rank())
    return Group(sub) if sub != MPI.COMM_NULL else None


def serve_group(b: Built) -> dict:
    """A distilling rank: the run's algorithm, built as on the server, runs the server's distillation calls."""
    from ..algorithms import algorithm_class
    from ..data.partition import class_histograms
    from ..distill.group import serve
    from ..models import flat
    from ..server.context import algorithm_context, check_images
    cfg, device = b.cfg, b.device
    ctx = algorithm_context(cfg, device, flat.flatten(b.model).to(device), b.model, b.make_model, b.splits,
                            class_histograms(b.parts, b.labels, b.splits.info.num_classes), b.group,
                            **check_images(b.splits, cfg.distill.kd_check_images, device))   # a share of the KD check
    return serve(b.group, algorithm_class(cfg.server.algorithm)(cfg, ctx), ctx)
