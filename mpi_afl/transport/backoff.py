"""Idle back-off for poll loops.

MPICH's blocking calls busy-poll, which starves the other ranks when cores
are oversubscribed (2 cores, 5 ranks here). Every wait in mpi_afl is a
nonblocking test plus a sleep that starts at 50 us and doubles up to 2 ms
while nothing happens, so an idle rank costs almost no CPU and a busy one
reacts within microseconds.
"""

import time

IDLE_MIN, IDLE_MAX = 5e-5, 2e-3   # seconds


class Backoff:
    def __init__(self):
        self.delay = IDLE_MIN

    def idle(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, IDLE_MAX)

    def reset(self) -> None:
        self.delay = IDLE_MIN
