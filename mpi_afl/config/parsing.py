"""Building a Config from its layers: the defaults, TOML files (presets, --config), dotted overrides.

Each value is checked against its field (type, choices, range), then `validate` applies the rules that tie
several keys together and the selected algorithm's own rules (`check_config`, algorithms/base.py).
Plug-ins' config sections are resolved here too, once the built-in keys name the plug-ins.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .schema import Config, ConfigError, all_keys, section_classes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def unknown_key(key: str, cfg: Config | None = None) -> ConfigError:
    close = difflib.get_close_matches(key, list(all_keys(cfg)), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the list of keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, typ: type, value: Any, from_text: bool) -> Any:
    """Check (TOML values) or parse (command-line text) one value against its type."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}': {value!r} is not {expected}")

    if get_origin(typ) is list:
        (item,) = get_args(typ)
        if from_text:
            text = value.strip().strip("[]")
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad(f"a list of {item.__name__}")
        return [_coerce(key, item, v, from_text) for v in value]
    if typ is bool:
        if from_text:
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise bad("a boolean (true/false)")
        if not isinstance(value, bool):
            raise bad("a boolean (true/false)")
        return value
    if typ is int:
        if from_text:
            try:
                return int(value)
            except ValueError:
                raise bad("an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if typ is float:
        if from_text:
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"unsupported config type {typ} for {key}")  # a programming error


def _check_field(key: str, value: Any, f: dataclasses.Field) -> None:
    m = f.metadata
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and not _is_utf8(text):   # a path in another encoding: every file we write is UTF-8
            raise ConfigError(f"config key '{key}': {text!r} is not valid UTF-8 text (a file name in another "
                              "encoding?); use a UTF-8 name")
    if m.get("choices") and value not in m["choices"] and not (m.get("plugin") and ":" in value):
        allowed = ", ".join(m["choices"])
        plugin = " (a plug-in is named by its import path 'package.module:name')" if m.get("plugin") else ""
        raise ConfigError(f"config key '{key}': {value!r} is not allowed{plugin}; allowed values: {allowed}")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if not math.isfinite(v):   # nan passes every comparison below, inf most: neither is ever meant
            raise ConfigError(f"config key '{key}': {value!r} is not a finite number")
        lo, hi = m.get("min"), m.get("max")
        if lo is not None and (v < lo or (m.get("min_exclusive") and v == lo)):
            op = ">" if m.get("min_exclusive") else ">="
            raise ConfigError(f"config key '{key}': {value!r} is out of range; must be {op} {lo}")
        if hi is not None and v > hi:
            raise ConfigError(f"config key '{key}': {value!r} is out of range; must be <= {hi}")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")   # undecodable bytes of argv arrive as lone surrogates, which do not encode
    except UnicodeEncodeError:
        return False
    return True


def validate(cfg: Config) -> Config:
    """Field constraints, then the rules that tie several keys together (every section is checked, whatever
    the algorithm), then the derived defaults (resolve_derived) and the selected algorithm's own rules."""
    keys = all_keys(cfg)
    for key, (_, f) in keys.items():
        section, name = key.split(".")
        _check_field(key, getattr(getattr(cfg, section), name), f)
    d, s, dl = cfg.data, cfg.server, cfg.delays
    if s.concurrency > d.num_clients:
        raise ConfigError(f"config key 'server.concurrency': {s.concurrency} jobs in flight need at least as many "
                          f"clients, but data.num_clients = {d.num_clients}; allowed: 1..{d.num_clients}")
    if d.val_fraction + d.test_fraction + d.kd_fraction >= 0.95:
        raise ConfigError("config keys 'data.val_fraction' + 'data.test_fraction' + 'data.kd_fraction' = "
                          f"{d.val_fraction + d.test_fraction + d.kd_fraction:g}; must be < 0.95 to leave training data")
    if d.samples_per_client and d.partition != "dirichlet":
        raise ConfigError(f"config key 'data.samples_per_client': {d.samples_per_client} needs "
                          f"data.partition = 'dirichlet', not {d.partition!r}")
    if len(dl.train_means) != len(dl.train_probs) or not dl.train_means:
        raise ConfigError(f"config keys 'delays.train_means' {dl.train_means} and 'delays.train_probs' "
                          f"{dl.train_probs} must be non-empty lists of equal length")
    if abs(sum(dl.train_probs) - 1.0) > 1e-6:
        raise ConfigError(f"config key 'delays.train_probs': {dl.train_probs} must sum to 1")
    if not dl.upload_means:
        raise ConfigError("config key 'delays.upload_means': must not be empty")
    if dl.upload_spread > min(dl.upload_means):  # a negative upload time would run the virtual clock backwards
        raise ConfigError(f"config key 'delays.upload_spread': {dl.upload_spread} is out of range; must be <= "
                          f"min(delays.upload_means) = {min(dl.upload_means)}")
    if cfg.distill.warmup_versions < cfg.distill.freeze_versions:
        raise ConfigError(f"config key 'distill.warmup_versions': {cfg.distill.warmup_versions} must be >= "
                          f"distill.freeze_versions = {cfg.distill.freeze_versions}")
    if cfg.echo.weighting == "expert" and cfg.echo.inputs != "synthetic":
        raise ConfigError("config key 'echo.weighting': 'expert' (the default) weights each image by the class it "
                          "was generated for, so it needs echo.inputs = 'synthetic' (proxy images have no class); "
                          "with echo.inputs = 'proxy' set echo.weighting = 'relative' (and echo.kd_step = 0.1, "
                          "its value tuned on proxy inputs)")
    r = cfg.run
    if not (r.max_versions or r.max_updates or r.max_virtual_time or r.max_wall_seconds or r.target_accuracy):
        raise ConfigError("config keys 'run.max_versions', 'run.max_updates', 'run.max_virtual_time', "
                          "'run.max_wall_seconds', 'run.target_accuracy' are all 0: the run would never stop; set at "
                          "least one")
    if 0 < r.eval_every_time < 1e-3:
        raise ConfigError(f"config key 'run.eval_every_time': {r.eval_every_time!r} is out of range; must be 0 (off) "
                          "or >= 0.001 virtual units (a finer grid evaluates more often than jobs arrive)")
    if cfg.fault.kind != "none" and cfg.fault.job < 0:
        raise ConfigError("config key 'fault.job': a fault needs the job index that triggers it (>= 0)")
    if (r.mlflow_uri or r.mlflow_experiment != "mpi_afl") and not r.mlflow:
        key = "run.mlflow_uri" if r.mlflow_uri else "run.mlflow_experiment"
        raise ConfigError(f"config key '{key}': set, but run.mlflow = false; add --run.mlflow=true to log to MLflow")
    if r.mlflow and not r.mlflow_experiment.strip():
        raise ConfigError("config key 'run.mlflow_experiment': must not be empty")
    resolve_derived(cfg)
    check_algorithm(cfg)
    return cfg


