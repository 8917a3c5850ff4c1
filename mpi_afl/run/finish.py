"""The end of a run on rank 0: every step and every write, in this order (storage/final_writes.py says why).

1. checkpoint.h5, as soon as the loop has ended and before the workers are stopped: after a signal the job
   may be killed any moment now, and only the checkpoint lets the run continue (also after a normal stop, so
   `--resume` can extend the run). It is taken between two updates, as every checkpoint, and before the
   off-schedule final evaluation (a resumed run drops that row, as an uninterrupted run never had it); jobs
   still in flight are in it and run again on resume;
2. the workers and the distillation group stopped, the final evaluation, run.h5's rows;
3. every rank's record gathered, then run.h5's rank records, summary.json and model.pt;
4. one line naming each file not written (exit 1), or the done line and the run's warnings (exit 3 if it
   diverged).
"""

from __future__ import annotations

import json

from .. import console
from ..config import Config
from ..storage.final_writes import FinalWrites
from .errors import EXIT_DIVERGED, EXIT_FAILED
from .startup import Setup


def finish(comm, server, device, setup: Setup) -> int:
    """Rank 0, after `server.run()`: the run's final files, then how it ended; collective (gathers every rank's
    record). A file not written leaves its line in `setup.final_error`, printed as the run's last line."""
    from ..placement import rank_record, record_ranks
    from ..storage.atomic import atomic_write_bytes

    writes = FinalWrites(server.out_dir)
    summary = stop_server(server, writes)
    gathered = comm.gather(None, root=0)[1:] if comm.Get_size() > 1 else []
    workers = [stats for stats, _ in gathered]
    summary["ranks"] = [rank_record(0, device, "server")] + [record for _, record in gathered]
    members = [stats for stats in workers if stats.get("role") == "distil"]
    workers = [stats for stats in workers if stats.get("role") != "distil"]
    if workers:
        summary["worker_idle_fraction"] = sum(w["idle_seconds"] for w in workers) / sum(w["wall_seconds"] for w in workers)
        summary["workers"] = workers
    if members:
        summary["distill_ranks"] = members
    if "run.h5" not in writes.failed:
        writes.attempt("run.h5", lambda path: record_ranks(path, summary["ranks"]))
    writes.attempt("summary.json", lambda path: atomic_write_bytes(path, json.dumps(summary, indent=2) + "\n"))
    writes.attempt("model.pt", server.save_model)
    if (line := writes.error_line(server.checkpoint_version)) is not None:
        setup.final_error = line   # printed by train.run(), after the lock's release, as the run's last line
        return EXIT_FAILED
    out = server.out_dir
    console.server.info(f"done ({server.stop_reason}): {summary['versions']} versions, "
                        f"final acc {summary['final_accuracy']:.4f}, best {summary['best_accuracy']:.4f}, "
                        f"{summary['updates_rejected']} rejected, {summary['wall_seconds']:.1f}s -> "
                        f"{out / 'summary.json'}")
    if server.stop_reason == "signal":
        console.server.info(f"continue it with: mpi-afl train --resume {out}")
    for note in never_distilled(server.cfg, summary):
        console.server.warning(f"warning: {note}")
    if server.diverged:
        console.error(f"the run diverged: {server.diverged}; stopped at version {server.version}, the last "
                      f"finite one (checkpoint, summary.json and model.pt written); try a smaller client.lr or "
                      f"server.lr")
        return EXIT_DIVERGED
    return 0


def stop_server(server, writes: FinalWrites) -> dict:
    """Steps 1 and 2: the final checkpoint, the workers stopped, the final evaluation and run.h5's rows; the
    server's summary. Every write is attempted and recorded in `writes`."""
    from ..storage.checkpoint import save_checkpoint

    server.stopped = True   # from here on nothing is received or sent (the evaluations below would pump)
    if writes.attempt("checkpoint.h5", lambda path: save_checkpoint(path, server.checkpoint_state())):
        server.checkpoint_version = server.version
    server.transport.stop()
    server.group.stop()
    evals = server.evaluator.evals
    if not evals or evals[-1].version != server.version:
        server.evaluate()
        server.finish_evaluations()
    writes.attempt("run.h5", lambda _: server.log.close())
    return server.summary()


def never_distilled(cfg: Config, summary: dict) -> list[str]:
    """A distilling algorithm's run that ended before KD was ever applied: it ran as its backbone alone."""
    d, algorithm = cfg.distill, cfg.server.algorithm
    if algorithm not in ("fedrevive", "fedecho") or summary["algorithm_stats"].get("kd_applied"):
        return []
    if algorithm == "fedecho" and cfg.echo.kd_step == 0:
        return []
    return [f"{algorithm} never applied its distillation: the run ended at version {summary['versions']}, and KD "
            f"starts after distill.warmup_versions = {d.warmup_versions} (synthesis from distill.freeze_versions = "
            f"{d.freeze_versions}); run longer or lower those keys"]
