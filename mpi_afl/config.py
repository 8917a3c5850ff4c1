"""Typed run configuration: dataclasses, TOML presets, command-line overrides.

A config is built in three layers, later ones winning: the defaults below,
then a TOML file (`--preset NAME` from `mpi_afl/presets/`, or `--config FILE`), then
command-line overrides of any dotted key (`--client.lr=0.01` or
`--client.lr 0.01`) and the shortcuts (`--algorithm`, `--seed`, ...).
An unknown key, a wrong type or an impossible value is a `ConfigError` that
names the key, the bad value and what is allowed (nanoGPT's rule: a mistyped
override is an error, never silently ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import textwrap
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_args, get_origin, get_type_hints

from . import __version__

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A bad config key or value; the message is meant for the user as is."""


def opt(default, help: str, *, choices=None, min=None, min_exclusive=False, max=None, plugin=False):
    """A config field with its help text and value constraints; `plugin`: an import path
    'package.module:name' is allowed besides the choices (mpi_afl/plugins.py)."""
    meta = {"help": help, "choices": choices, "min": min, "min_exclusive": min_exclusive, "max": max,
            "plugin": plugin}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


ALGORITHM_NAMES = ["fedavg", "fedasync", "fedbuff", "afl_dw", "ca2fl", "fedrevive", "dd_fedrevive", "fedecho"]
DATASET_NAMES = ["digits", "fashion-mnist", "mnist", "cifar10", "cifar100"]
MODEL_NAMES = ["cnn", "convnet", "resnet18"]
STALENESS_NAMES = ["none", "constant", "polynomial", "hinge", "sqrt", "cosine"]


@dataclass
class RunConfig:
    seed: int = opt(0, "run seed: data split, partition, delays, client streams", min=0, max=2**63 - 1)
    clock: str = opt("virtual", "'virtual': process results in virtual-time order (reproducible); "
                     "'wall': in real arrival order", choices=["virtual", "wall"])
    max_versions: int = opt(100, "stop after this many global model versions (0 = no limit)", min=0)
    max_updates: int = opt(0, "stop after this many accepted client updates (0 = no limit): equal work for "
                           "methods of different buffer sizes, where a version counts aggregations", min=0)
    max_virtual_time: float = opt(0.0, "stop at this virtual time (0 = no limit)", min=0)
    max_wall_seconds: float = opt(0.0, "stop after this many wall seconds (0 = no limit)", min=0)
    target_accuracy: float = opt(0.0, "stop once test accuracy reaches this (0 = off)", min=0, max=1)
    diverged_after: int = opt(20, "stop as diverged (exit code 3) after this many consecutive updates rejected "
                              "as non-finite (0 = never; a non-finite global model always stops the run)", min=0)
    eval_every: int = opt(10, "evaluate the global model every N versions", min=1)
    eval_every_time: float = opt(0.0, "evaluate instead on a virtual-time grid: the model current at every "
                                 "multiple of this many virtual units (0 = off). Methods of one comparison are "
                                 "then evaluated at the same times, whatever their buffer size", min=0)
    out: str = opt("", "output directory for summary.json, run.h5, checkpoint.h5 "
                   "(empty: runs/ALGORITHM-DATASET-CLOCK-sSEED-TIMESTAMP)")
    overwrite: bool = opt(False, "allow writing into an existing run directory")
    device: str = opt("auto", "'auto' (a GPU per local rank when present), 'cpu' or 'cuda'",
                      choices=["auto", "cpu", "cuda"])
    placement: str = opt("shared", "GPUs of a node: 'shared' (rank -> cuda:(local rank % GPUs)) or 'server_gpu' "
                         "(rank 0 alone on cuda:0 of its node, the other ranks there share the rest)",
                         choices=["shared", "server_gpu"])
    threads: int = opt(1, "torch threads per rank; the virtual clock always uses 1 so results "
                       "cannot depend on it", min=1)
    checkpoint_every: int = opt(0, "write OUT/checkpoint.h5 every N versions (0 = only on signal/stop)", min=0)
    log_flush_seconds: float = opt(2.0, "flush buffered HDF5 rows at least this often", min=0, min_exclusive=True)
    heartbeat_seconds: float = opt(30.0, "print a progress line at least this often, also between evaluations",
                                   min=0, min_exclusive=True)
    # Live tracking (storage/tracking.py): mirrors of run.h5 that change nothing in the run's result.
    tensorboard: bool = opt(False, "write TensorBoard event files into OUT/tensorboard during the run (rank 0, "
                            "at every evaluation): accuracy and loss by version and by evaluation with the virtual "
                            "time, throughput, staleness, algorithm stats, the config as text and HParams "
                            "(needs the tensorboard extra)")
    mlflow: bool = opt(False, "log the same to an MLflow run during the run (needs the mlflow extra)")
    mlflow_uri: str = opt("", "with run.mlflow: the MLflow tracking URI (sqlite:///PATH, http://HOST:PORT, ...); "
                          "empty: a SQLite file OUT/mlflow.db, no server needed")
    mlflow_experiment: str = opt("mpi_afl", "with run.mlflow: the MLflow experiment the run is logged to")