def check_algorithm(cfg: Config) -> None:
    """The selected algorithm's own rules, `check_config(cfg)` (algorithms/base.py), for a built-in and a plug-in
    alike. Imports the algorithm (and so torch). A plug-in that cannot be imported or is not an Algorithm is
    skipped here, as by resolve_plugin_sections: rank 0's plug-in check (plugins.check) reports it before the run
    starts."""
    from ..algorithms import algorithm_class
    try:
        cls = algorithm_class(cfg.server.algorithm)
    except ConfigError:
        return
    cls.check_config(cfg)


def resolve_derived(cfg: Config) -> None:
    """Replace the defaults that follow other keys by their values, so --print-config and the stored
    config show what the run uses: distill.augment = auto follows client.augment, distill.meta_lr = 0
    follows distill.gen_lr (both the FedRevive research code's behaviour)."""
    d = cfg.distill
    if d.augment == "auto":
        d.augment = "true" if cfg.client.augment else "false"
    d.meta_lr = d.meta_step_lr()


def apply(cfg: Config, values: dict[str, Any], *, from_text: bool) -> None:
    """Set dotted keys on `cfg` (in place), type-checking each value."""
    keys = all_keys(cfg)
    for key, value in values.items():
        if key not in keys:
            raise unknown_key(key, cfg)
        typ, _ = keys[key]
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, _coerce(key, typ, value, from_text))


def apply_layers(cfg: Config, layers: list[tuple[dict[str, Any], bool, str]]) -> None:
    """Apply (values, from_text, source) layers in order, later ones winning. Keys of sections that are not
    built in are kept back until every built-in key is set: only then is it known which plug-ins the config
    names, and so which sections they declare (resolve_plugin_sections); a key of no such section is an error."""
    builtin = section_classes()
    deferred: dict[str, tuple[Any, bool, str]] = {}
    for values, from_text, source in layers:
        apply(cfg, {k: v for k, v in values.items() if k.split(".")[0] in builtin}, from_text=from_text)
        deferred.update({k: (v, from_text, source) for k, v in values.items() if k.split(".")[0] not in builtin})
    resolve_plugin_sections(cfg, strict=bool(deferred))
    for key, (value, from_text, source) in deferred.items():
        section = key.split(".")[0]
        if section not in cfg.plugin_sections:
            sections = section_classes(cfg)
            close = difflib.get_close_matches(section, list(sections), n=1)
            hint = (f"; did you mean '{close[0]}'?" if close else f"; allowed sections: {', '.join(sections)}, "
                    "and the sections of the plug-ins the config names (docs/extending.md)")
            if source == "command line":
                if difflib.get_close_matches(key, list(all_keys(cfg)), n=1, cutoff=0.6):
                    raise unknown_key(key, cfg)
                raise ConfigError(f"unknown config key '{key}': no built-in section or section of a plug-in this "
                                  f"config names is called '{section}'{hint}")
            raise ConfigError(f"{source}: unknown config section '{section}'{hint}")
        apply(cfg, {key: value}, from_text=from_text)


