"""Cost of run logging on the server's hot path: `arrival()` + `maybe_flush()` per row.

Prints one JSON line: {"bench": "runlog_overhead", "us_per_row": ...}. The time
includes the flushes the loop triggers and the final one in `close()`. The
target is < 2% of a server loop turn at hundreds of updates/s (i.e. well
under 20 us per row).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from mpi_afl.storage.runlog import RunLog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="arrival rows to log (default 100000)")
    parser.add_argument("--flush-seconds", type=float, default=0.05,
                        help="RunLog flush interval; short so the timed loop includes many flushes (default 0.05)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = RunLog(Path(tmp) / "bench.h5", {"bench": "runlog_overhead"}, flush_seconds=args.flush_seconds)
        start = time.perf_counter()
        for i in range(args.rows):
            log.arrival(wall_time=i * 1e-3, virtual_time=i * 2e-3, client=i % 100, rank=1 + i % 16, job=i,
                        base_version=i // 2, version=i // 2 + 1, staleness=i % 7, weight=0.5, loss=1.25,
                        samples=350, bytes=4_000_000, server_seconds=1e-4, compute_seconds=0.01, accepted=True,
                        reason="none")
            log.maybe_flush()
        log.close()
        seconds = time.perf_counter() - start
    print(json.dumps({"bench": "runlog_overhead", "rows": args.rows, "flush_seconds": args.flush_seconds,
                      "us_per_row": round(seconds / args.rows * 1e6, 3)}))


if __name__ == "__main__":
    main()
