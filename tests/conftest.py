"""Session-wide test setup.

One torch thread: the machine's cores are shared by parallel test runs, and
results must never depend on the thread count (the virtual clock's promise).
"""

import pytest
import torch

from runs import FinishedRuns

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory) -> FinishedRuns:
    """The small finished runs of tests/runs.py, each launched once per session, on first use."""
    return FinishedRuns(tmp_path_factory.mktemp("finished_runs"))