@dataclass
class DataConfig:
    dataset: str = opt("digits", "data set, or a loader 'package.module:function' (docs/extending.md)",
                       choices=DATASET_NAMES, plugin=True)
    root: str = opt("", "directory holding the data set files (empty: $MPI_AFL_DATA, the user cache, "
                    "/usr/share/datasets)")
    download: bool = opt(False, "let torchvision download a missing data set (rank 0 only)")
    partition: str = opt("dirichlet", "how the training set is split over clients",
                         choices=["dirichlet", "iid", "shards"])
    alpha: float = opt(0.5, "Dirichlet concentration (smaller = more skewed)", min=0, min_exclusive=True)
    shards_per_client: int = opt(2, "label shards per client (partition = shards)", min=1)
    num_clients: int = opt(20, "number of logical clients N", min=1)
    samples_per_client: int = opt(0, "fixed samples per client drawn from its Dirichlet class mix "
                                  "(the papers use 350; 0 = split the whole training set)", min=0)
    val_fraction: float = opt(0.15, "validation share of the pooled data", min=0, max=0.9)
    test_fraction: float = opt(0.15, "test share of the pooled data", min=0, min_exclusive=True, max=0.9)
    kd_fraction: float = opt(0.0, "held-out KD share: dd_fedrevive's real KD data and fedecho's unlabeled "
                                  "proxy inputs (echo.inputs=proxy)", min=0, max=0.9)


@dataclass
class ModelConfig:
    name: str = opt("cnn", "model, or a factory 'package.module:function' (docs/extending.md)",
                    choices=MODEL_NAMES, plugin=True)
    # Default "stat", as the FedRevive code uses for every method: BatchNorm's running statistics are
    # aggregated like weights, and stale deltas drove them to ~0 in wall-clock FedBuff runs on Fashion-MNIST
    # (test loss 4e5, accuracy 0.10), while the same runs with stat trackers kept learning.
    norm: str = opt("stat", "normalisation layer: FedRevive's stat tracker (tracks statistics, does not "
                    "normalise), BatchNorm, or none", choices=["stat", "batchnorm", "none"])


@dataclass
class ClientConfig:
    iterations: int = opt(25, "local iterations per job (not epochs; batches cycle)", min=1)
    batch_size: int = opt(32, "local batch size", min=1)
    optimizer: str = opt("adam", "local optimizer (created fresh for every job)", choices=["adam", "sgd"])
    lr: float = opt(1e-3, "local learning rate", min=0, min_exclusive=True, max=10)
    momentum: float = opt(0.9, "SGD momentum", min=0, max=1)
    weight_decay: float = opt(0.0, "local weight decay", min=0)
    augment: bool = opt(False, "random crop (4-pixel reflect pad) and horizontal flip")
    trainer: str = opt("default", "local training: 'default' (cross-entropy) or a plug-in 'package.module:Class', "
                       "a subclass of mpi_afl.client.trainer.LocalTrainer (docs/extending.md)", choices=["default"],
                       plugin=True)


