"""The config's schema: `opt` (a field with its help text and limits), one dataclass per section, `Config`.

Every key's default, type, help text and allowed values are here; mpi_afl/config/parsing.py checks values
against them and mpi_afl/config/command_line.py turns them into the command line and its help.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from ..names import ALGORITHMS, DATASETS, MODELS


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
    log_level: str = opt("info", "the console's lines: 'info' all, 'quiet' warnings and errors only (--quiet), "
                         "'verbose' also one per arrival (--verbose); OUT/server.log has every line from INFO "
                         "up whatever the console shows", choices=["info", "quiet", "verbose"])
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
                       choices=list(DATASETS), plugin=True)
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
                    choices=list(MODELS), plugin=True)
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
                         choices=list(ALGORITHMS), plugin=True)
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
                lines.append(f"{prefix}{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if value == value else "nan"   # repr: shortest exact form (1e-05, inf, 0.5)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for the escapes: non-ASCII stays as UTF-8 text (JSON's
        # surrogate pairs for characters beyond the BMP are not TOML), and DEL, raw in JSON, is escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return str(value)



def section_classes(cfg: Config | None = None) -> dict[str, type]:
    """The built-in sections, and those of the plug-ins `cfg` names."""
    sections = {f.name: get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    if cfg is not None:
        sections.update({name: type(section) for name, section in cfg.plugin_sections.items()})
    return sections


def all_keys(cfg: Config | None = None) -> dict[str, tuple[type, dataclasses.Field]]:
    """Every dotted key with its type and field (with `cfg`: its plug-in sections' keys too)."""
    keys = {}
    for section, cls in section_classes(cfg).items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys[f"{section}.{f.name}"] = (hints[f.name], f)
    return keys

