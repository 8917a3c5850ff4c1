"""What every rank builds before its role starts, with a start-up point after each step that can fail (data,
device, splits, partition, the run directory's first files), and on rank 0 the server wired to its transport,
run log and trackers.

Every rank builds the same data, partition and initial model from the seed; a failure on any rank stops
every rank with exit 2 (errors.startup_point).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import __version__, console
from ..config import Config, ConfigError
from .errors import startup_point
from .group import check_group, distillation_group
from .provenance import run_attrs
from .startup import Setup, prepare_run_dir


@dataclass
class Built:
    """One rank's parts of the run."""
    cfg: Config
    device: object              # torch.device
    placement_notes: list[str]  # warnings about the device placement (placement.py)
    splits: object              # data/datasets.py Splits
    labels: object              # the training split's labels (numpy)
    parts: list                 # each client's sample indices
    make_model: object          # a fresh model on `device`
    model: object               # the initial global model, the same on every rank
    runner: object              # client/runner.py JobRunner
    role: str                   # "server", "distil" or "worker"
    placements: list[dict]      # every rank's placement record
    group: object               # the distillation group (distill/group.py), None outside it


def build(comm, cfg: Config, setup: Setup) -> Built:
    """Collective: data, device, splits, partition, then (rank 0) the run directory's first files, the model,
    the job runner, every rank's role and placement, and the distillation group."""
    import torch

    from ..client.runner import JobRunner
    from ..data.datasets import DataError, DataNotFoundError, load_splits, prepare
    from ..data.partition import partition, summary_lines
    from ..models import build_model
    from ..placement import pick_device, rank_record

    rank, size = comm.Get_rank(), comm.Get_size()
    d = cfg.data
    # Data: rank 0 fetches or unpacks files while the others wait, then everyone loads the same splits.
    failure = None
    if rank == 0:
        try:
            prepare(d.dataset, d.root or None, download=d.download)
        except DataNotFoundError as e:
            failure = str(e)
    startup_point(comm, failure)
    try:
        device, placement_notes = pick_device(cfg.run.device, cfg.run.placement, comm, cfg.distill.ranks)
    except ConfigError as e:   # raised alike on every rank
        failure = str(e)
    startup_point(comm, failure)
    try:
        splits = load_splits(d.dataset, d.root or None, seed=cfg.run.seed, val_fraction=d.val_fraction,
                             test_fraction=d.test_fraction, kd_fraction=d.kd_fraction)
    except (DataNotFoundError, DataError) as e:
        failure = str(e)
    startup_point(comm, failure)
    labels = splits.train_y.numpy()
    try:
        check_split_sizes(cfg, len(labels))
        check_group(cfg, size)
        parts = partition(labels, d.num_clients, d.partition, seed=cfg.run.seed, num_classes=splits.info.num_classes,
                          alpha=d.alpha, shards_per_client=d.shards_per_client,
                          samples_per_client=d.samples_per_client)
    except (ConfigError, ValueError) as e:
        failure = str(e)
    startup_point(comm, failure)
    out = Path(cfg.run.out)
    if rank == 0:   # every check has passed: only now is anything written into the run directory
        try:
            prepare_run_dir(cfg, out, setup.new_log,
                            "\n".join(summary_lines(parts, labels, splits.info.num_classes)) + "\n")
        except OSError as e:
            failure = f"config key 'run.out': cannot write to {out}: {e.strerror or e}"
    startup_point(comm, failure)
    info = splits.info

    def make_model() -> torch.nn.Module:
        return build_model(cfg.model.name, in_channels=info.channels, image_size=info.image_size,
                           num_classes=info.num_classes, norm=cfg.model.norm).to(device)

    torch.manual_seed(cfg.run.seed)   # the initial global model is the same on every rank and run
    model = make_model()
    runner = JobRunner(cfg, make_model(), splits.train_x.to(device), splits.train_y.to(device),
                       [torch.as_tensor(p, dtype=torch.long, device=device) for p in parts])

    distilling = cfg.distill.ranks   # ranks 1..distilling distil with the server (distill/group.py)
    role = "server" if rank == 0 else "distil" if rank <= distilling else "worker"
    placements = comm.allgather(rank_record(rank, device, role))
    group = distillation_group(comm, distilling)
    return Built(cfg, device, placement_notes, splits, labels, parts, make_model, model, runner, role, placements,
                 group)