@dataclass
class ServerConfig:
    algorithm: str = opt("fedbuff", "aggregation algorithm, or a class 'package.module:Class' (docs/extending.md)",
                         choices=ALGORITHM_NAMES, plugin=True)
    concurrency: int = opt(8, "jobs in flight K (fedavg: clients per round)", min=1)
    lr: float = opt(0.5, "server learning rate eta", min=0, min_exclusive=True, max=100)
    buffer_size: int = opt(4, "updates per aggregation B (fedbuff, ca2fl, fedecho)", min=1)
    momentum: float = opt(0.0, "server momentum (fedbuff)", min=0, max=1)
    staleness: str = opt("none", "staleness weight s(tau) for fedasync/fedbuff", choices=STALENESS_NAMES)
    staleness_a: float = opt(0.5, "exponent a (polynomial) or slope a (hinge)", min=0)
    staleness_b: float = opt(10.0, "hinge knee b", min=0)
    mixing: float = opt(0.6, "FedAsync mixing weight alpha", min=0, min_exclusive=True, max=1)
    s_max: float = opt(75.0, "cosine beta half-point s_max (afl_dw, fedrevive; Eq. 3)", min=0, min_exclusive=True)
    sample_weighted: bool = opt(False, "fedavg: weight client deltas by sample count")
    queue_depth: int = opt(2, "jobs queued per worker so workers never wait on the server", min=1)


@dataclass
class DelayConfig:
    schedule: str = opt("paper", "delay schedule: 'paper' and 'shifted' are docs/algorithms.md §3.5; 'high' has "
                        "heavy-tailed stragglers (Pareto(1.5), a fifth of the clients average 6 units); "
                        "'custom' uses the fields below; 'none' = every job takes 1 unit",
                        choices=["paper", "shifted", "high", "custom", "none"])
    train_shape: str = opt("exponential", "custom: distribution of a job's training time around the "
                           "client's mean", choices=["exponential", "constant", "uniform", "halfnormal", "pareto"])
    train_means: list[float] = opt([1.0, 1.3, 1.6], "custom: per-client training-time means (mixture)",
                                   min=0, min_exclusive=True)
    train_probs: list[float] = opt([0.25, 0.5, 0.25], "custom: mixture probabilities of train_means", min=0)
    download: float = opt(0.1, "custom: constant download time", min=0)
    upload_means: list[float] = opt([0.15, 0.25], "custom: per-client upload means (equally likely)", min=0)
    upload_spread: float = opt(0.02, "custom: upload ~ Uniform(m +- spread)", min=0)
    pareto_shape: float = opt(2.5, "custom: Pareto tail index (> 1 for a finite mean)", min=1, min_exclusive=True)
    wall_scale: float = opt(0.0, "wall clock: a worker sleeps (sampled training time x this) seconds per job, "
                            "to make stragglers on a homogeneous cluster (0 = no injected delay)", min=0, max=1e4)


