"""Plug-ins by import path: `--server.algorithm=pkg.module:Class`, `--model.name=pkg.module:factory`,
`--data.dataset=pkg.module:loader`.

A value with a colon names an object `attr` (dots allowed: `Outer.Inner`) in an importable module
`pkg.module` (installed, on PYTHONPATH, or below the working directory; every rank imports it). The
contracts are in docs/extending.md; the checks here turn a wrong path or a wrong kind of object into
one config error on rank 0 before any rank starts work. Built-in names never contain a colon.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys

from .config import Config, ConfigError

PLUGIN_KEYS = ("server.algorithm", "client.trainer", "model.name", "data.dataset")


def is_import_path(value: str) -> bool:
    return ":" in value


def short_name(value: str) -> str:
    """A file-name-safe name: the built-in name, or the plug-in's attribute name (`pkg.mod:MyAlgo` -> `MyAlgo`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", value.rsplit(":", 1)[-1])


def load(spec: str, key: str):
    """The object `spec` = "module:attr" names; ConfigError naming `key` when it cannot be imported."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"config key '{key}': {spec!r} is not an import path; expected 'package.module:name'")
    # `python -m` puts the working directory on sys.path, a console script (`mpi-afl`) its own bin
    # directory instead: look in the working directory in both cases, after everything else.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"config key '{key}': cannot import module {module_name!r} of {spec!r} ({e}); "
                          "it must be installed or on PYTHONPATH on every rank") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"config key '{key}': module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def algorithm_class(spec: str) -> type:
    """A plug-in algorithm: a subclass of mpi_afl.algorithms.base.Algorithm (its contract)."""
    from .algorithms.base import Algorithm
    cls = load(spec, "server.algorithm")
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"config key 'server.algorithm': {spec!r} is {_what(cls)}, not a subclass of "
                          "mpi_afl.algorithms.base.Algorithm (see docs/extending.md \"Algorithms\")")
    if cls.on_update is Algorithm.on_update:
        raise ConfigError(f"config key 'server.algorithm': {spec!r} does not implement on_update(update, ctx)")
    return cls


def trainer_class(spec: str) -> type:
    """The local trainer `client.trainer` names: the built-in LocalTrainer for 'default', else a plug-in
    subclass of mpi_afl.client.trainer.LocalTrainer (its contract)."""
    from .client.trainer import LocalTrainer
    if not is_import_path(spec):
        return LocalTrainer
    cls = load(spec, "client.trainer")
    if not (isinstance(cls, type) and issubclass(cls, LocalTrainer)):
        raise ConfigError(f"config key 'client.trainer': {spec!r} is {_what(cls)}, not a subclass of "
                          "mpi_afl.client.trainer.LocalTrainer (see docs/extending.md \"Local training\")")
    return cls


def callable_object(spec: str, key: str):
    """A model factory or data set loader: anything callable."""
    obj = load(spec, key)
    if not callable(obj):
        raise ConfigError(f"config key '{key}': {spec!r} is {_what(obj)}, not callable "
                          "(see docs/extending.md)")
    return obj


def call(obj, spec: str, key: str, *args, **kwargs):
    """Call a plug-in with the arguments of its contract; one that cannot take them is a ConfigError
    (checked before the call, so a TypeError raised inside the plug-in is not mistaken for it)."""
    try:
        inspect.signature(obj).bind(*args, **kwargs)
    except TypeError as e:
        shown = ", ".join([*map(repr, args), *(f"{k}=..." for k in kwargs)])
        raise ConfigError(f"config key '{key}': {spec!r} cannot be called as ({shown}): {e} "
                          "(see docs/extending.md)") from None
    except ValueError:   # no signature (some builtins): just call it
        pass
    return obj(*args, **kwargs)


def check(cfg: Config) -> None:
    """Import every plug-in the config names and check its kind (rank 0, before the run starts)."""
    if is_import_path(cfg.server.algorithm):
        algorithm_class(cfg.server.algorithm)
    trainer_class(cfg.client.trainer)
    if is_import_path(cfg.model.name):
        callable_object(cfg.model.name, "model.name")
    if is_import_path(cfg.data.dataset):
        callable_object(cfg.data.dataset, "data.dataset")


def _what(obj) -> str:
    return f"a {type(obj).__name__}" if not isinstance(obj, type) else f"the class {obj.__name__}"
