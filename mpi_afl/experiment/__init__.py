"""Experiments as data: one experiment.toml per research question (experiments/README.md).

    mpi-afl sweep --experiment experiments/smoke/experiment.toml --out DIR [--parallel N] [--slurm FILE]
    mpi-afl report DIR                                  # tables, DIR/results.jsonl, plots
    mpi-afl report experiments/smoke/results.jsonl      # the same tables from the committed rows alone

experiment.toml:

    [experiment]
    name = "smoke"
    question = "..."                 # the research question, one sentence
    preset = "quickstart"            # every run starts from it
    seeds = [0, 1, 2]

    [settings]                       # config keys for every run, as in a preset: sections and keys
    run.max_virtual_time = 10.0

    [cells.A]                        # a cell: the keys that set the conditions (data, delays, budget)
    label = "alpha 0.5, paper delays"
    data.alpha = 0.5
    # optional: methods = ["fedbuff", ...] (default: every method), seeds = [...] (default: the experiment's)

    [methods.fedbuff]                # a method: its algorithm and its full settings
    label = "FedBuff (B 4, lr 0.5)"
    algorithm = "fedbuff"
    server.buffer_size = 4
    # optional: seeds = [...]

    [metrics]
    names = ["final_accuracy", "best_accuracy", "tail_accuracy", "time_to_target"]
    target = 0.8                     # time_to_target: first evaluation at or above it (virtual time)
    tail_share = 0.25                # tail_accuracy: mean of the evaluations in the last quarter of the budget

    [[comparisons]]                  # registered before the runs
    a = "fedrevive"
    b = "afl_dw"
    metrics = ["final_accuracy", "tail_accuracy"]    # default: [metrics] names
    cells = ["A"]                                    # default: every cell that has both
    rule = { metric = "tail_accuracy", min_difference = 0.01, min_ahead = 4 }   # optional: the success rule

A run's options are, in order (the last wins): the preset, [settings], the cell's keys, the method's keys,
then --seed and --out. Runs go to DIR/<cell>/<method>/s<seed>. The sweep copies experiment.toml into DIR
(a DIR holding another experiment's runs is refused), so `mpi-afl report DIR` knows it.

- definition.py: experiment.toml -> `Experiment` and its runs (`Point`), checked as `train` would check them;
- rows.py: one result row per finished run (DIR/results.jsonl);
- tables.py: the tables, paired comparisons and plots of `mpi-afl report`.

The names below are the package's surface for the sweep and the report; anything else is imported from the
module that holds it.
"""

from .definition import ExperimentError, load_experiment, prepare
from .tables import is_experiment, report

__all__ = ["ExperimentError", "is_experiment", "load_experiment", "prepare", "report"]