@dataclass
class DistillConfig:
    """Server-side distillation shared by FedRevive and FedEcho (docs/algorithms.md §3.3, §4)."""
    teachers: int = opt(8, "teacher buffer size c (most recent client models)", min=1)
    ranks: int = opt(0, "ranks 1..D that join rank 0 in distilling (fedrevive, dd_fedrevive, fedecho): the teachers "
                     "are split over the group and it sums their share of each step; 0 = rank 0 alone (docs/design.md "
                     "'Distillation over a group of ranks')", min=0)
    beta: str = opt("cosine", "staleness weight beta(tau) of the hybrid blend (Eq. 3 and alternatives)",
                    choices=["cosine", "exponential", "linear", "step"])
    beta_lambda: float = opt(0.005, "exponential beta rate", min=0, min_exclusive=True)
    beta_gamma: float = opt(0.01, "linear beta slope", min=0, min_exclusive=True)
    freeze_versions: int = opt(50, "no DFKD below this version", min=0)
    warmup_versions: int = opt(100, "generator trains but KD is not applied below this version", min=0)
    synth_every: int = opt(1, "synthesise every N versions (the paper's T_gen = 10; its code: every call)", min=1)
    synth_steps: int = opt(2, "generator steps per synthesis", min=1)
    synth_batch: int = opt(64, "synthetic batch size", min=1)
    pretrain: int = opt(0, "meta-generator pre-training: this many extra syntheses (generator training, no KD) run "
                        "back to back at the first synthesis, when the run reaches freeze_versions, so the generator "
                        "and the pool are trained before KD starts; server work only, no virtual time; 0 = off (the "
                        "research code)", min=0)
    synth_labels: str = opt("mean", "labels of a synthesis batch: 'mean' (the research code: drawn from the "
                            "teachers' mean class mix, every teacher's losses on the whole batch) or 'teacher' "
                            "(one sub-batch per teacher drawn from its own q_k; each teacher's L_oh, L_bn and "
                            "L_adv on its own sub-batch, so its statistics meet its own class mix)",
                            choices=["mean", "teacher"])
    nz: int = opt(256, "generator noise dimension", min=1)
    ngf: int = opt(128, "generator width", min=1)
    gen_lr: float = opt(3e-3, "fast generator lr", min=0, min_exclusive=True)
    z_lr: float = opt(1e-3, "latent z / class embedding lr", min=0, min_exclusive=True)
    meta_lr: float = opt(0.0, "meta-generator (Reptile) lr; 0 = gen_lr, as the research code", min=0)
    meta: str = opt("reptile", "meta-update of the generator", choices=["reptile", "fomaml"])
    oh: float = opt(1.0, "weight of the one-hot loss L_oh", min=0)
    adv: float = opt(0.1, "weight of the adversarial loss L_adv", min=0)
    bn: float = opt(0.003, "weight of the feature-statistics loss L_bn", min=0)
    pool_size: int = opt(16000, "synthetic image pool size (FIFO)", min=1)
    kd_steps: int = opt(10, "distillation iterations per KD call", min=1)
    kd_lr: float = opt(1e-4, "student Adam lr", min=0, min_exclusive=True)
    kd_weight_decay: float = opt(1e-5, "student weight decay", min=0)
    kd_batch: int = opt(32, "images per teacher per KD iteration", min=1)
    temperature: float = opt(1.0, "KD temperature T", min=0, min_exclusive=True)
    proxy: str = opt("probe", "teacher class proportions q_k of synthesis labels and KD draws: the Gaussian-probe "
                     "proxy, the true label histograms (the research code), or uniform",
                     choices=["probe", "histogram", "uniform"])
    probes: int = opt(64, "Gaussian probe inputs for the proxy", min=1)
    probe_temperature: float = opt(0.8, "softmax temperature of the probe proxy", min=0, min_exclusive=True)
    embed_weight: float = opt(0.2, "weight of the class embedding in the generator input z + w E[y]", min=0)
    augment: str = opt("auto", "random crop (4-pixel reflect pad) and flip of synthetic images before the teachers "
                       "see them; auto = as client.augment (the teachers are only invariant to what they trained "
                       "with; the research code augments neither for 28x28 data)", choices=["auto", "true", "false"])
    kd_check_images: int = opt(256, "held-out images (validation split, else test split) on which every KD call's "
                               "effect on the loss is measured (run.h5 kd_checks, summary kd_loss_change); 0 = off",
                               min=0)
    dd_beta: float = opt(0.5, "dd_fedrevive: fixed KD share beta of the blend", min=0, max=1)
    dd_temperature: float = opt(2.0, "dd_fedrevive: KD temperature T", min=0, min_exclusive=True)
    dd_lr: float = opt(3e-4, "dd_fedrevive: student Adam lr (no weight decay)", min=0, min_exclusive=True)

    def meta_step_lr(self) -> float:
        """The meta-generator's lr: meta_lr, or gen_lr when meta_lr is 0 (the default)."""
        return self.meta_lr or self.gen_lr


@dataclass
class EchoConfig:
    """FedEcho reconstruction (docs/algorithms.md §4; our choices in algorithms/fedecho.py). The first
    reconstruction is echo.backbone=fedbuff echo.weighting=entropy echo.staleness_factor=none
    echo.kd_step=1 echo.kd_share=constant."""
    backbone: str = opt("ca2fl", "buffered parameter step", choices=["fedbuff", "ca2fl"])
    teachers: int = opt(10, "latest models of the C most recent distinct clients", min=1)
    weighting: str = opt("expert", "teacher weights: 'expert' (each synthetic image's class share q_k(y) times "
                         "the teacher's reliability; synthetic inputs only), 'relative' (certainty and agreement "
                         "with the ensemble, stale teachers scaled by an estimated reliability; for proxy inputs) "
                         "or 'entropy' (softmax(-H/gamma))", choices=["expert", "relative", "entropy"])
    gamma: float = opt(1.0, "temperature of the teacher weights' certainty score (nats)", min=0, min_exclusive=True)
    staleness_factor: str = opt("sqrt", "staleness prior s(tau_k) of each teacher: 'relative' weighting: the floor "
                                "of its reliability; 'entropy': a factor on its weights", choices=STALENESS_NAMES)
    kd_step: float = opt(0.3, "KD correction step eta_kd: new parameters x' + eta_kd * share * (student - x'); "
                         "0 = the backbone alone (tuned: 0.3 for 'expert', 0.1 for 'relative' on proxy inputs)",
                         min=0, max=1)
    kd_share: str = opt("staleness", "share of the KD correction: 'staleness' = distill.beta of B x the mean "
                        "staleness of the buffered updates (server.s_max); 'constant' = 1",
                        choices=["staleness", "constant"])
    inputs: str = opt("synthetic", "distillation inputs: generator samples or an unlabeled proxy split",
                      choices=["synthetic", "proxy"])
    norm_stats: str = opt("keep", "normalisation statistics of the new model: 'keep' the aggregated client "
                          "statistics (KD moves only parameters) or 'reset' them as FedRevive does",
                          choices=["keep", "reset"])


