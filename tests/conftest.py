"""Session-wide test setup.

One torch thread: the machine's cores are shared by parallel test runs, and
results must never depend on the thread count (the virtual clock's promise).
"""

import torch

torch.set_num_threads(1)