PLUGIN_SECTION_TYPES = (int, float, bool, str)


def resolve_plugin_sections(cfg: Config, *, strict: bool) -> None:
    """Give `cfg` the config sections its plug-ins declare: a class (or function) attribute
    `config_section = ("name", Dataclass)`, every field with a default and of type int, float, bool, str or a
    list of one of them (use `opt(...)` for help text and limits). Sections already there keep their values.
    A plug-in that cannot be imported is skipped unless `strict` (its keys were given): rank 0's plug-in check
    (plugins.check) reports it before the run starts."""
    from .. import plugins
    declared: dict[str, tuple[type, str]] = {}
    for key in plugins.PLUGIN_KEYS:
        section, name = key.split(".")
        spec = getattr(getattr(cfg, section), name)
        if not plugins.is_import_path(spec):
            continue
        try:
            obj = plugins.load(spec, key)
        except ConfigError:
            if strict:
                raise
            continue
        if getattr(obj, "config_section", None) is None:
            continue
        section_name, cls = _check_section_declaration(obj.config_section, spec, key)
        if section_name in declared and declared[section_name][0] is not cls:
            raise ConfigError(f"config key '{key}': {spec!r} declares config section '{section_name}', which "
                              f"{declared[section_name][1]!r} declares with another class")
        declared[section_name] = (cls, spec)
    old = cfg.plugin_sections
    cfg.plugin_sections = {name: old[name] if type(old.get(name)) is cls else cls()
                           for name, (cls, _) in declared.items()}


def _check_section_declaration(declared: Any, spec: str, key: str) -> tuple[str, type]:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"config key '{key}': {spec!r} has config_section = {declared!r}: {why} (see "
                           "docs/extending.md \"Configuration\")")

    if not (isinstance(declared, tuple) and len(declared) == 2 and isinstance(declared[0], str)):
        raise bad("expected a tuple (name, dataclass)")
    name, cls = declared
    if not name.isidentifier() or name != name.lower():
        raise bad(f"the section name {name!r} must be a lower-case Python identifier")
    if name in section_classes():
        raise bad(f"'{name}' is a built-in section")
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise bad("the second item must be a dataclass")
    try:
        hints = get_type_hints(cls)
    except Exception as e:   # an annotation that does not resolve
        raise bad(f"its annotations do not resolve ({e})") from None
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        item = get_args(typ)[0] if get_origin(typ) is list and len(get_args(typ)) == 1 else typ
        if item not in PLUGIN_SECTION_TYPES:
            raise bad(f"field '{f.name}' has type {typ!r}; allowed: int, float, bool, str or a list of one of them")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise bad(f"field '{f.name}' has no default")
    return name, cls


def flatten_toml(data: dict, source: str) -> dict[str, Any]:
    """Dotted keys of a TOML document; sections that are not built in are checked by apply_layers, once the
    plug-ins (and so their sections) are known."""
    flat = {}
    for section, body in data.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: '{section}' must be a table ([{section}])")
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return flatten_toml(data, str(path))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; allowed values: {', '.join(preset_names())}")
    return path


# Keys a resumed run may change: stop rules, logging, placement and the distillation group's size
# (distill.ranks: the continued run is valid, but sums over another group size differ in the last bits, so it is
# not bit-identical to one that kept D). Everything else (data, model, algorithm, seed, clock, ...) decides the
# result, so changing it would not continue the same run.
RESUMABLE = {"run.max_versions", "run.max_updates", "run.max_virtual_time", "run.max_wall_seconds",
             "run.target_accuracy",
             "run.diverged_after",
             "run.eval_every", "run.checkpoint_every", "run.log_flush_seconds", "run.heartbeat_seconds", "run.log_level",
             "run.threads", "run.device", "run.placement", "distill.ranks",
             "run.tensorboard", "run.mlflow", "run.mlflow_uri", "run.mlflow_experiment",
             "run.out", "run.overwrite", "server.queue_depth", "delays.wall_scale", "fault.kind", "fault.job"}


def check_resumable(old: Config, new: Config) -> None:
    for key in {**all_keys(old), **all_keys(new)}:
        section, name = key.split(".")
        before = getattr(getattr(old, section, None), name, None)
        after = getattr(getattr(new, section, None), name, None)
        if key not in RESUMABLE and before != after:
            raise ConfigError(f"cannot resume with config key '{key}' = {after!r}: the checkpoint's run has "
                              f"{before!r}; only these keys may change on resume: {', '.join(sorted(RESUMABLE))}")


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (checkpoints, broadcasts)."""
    cfg = Config()
    apply_layers(cfg, [(flatten_toml(data, "config"), False, "config")])
    return validate(cfg)
