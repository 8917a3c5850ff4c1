"""The `mpi-afl train` command line: argparse over every config key, the short help (--help) and the full
one (--help-all), and `parse_args`, which stacks the layers (mpi_afl/config/parsing.py) in their order."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path
from typing import Callable, get_args, get_origin

from .. import __version__
from .parsing import (apply_layers, check_resumable, from_dict, load_toml, preset_names, preset_path, unknown_key,
                      validate)
from .schema import Config, ConfigError, all_keys, section_classes

# Command-line shortcuts -> dotted keys.
SHORTCUTS = {
    "algorithm": "server.algorithm",
    "dataset": "data.dataset",
    "clock": "run.clock",
    "seed": "run.seed",
    "out": "run.out",
    "max_versions": "run.max_versions",
}

USAGE = ("[mpiexec -n R] mpi-afl train [--config FILE | --preset NAME] [--resume DIR] [shortcuts] "
         "[--section.key=VALUE ...]")
# The keys `--help` shows (`--help-all` shows every key): what a run is most often changed by.
COMMON_KEYS = ("client.lr", "client.iterations", "server.lr", "server.concurrency", "data.num_clients",
               "data.alpha", "run.device", "run.checkpoint_every", "distill.ranks")
EXAMPLES = """examples:
  mpiexec -n 5 mpi-afl train                                    # the offline default: digits, FedBuff
  mpiexec -n 17 mpi-afl train --preset paper_cifar10 --out runs/fr-cifar
  mpi-afl train --algorithm fedasync --server.staleness=polynomial --seed 2 --print-config > my.toml
