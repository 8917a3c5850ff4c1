"""Typed run configuration: dataclasses, TOML presets, command-line overrides.

A config is built in three layers, later ones winning: the defaults (schema.py),
then a TOML file (`--preset NAME` from `mpi_afl/presets/`, or `--config FILE`), then
command-line overrides of any dotted key (`--client.lr=0.01` or
`--client.lr 0.01`) and the shortcuts (`--algorithm`, `--seed`, ...).
An unknown key, a wrong type or an impossible value is a `ConfigError` that
names the key, the bad value and what is allowed (nanoGPT's rule: a mistyped
override is an error, never silently ignored).

- schema.py: `opt`, the section dataclasses, `Config`, `ConfigError`, `all_keys`;
- parsing.py: value checks, layers, TOML files and presets, plug-ins' sections, `validate`, resume rules,
  `from_dict`;
- command_line.py: the argparse parser, `--help` / `--help-all`, `parse_args`.

The names below are the package's surface for the rest of mpi_afl, plug-ins and scripts; anything else is
imported from the module that holds it.
"""

from .command_line import parse_args
from .parsing import from_dict
from .schema import Config, ConfigError, opt

__all__ = ["Config", "ConfigError", "from_dict", "opt", "parse_args"]
