"""Progress lines: how far the run is against its stop rules, and when it will end.

Every line is one plain line (no carriage returns: they garble cluster log files) showing the
version as k/N when `run.max_versions` is set, the virtual time as t/T when `run.max_virtual_time`
is set, the wall time (against `run.max_wall_seconds`), the throughput and an ETA. The ETA
extrapolates the wall time per unit of progress so far along the rule that is closest to stopping
the run; with only `run.target_accuracy` there is no ETA ("ETA ?").
"""

from __future__ import annotations

from ..config.schema import RunConfig


def fraction_done(cfg: RunConfig, version: int, virtual: float, wall: float) -> float | None:
    """Progress in [0, 1] along the stop rule closest to ending the run; None when no rule has a total."""
    parts = []
    if cfg.max_versions:
        parts.append(version / cfg.max_versions)
    if cfg.max_virtual_time:
        parts.append(virtual / cfg.max_virtual_time)
    if cfg.max_wall_seconds:
        parts.append(wall / cfg.max_wall_seconds)
    return min(max(parts), 1.0) if parts else None


def eta_seconds(cfg: RunConfig, version: int, virtual: float, wall: float) -> float | None:
    done = fraction_done(cfg, version, virtual, wall)
    if not done:
        return None
    return wall * (1.0 - done) / done


def clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def line(cfg: RunConfig, version: int, virtual: float, wall: float, rate: float | None) -> str:
    """`version 20/100  virtual 31.64/50.00  wall 5.5s  14.4 upd/s  40%  ETA 0:00:08`."""
    versions = f"{version:5d}/{cfg.max_versions}" if cfg.max_versions else f"{version:5d}"
    times = f"{virtual:9.2f}/{cfg.max_virtual_time:g}" if cfg.max_virtual_time else f"{virtual:9.2f}"
    walls = f"{wall:8.1f}s/{cfg.max_wall_seconds:g}s" if cfg.max_wall_seconds else f"{wall:8.1f}s"
    done = fraction_done(cfg, version, virtual, wall)
    percent = f"{100 * done:3.0f}%" if done is not None else "  -"
    rates = f"{rate:7.1f}" if rate is not None else "      -"
    eta = clock_text(eta_seconds(cfg, version, virtual, wall))
    return f"version {versions}  virtual {times}  wall {walls}  {rates} upd/s  {percent}  ETA {eta}"