"""
HIDDEN_SECTIONS = {"fault"}   # failure-injection keys for the test suite: listed by --help-all only


class _HelpAction(argparse.Action):
    """-h/--help prints the short help, --help-all the full list of keys; both exit 0."""

    def __init__(self, option_strings, dest, full: bool, **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kw)
        self.full = full

    def __call__(self, parser, namespace, values, option_string=None):
        print(build_parser(full=True).format_help() if self.full else _short_help(), end="")
        parser.exit(0)


def _short_help() -> str:
    keys = all_keys()
    lines = [f"usage: {USAGE}", "", *textwrap.wrap(DESCRIPTION, 118), "", "most used options:"]
    rows = [("--config FILE", "TOML config file (mpi-afl train --print-config writes one)"),
            ("--preset NAME", f"named config: {', '.join(preset_names())}"),
            ("--resume DIR", "continue the run in DIR from its checkpoint"),
            ("--print-config", "print the resolved config as TOML (--format json: JSON) and exit"),
            ("--quiet, --verbose", "the console: warnings and errors only, or also a line per arrival")]
    rows += [(f"--{flag.replace('_', '-')} VALUE", f"= --{key} (default: {_default(keys[key][1])!r})")
             for flag, key in SHORTCUTS.items()]
    rows += [(f"--{key}={typ_name(keys[key][0])}", f"{keys[key][1].metadata['help']} "
              f"(default: {_default(keys[key][1])!r})") for key in COMMON_KEYS]
    width = max(len(flag) for flag, _ in rows) + 2
    for flag, text in rows:
        wrapped = textwrap.wrap(text, 118 - width)
        lines += [f"  {flag:{width}s}{wrapped[0]}"] + [" " * (width + 2) + more for more in wrapped[1:]]
    shown = [k for k in keys if k.split(".")[0] not in HIDDEN_SECTIONS]
    lines += ["", EXAMPLES.rstrip(), "", f"mpi-afl train --help-all lists all {len(shown)} config keys with their "
              "defaults; docs/design.md and README.md explain them."]
    return "\n".join(lines) + "\n"


DESCRIPTION = ("Asynchronous federated learning over MPI. Rank 0 serves, the other ranks run client jobs; one "
               "process runs the jobs itself. Any config key can be overridden as --section.key=VALUE (lists "
               "as comma-separated values); a key given more than once takes its last value, so options after "
               "a job script's own win (jobs/*.sbatch).")


def build_parser(full: bool = False) -> argparse.ArgumentParser:
    """The command line. `full`: every key in the help text, [fault] included (what --help-all prints)."""
    p = argparse.ArgumentParser(prog="mpi-afl train", usage=USAGE, description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                add_help=False)
    p.add_argument("-h", "--help", action=_HelpAction, full=False, help="the most used options, with examples")
    p.add_argument("--help-all", action=_HelpAction, full=True, help="every option and config key")
    p.add_argument("--config", metavar="FILE", help="TOML config file (sections as below)")
    p.add_argument("--preset", metavar="NAME", help=f"named config from mpi_afl/presets/: {', '.join(preset_names())}")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint.h5 (its config, "
                   "plus the overrides given here; only stop rules and placement may change)")
    p.add_argument("--new-log", action="store_true", help="with --resume: continue into a fresh run.h5 (the "
                   "existing one, if any, is kept as run.h5.replaced-TIME), for a missing or damaged run log")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML that --config "
                   "reads back (run.out as a comment), and exit")
    p.add_argument("--format", choices=["toml", "json"], default="toml", help="with --print-config: the output "
                   "format (default: toml)")
    p.add_argument("--version", action="version", version=f"mpi_afl {__version__}")
    level = p.add_mutually_exclusive_group()
    for flag, value, text in (("--quiet", "quiet", "only warnings and errors on the console"),
                              ("--verbose", "verbose", "also a line per arrival on the console and in server.log")):
        level.add_argument(flag, dest="run.log_level", action="store_const", const=value, default=None,
                           help=f"= --run.log_level={value}: {text}")
    short = p.add_argument_group("shortcuts")
    keys = all_keys()
    for flag, key in SHORTCUTS.items():
        _, f = keys[key]
        short.add_argument(f"--{flag.replace('_', '-')}", dest=key, default=None, metavar="VALUE",
                           help=f"= --{key} (default: {_default(f)!r})")
    for section in section_classes():
        hidden = section in HIDDEN_SECTIONS
        title = f"[{section}]" + (" (failure injection for the test suite)" if hidden else "")
        group = p.add_argument_group(title)
        for key, (typ, f) in keys.items():
            if not key.startswith(section + "."):
                continue
            choices = f.metadata.get("choices")
            extra = f" {{{','.join(choices)}}}" if choices else ""
            text = f"{f.metadata['help']}{extra} (default: {_default(f)!r})"
            group.add_argument(f"--{key}", dest=key, default=None, metavar=typ_name(typ),
                               help=text.replace("%", "%%") if full or not hidden else argparse.SUPPRESS)
    return p


def typ_name(typ) -> str:
    if get_origin(typ) is list:
        return f"{get_args(typ)[0].__name__.upper()},..."
    return typ.__name__.upper()


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def parse_args(argv: list[str] | None = None,
               resume_config: Callable[[str], dict] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line into a validated Config; ConfigError on any mistake.

    With `--resume DIR` the starting point is the checkpoint's config
    (`resume_config(DIR)`), the rest of the command line applies on top, and
    only the keys in RESUMABLE may differ from the checkpoint."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    plugin_overrides = _plugin_overrides(unknown)
    base = from_dict(resume_config(args.resume)) if args.resume else None
    cfg = from_dict(base.to_dict()) if base else Config()
    if args.preset and args.config:
        raise ConfigError("give either --preset or --config, not both")
    layers = []
    if args.preset:
        layers.append((load_toml(preset_path(args.preset)), False, f"preset {args.preset}"))
    if args.config:
        layers.append((load_toml(Path(args.config)), False, str(args.config)))
    overrides = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    overrides.update(plugin_overrides)
    layers.append((overrides, True, "command line"))
    apply_layers(cfg, layers)
    if args.new_log and not base:
        raise ConfigError("--new-log only applies with --resume DIR")
    if base:
        if "run.out" in overrides and Path(overrides["run.out"]).resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--resume {args.resume} continues that run in place; --out "
                              f"{overrides['run.out']} cannot differ (to branch a run, copy its directory and "
                              f"resume the copy)")
        cfg.run.out = args.resume
        check_resumable(base, cfg)
    validate(cfg)
    _check_tracking_packages(cfg)
    return cfg, args


def _check_tracking_packages(cfg: Config) -> None:
    """run.tensorboard and run.mlflow need their packages (the extras of the same names): one line, before
    anything is written. Only found, not imported (importing them takes seconds)."""
    import importlib.util
    for key, on, module, extra in (("run.tensorboard", cfg.run.tensorboard, "tensorboard", "tensorboard"),
                                   ("run.mlflow", cfg.run.mlflow, "mlflow", "mlflow")):
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key '{key}': true, but the {module} package is not installed; "
                              f"pip install 'mpi_afl[{extra}]'")


def _plugin_overrides(unknown: list[str]) -> dict[str, str]:
    """The command-line tokens argparse did not know: `--section.key=VALUE` (or `--section.key VALUE`) of a
    section that is not built in, for a plug-in's section (apply_layers checks it). Anything else is an error."""
    builtin = section_classes()
    values, i = {}, 0
    while i < len(unknown):
        token = unknown[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key=VALUE")
        key, eq, value = token[2:].partition("=")
        if key.count(".") != 1 or key.split(".")[0] in builtin:
            raise unknown_key(key.replace("-", "_"))
        if not eq:
            if i + 1 == len(unknown) or unknown[i + 1].startswith("--"):
                raise ConfigError(f"config key '{key}': no value given; use --{key}=VALUE")
            i, value = i + 1, unknown[i + 1]
        values[key] = value
        i += 1
    return values