def wire_server(comm, b: Built, setup: Setup):
    """Rank 0: the run's lines copied to OUT/server.log, the transport, the run's description and warnings, the run
    log and its trackers, and the server (resumed from the checkpoint when resuming)."""
    from ..data.partition import class_histograms
    from ..placement import describe
    from ..server.loop import Server, ServerSetup
    from ..storage import tracking
    from ..storage.runlog import RunLog
    from ..transport.local import LocalTransport
    from ..transport.mpi import ServerMPI

    cfg, d, size, out = b.cfg, b.cfg.data, comm.Get_size(), Path(b.cfg.run.out)
    distilling = cfg.distill.ranks
    console.log_to(out / "server.log")
    transport = (ServerMPI(comm, b.runner.size, cfg.server.queue_depth, first_worker=distilling + 1) if size > 1
                 else LocalTransport(b.runner.run))
    sizes = [len(p) for p in b.parts]
    say = console.server
    say.info(f"mpi_afl {__version__}: {cfg.server.algorithm} on {d.dataset} ({cfg.model.name}, {b.runner.size:,} "
             f"floats), {d.num_clients} clients ({min(sizes)}-{max(sizes)} samples), K={cfg.server.concurrency}, "
             f"{size} rank(s), {cfg.run.clock} clock, device {b.device}, out {out}")
    say.info(f"placement: {describe(b.placements)}")
    if distilling:
        say.info(f"distillation: ranks 0-{distilling} distil together (teachers split over {distilling + 1} ranks, "
                 f"distill.ranks = {distilling}); ranks {distilling + 1}-{size - 1} are workers")
    notes = (b.placement_notes + idle_workers(cfg.server.concurrency, size - 1 - distilling)
             + repeated_images(cfg, b.parts))
    for note in notes:
        say.warning(f"warning: {note}")
    resume_state = setup.resume_state
    trackers = tracking.open_trackers(cfg, out)   # live mirrors of run.h5; before it, so a bad store leaves no run
    log = RunLog(out / "run.h5", {**run_attrs(cfg, size, b.placements), "run_id": setup.run_id},
                 flush_seconds=cfg.run.log_flush_seconds, overwrite=cfg.run.overwrite,
                 resume_counts=resume_state["log_counts"] if resume_state and not setup.new_log else None)
    server = Server(cfg, transport, log, ServerSetup(
        model=b.model, make_model=b.make_model, splits=b.splits,
        histograms=class_histograms(b.parts, b.labels, b.splits.info.num_classes), device=b.device, out_dir=out,
        world_size=size, run_id=setup.run_id, group=b.group))
    if resume_state:
        server.load_state_dict(resume_state)
        say.info(f"resumed from {out / 'checkpoint.h5'} at version {server.version}")
    tracking.attach(log, trackers, server.stats)   # run.tensorboard, run.mlflow
    return server


def check_split_sizes(cfg: Config, samples: int) -> None:
    """The partition's demands against the training split's `samples`, named by their config keys."""
    d = cfg.data
    where = f"the training split of {d.dataset} has {samples:,} samples"
    if d.num_clients > samples:
        raise ConfigError(f"config key 'data.num_clients': {d.num_clients:,} clients need at least one sample "
                          f"each, but {where}")
    if d.samples_per_client > samples:
        raise ConfigError(f"config key 'data.samples_per_client': {d.samples_per_client:,} is more than the "
                          f"training split holds ({where}): every client would hold each image several times")
    if d.partition == "shards" and d.num_clients * d.shards_per_client > samples:
        raise ConfigError(f"config key 'data.shards_per_client': {d.num_clients} clients x {d.shards_per_client} "
                          f"shards need at least one sample per shard, but {where}")


def idle_workers(concurrency: int, workers: int) -> list[str]:
    """K jobs in flight keep at most K workers busy."""
    if workers <= concurrency:
        return []
    return [f"server.concurrency = {concurrency} keeps {concurrency} job(s) in flight for {workers} workers: "
            f"{workers - concurrency} worker(s) will never get a job; use --server.concurrency={workers} or more "
            f"(K is part of the algorithm: it changes staleness and results), or start fewer ranks"]


def repeated_images(cfg: Config, parts) -> list[str]:
    """With data.samples_per_client, a client whose class mix asks for more images of a class than the split
    has draws that class's images again: say how often, since it changes what local training sees."""
    import numpy as np
    if not cfg.data.samples_per_client:
        return []
    copies = max(len(p) / len(np.unique(p)) for p in parts)
    if copies <= 1:
        return []
    return [f"data.samples_per_client = {cfg.data.samples_per_client}: some clients hold repeated images (up to "
            f"{copies:.1f} copies per image in one client), as their class mix asks for more images of a class "
            f"than the training split has"]
