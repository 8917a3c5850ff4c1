"""Aggregation algorithms, one file each; the built-in names are mpi_afl/names.py's ALGORITHMS, plug-ins
are named by import path."""

from ..names import ALGORITHMS, builtin
from ..plugins import algorithm_class as plugin_class
from ..plugins import is_import_path


def algorithm_class(name: str) -> type:
    """The class of a built-in algorithm, or of a plug-in named 'package.module:Class'."""
    if is_import_path(name):
        return plugin_class(name)
    return builtin(ALGORITHMS[name])
