"""Sliced computations: generators that yield between slices (a KD iteration, a generator step, an
evaluation batch) so the server loop can receive and dispatch in between (algorithms/base.py)."""

from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")


def drain(steps: Generator[None, None, T]) -> T:
    """Run a sliced computation to its end, without pausing, and return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