@dataclass
class FaultConfig:
    """Fault injection, for the failure tests: a worker (or the server) misbehaves on one job."""
    kind: str = opt("none", "what happens on job `job`: the worker raises, sends NaN, a wrong size, a wrong client, "
                    "NaN on every job from `job` on (nan_from), one entry of 3e38 (huge); or the server raises "
                    "processing it (server_raise)",
                    choices=["none", "raise", "nan", "bad_size", "bad_client", "nan_from", "huge", "server_raise"])
    job: int = opt(-1, "the job index that triggers the fault", min=-1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    delays: DelayConfig = field(default_factory=DelayConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    echo: EchoConfig = field(default_factory=EchoConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self):
        # Sections declared by plug-ins (`config_section = (name, dataclass)`, docs/extending.md), by name; not
        # dataclass fields: they exist only for the plug-ins a config names (resolve_plugin_sections).
        self.plugin_sections: dict[str, Any] = {}

    def __getattr__(self, name: str):
        """`cfg.fedprox`: a plug-in's section (only called for names that are not attributes)."""
        sections = self.__dict__.get("plugin_sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self),
                **{name: dataclasses.asdict(section) for name, section in self.plugin_sections.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        """Every key as TOML that `--config` reads back to an equal config, except `run.out`, written as a
        comment so that a rerun from the file gets a fresh directory instead of refusing the used one."""
        lines = []
        for section, body in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in body.items():
                prefix = "# " if (section, key) == ("run", "out") else ""
                lines.append(f"{prefix}{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if value == value else "nan"   # repr: shortest exact form (1e-05, inf, 0.5)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for the escapes: non-ASCII stays as UTF-8 text (JSON's
        # surrogate pairs for characters beyond the BMP are not TOML), and DEL, raw in JSON, is escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return str(value)


# Command-line shortcuts -> dotted keys.
SHORTCUTS = {
    "algorithm": "server.algorithm",
    "dataset": "data.dataset",
    "clock": "run.clock",
    "seed": "run.seed",
    "out": "run.out",
    "max_versions": "run.max_versions",
}


def _sections(cfg: Config | None = None) -> dict[str, type]:
    """The built-in sections, and those of the plug-ins `cfg` names."""
    sections = {f.name: get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    if cfg is not None:
        sections.update({name: type(section) for name, section in cfg.plugin_sections.items()})
    return sections


def all_keys(cfg: Config | None = None) -> dict[str, tuple[type, dataclasses.Field]]:
    """Every dotted key with its type and field (with `cfg`: its plug-in sections' keys too)."""
    keys = {}
    for section, cls in _sections(cfg).items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys[f"{section}.{f.name}"] = (hints[f.name], f)
    return keys


def _unknown_key(key: str, cfg: Config | None = None) -> ConfigError:
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
    """Field constraints, then the rules that tie several keys together."""
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
    if cfg.server.algorithm == "dd_fedrevive" and d.kd_fraction <= 0:
        raise ConfigError("config key 'data.kd_fraction': dd_fedrevive distils on the real KD split, "
                          "so it must be > 0 (the paper uses 0.1)")
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
    if cfg.distill.ranks and cfg.model.norm == "batchnorm" and s.algorithm in ("fedrevive", "dd_fedrevive"):
        raise ConfigError("config key 'distill.ranks': with model.norm = 'batchnorm' the KD student's running "
                          "statistics depend on the order of all teachers' batches, which a group does not keep; "
                          "use distill.ranks = 0 or model.norm = 'stat' (the default)")
    if cfg.echo.weighting == "expert" and cfg.echo.inputs != "synthetic":
        raise ConfigError("config key 'echo.weighting': 'expert' (the default) weights each image by the class it "
                          "was generated for, so it needs echo.inputs = 'synthetic' (proxy images have no class); "
                          "with echo.inputs = 'proxy' set echo.weighting = 'relative' (and echo.kd_step = 0.1, "
                          "its value tuned on proxy inputs)")
    if cfg.server.algorithm == "fedecho" and cfg.echo.inputs == "proxy" and d.kd_fraction <= 0:
        raise ConfigError("config key 'data.kd_fraction': fedecho with echo.inputs = 'proxy' distils on the "
                          "held-out split, so it must be > 0")
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
    return cfg


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
            raise _unknown_key(key, cfg)
        typ, _ = keys[key]
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, _coerce(key, typ, value, from_text))


def apply_layers(cfg: Config, layers: list[tuple[dict[str, Any], bool, str]]) -> None:
    """Apply (values, from_text, source) layers in order, later ones winning. Keys of sections that are not
    built in are kept back until every built-in key is set: only then is it known which plug-ins the config
    names, and so which sections they declare (resolve_plugin_sections); a key of no such section is an error."""
    builtin = _sections()
    deferred: dict[str, tuple[Any, bool, str]] = {}
    for values, from_text, source in layers:
        apply(cfg, {k: v for k, v in values.items() if k.split(".")[0] in builtin}, from_text=from_text)
        deferred.update({k: (v, from_text, source) for k, v in values.items() if k.split(".")[0] not in builtin})
    resolve_plugin_sections(cfg, strict=bool(deferred))
    for key, (value, from_text, source) in deferred.items():
        section = key.split(".")[0]
        if section not in cfg.plugin_sections:
            sections = _sections(cfg)
            close = difflib.get_close_matches(section, list(sections), n=1)
            hint = (f"; did you mean '{close[0]}'?" if close else f"; allowed sections: {', '.join(sections)}, "
                    "and the sections of the plug-ins the config names (docs/extending.md)")
            if source == "command line":
                if difflib.get_close_matches(key, list(all_keys(cfg)), n=1, cutoff=0.6):
                    raise _unknown_key(key, cfg)
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
    from . import plugins
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
    if name in _sections():
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


def _flatten_toml(data: dict, source: str) -> dict[str, Any]:
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
    return _flatten_toml(data, str(path))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; allowed values: {', '.join(preset_names())}")
    return path


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
            ("--print-config", "print the resolved config as TOML (--format json: JSON) and exit")]
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
    short = p.add_argument_group("shortcuts")
    keys = all_keys()
    for flag, key in SHORTCUTS.items():
        _, f = keys[key]
        short.add_argument(f"--{flag.replace('_', '-')}", dest=key, default=None, metavar="VALUE",
                           help=f"= --{key} (default: {_default(f)!r})")
    for section in _sections():
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
    builtin = _sections()
    values, i = {}, 0
    while i < len(unknown):
        token = unknown[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key=VALUE")
        key, eq, value = token[2:].partition("=")
        if key.count(".") != 1 or key.split(".")[0] in builtin:
            raise _unknown_key(key.replace("-", "_"))
        if not eq:
            if i + 1 == len(unknown) or unknown[i + 1].startswith("--"):
                raise ConfigError(f"config key '{key}': no value given; use --{key}=VALUE")
            i, value = i + 1, unknown[i + 1]
        values[key] = value
        i += 1
    return values


# Keys a resumed run may change: stop rules, logging, placement and the distillation group's size
# (distill.ranks: the continued run is valid, but sums over another group size differ in the last bits, so it is
# not bit-identical to one that kept D). Everything else (data, model, algorithm, seed, clock, ...) decides the
# result, so changing it would not continue the same run.
RESUMABLE = {"run.max_versions", "run.max_updates", "run.max_virtual_time", "run.max_wall_seconds",
             "run.target_accuracy",
             "run.diverged_after",
             "run.eval_every", "run.checkpoint_every", "run.log_flush_seconds", "run.heartbeat_seconds",
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
    apply_layers(cfg, [(_flatten_toml(data, "config"), False, "config")])
    return validate(cfg)
