"""Plug-ins by import path: the examples/ algorithm, model and data set under real mpiexec, resume of a
plug-in run, and the errors for a wrong path or a broken contract."""

import pytest

from mpi_afl import plugins
from mpi_afl.config import ConfigError, from_dict, parse_args
from mpi_afl.results import load
from mpi_helpers import HANG_GUARD, REPO, launch, ok, refused_at_start, summary
PLUGINS = ["--server.algorithm=examples.custom_algorithm:ClippedAsync", "--model.name=examples.custom_model:mlp",
           "--data.dataset=examples.custom_dataset:stripes"]
SMALL = ["--data.num_clients=12", "--server.concurrency=4", "--client.iterations=5", "--run.eval_every=10"]


def run(ranks: int, args: list[str], **kw):
    # examples/ is found through PYTHONPATH on every rank, as a user's own package would be
    return launch(ranks, args, cwd=REPO, **kw)


@pytest.mark.mpi
@pytest.mark.slow
def test_examples_run_under_mpiexec_and_learn(tmp_path):
    out = tmp_path / "plug"
    ok(run(3, [*PLUGINS, *SMALL, "--max-versions", "20", "--out", str(out)]))
    s = summary(out)
    assert s["world_size"] == 3 and s["versions"] == 20
    assert s["algorithm"] == "examples.custom_algorithm:ClippedAsync"
    assert s["final_accuracy"] > 0.6, s  # 4 stripe classes: chance is 0.25
    run_ = load(out)
    assert run_.label == "ClippedAsync s0"
    weights = run_.tables["arrivals"]["weight"]
    assert ((weights > 0) & (weights <= 1)).all() and (weights < 1).any()   # clipping happened


@pytest.mark.slow
def test_plugin_run_resumes_bit_identically(tmp_path):
    args = [*PLUGINS, *SMALL, "--seed", "2"]
    whole, half = tmp_path / "whole", tmp_path / "half"
    ok(run(1, [*args, "--max-versions", "20", "--out", str(whole)]))
    ok(run(1, [*args, "--max-versions", "10", "--out", str(half)]))
    ok(run(1, ["--resume", str(half), "--max-versions", "20"]))
    assert summary(half)["model_sha256"] == summary(whole)["model_sha256"]


@pytest.mark.parametrize("value, message", [
    ("examples.nope:X", "cannot import module 'examples.nope'"),
    ("examples.custom_algorithm:Missing", "has no attribute 'Missing'"),
    ("examples.custom_model:mlp", "not a subclass of mpi_afl.algorithms.base.Algorithm"),
    ("examples.custom_algorithm:", "is not an import path"),
])
def test_bad_algorithm_path_is_a_config_error(value, message):
    cfg, _ = parse_args([f"--server.algorithm={value}"])
    with pytest.raises(ConfigError, match="config key 'server.algorithm'") as e:
        plugins.check(cfg)
    assert message in str(e.value)


def test_bad_plugin_stops_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    line = refused_at_start(["--model.name=examples.custom_dataset:nothing", "--out", str(tmp_path / "x")], capsys)
    assert line.startswith("mpi_afl: error: config key 'model.name': module 'examples.custom_dataset' has no "
                           "attribute")


@pytest.mark.mpi
@pytest.mark.slow
def test_contract_breach_found_after_start_ends_every_rank(tmp_path):
    # A loader is only called once the ranks have started: the data set "loader" here returns a model.
    proc = run(3, ["--data.dataset=examples.custom_model:mlp", "--out", str(tmp_path / "x")], timeout=HANG_GUARD)
    assert proc.returncode != 0
    assert "config key 'data.dataset'" in proc.stderr


# ------------------------------------------------------------------ client-side: client.trainer
FEDPROX = "--client.trainer=examples.fedprox:FedProx"


@pytest.mark.mpi
@pytest.mark.slow
def test_fedprox_runs_under_mpiexec_identically_for_any_rank_count_and_resumes(tmp_path):
    args = [FEDPROX, *SMALL, "--seed", "3"]
    three, one, half = tmp_path / "three", tmp_path / "one", tmp_path / "half"
    ok(run(3, [*args, "--max-versions", "20", "--out", str(three)]))
    ok(run(1, [*args, "--max-versions", "20", "--out", str(one)]))
    ok(run(3, [*args, "--max-versions", "10", "--out", str(half)]))
    ok(run(3, ["--resume", str(half), "--max-versions", "20"]))
    assert summary(three)["model_sha256"] == summary(one)["model_sha256"] == summary(half)["model_sha256"]
    assert summary(three)["final_accuracy"] > 0.5, summary(three)["evals"]
    plain = tmp_path / "plain"
    ok(run(1, [*SMALL, "--seed", "3", "--max-versions", "20", "--out", str(plain)]))
    assert summary(plain)["model_sha256"] != summary(one)["model_sha256"]   # the proximal term is in the loss


def test_proximal_term_keeps_local_models_closer_to_the_base(monkeypatch):
    """In process: the same job with plain cross-entropy, FedProx (fedprox.mu 0.01, its default) and a strong
    FedProx (--fedprox.mu=10); the built-in trainer gives train_job's result bit for bit."""
    import torch
    monkeypatch.syspath_prepend(str(REPO))
    from examples.fedprox import FedProx
    from mpi_afl.client.local_train import train_job
    from mpi_afl.client.trainer import LocalTrainer
    from mpi_afl.models import build_model
    from mpi_afl.models.flat import flatten
    from mpi_afl.transport.messages import JobSpec
    cfg, _ = parse_args(["--client.iterations=20"])
    weak, _ = parse_args(["--client.iterations=20", FEDPROX])
    strong, _ = parse_args(["--client.iterations=20", FEDPROX, "--fedprox.mu=10"])
    assert (weak.fedprox.mu, strong.fedprox.mu) == (0.01, 10.0)
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, image_size=8, num_classes=10, norm="stat")
    base = flatten(model).clone()
    g = torch.Generator().manual_seed(1)
    x, y, indices = torch.randn(64, 1, 8, 8, generator=g), torch.randint(10, (64,), generator=g), torch.arange(64)
    norms = {}
    for name, trainer in (("plain", LocalTrainer(cfg)), ("weak", FedProx(weak)), ("strong", FedProx(strong))):
        result = trainer.train(model, base, x, y, indices, JobSpec(5, 2, 0, 0.0))
        norms[name] = float(result.delta.norm())
        if name == "plain":
            c = cfg.client
            plain = train_job(model, base, x, y, indices, iterations=c.iterations, batch_size=c.batch_size,
                              optimizer=c.optimizer, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                              augment=c.augment, seed=cfg.run.seed, job=JobSpec(5, 2, 0, 0.0))
            assert torch.equal(plain.delta, result.delta)
    assert norms["strong"] < norms["weak"] <= norms["plain"] * 1.001


@pytest.mark.parametrize("value, message", [
    ("examples.custom_model:mlp", "not a subclass of mpi_afl.client.trainer.LocalTrainer"),
    ("examples.fedprox:Missing", "has no attribute 'Missing'"),
])
def test_bad_trainer_path_is_a_config_error(value, message, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg, _ = parse_args([f"--client.trainer={value}"])
    with pytest.raises(ConfigError, match="config key 'client.trainer'") as e:
        plugins.check(cfg)
    assert message in str(e.value)


# ------------------------------------------------------------------ a plug-in's own config section
def test_plugin_section_on_the_command_line_in_toml_and_in_print_config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg, _ = parse_args([FEDPROX, "--fedprox.mu=0.1"])
    assert cfg.fedprox.mu == 0.1 and cfg.to_dict()["fedprox"] == {"mu": 0.1}
    assert parse_args([FEDPROX, "--fedprox.mu", "0.2"])[0].fedprox.mu == 0.2
    assert parse_args([FEDPROX])[0].fedprox.mu == 0.01                       # the dataclass default
    assert "fedprox" not in parse_args([])[0].to_dict()                      # only for the plug-ins a config names
    toml = tmp_path / "prox.toml"
    toml.write_text('[client]\ntrainer = "examples.fedprox:FedProx"\n\n[fedprox]\nmu = 0.5\n')
    assert parse_args(["--config", str(toml)])[0].fedprox.mu == 0.5
    assert parse_args(["--config", str(toml), "--fedprox.mu=2"])[0].fedprox.mu == 2.0   # the command line wins
    printed = parse_args([FEDPROX, "--fedprox.mu=0.3"])[0].to_toml()
    assert "[fedprox]\nmu = 0.3\n" in printed
    again = tmp_path / "again.toml"
    again.write_text(printed)
    assert parse_args(["--config", str(again)])[0].to_dict() == parse_args([FEDPROX, "--fedprox.mu=0.3"])[0].to_dict()
    assert from_dict(cfg.to_dict()).fedprox.mu == 0.1                         # broadcast and checkpoint form


@pytest.mark.parametrize("argv, message", [
    ([FEDPROX, "--fedprox.nu=1"], "unknown config key 'fedprox.nu'; did you mean 'fedprox.mu'?"),
    ([FEDPROX, "--fedprox.mu=strong"], "config key 'fedprox.mu': 'strong' is not a number"),
    ([FEDPROX, "--fedprox.mu=-1"], "config key 'fedprox.mu': -1.0 is out of range; must be >= 0"),
    ([FEDPROX, "--fedprox.mu=nan"], "config key 'fedprox.mu': nan is not a finite number"),
    ([FEDPROX, "--fedprox.mu"], "config key 'fedprox.mu': no value given"),
    (["--fedprox.mu=1"], "unknown config key 'fedprox.mu': no built-in section or section of a plug-in"),
])
def test_plugin_section_errors_name_the_key(argv, message, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert message in str(e.value)


def test_plugin_section_errors_in_toml_name_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    toml = tmp_path / "bad.toml"
    toml.write_text('[client]\ntrainer = "examples.fedprox:FedProx"\n\n[fedprox]\nmu = "high"\n')
    with pytest.raises(ConfigError, match="config key 'fedprox.mu': 'high' is not a number"):
        parse_args(["--config", str(toml)])
    toml.write_text('[fedprox]\nmu = 1.0\n')
    with pytest.raises(ConfigError, match="bad.toml: unknown config section 'fedprox'"):
        parse_args(["--config", str(toml)])


def test_a_resume_keeps_the_plugin_section(monkeypatch):
    monkeypatch.chdir(REPO)
    stored = parse_args([FEDPROX, "--fedprox.mu=0.1"])[0].to_dict()
    cfg, _ = parse_args(["--resume", "somewhere", "--max-versions", "200"], resume_config=lambda _: stored)
    assert cfg.fedprox.mu == 0.1
    with pytest.raises(ConfigError, match="cannot resume with config key 'fedprox.mu' = 1.0"):
        parse_args(["--resume", "somewhere", "--fedprox.mu=1"], resume_config=lambda _: stored)


BAD_DECLARATIONS = """
from dataclasses import dataclass, field
from mpi_afl.client.trainer import LocalTrainer

@dataclass
class Nested:
    table: dict = field(default_factory=dict)

@dataclass
class NoDefault:
    x: int

class NotATuple(LocalTrainer):
    config_section = "mine"

class BuiltIn(LocalTrainer):
    config_section = ("server", NoDefault)

class WrongType(LocalTrainer):
    config_section = ("mine", Nested)

class Required(LocalTrainer):
    config_section = ("mine", NoDefault)
"""


@pytest.mark.parametrize("name, message", [
    ("NotATuple", "expected a tuple (name, dataclass)"),
    ("BuiltIn", "'server' is a built-in section"),
    ("WrongType", "field 'table' has type"),
    ("Required", "field 'x' has no default"),
])
def test_a_bad_section_declaration_is_a_config_error_naming_the_plugin_key(name, message, tmp_path, monkeypatch):
    (tmp_path / "bad_sections.py").write_text(BAD_DECLARATIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="config key 'client.trainer': 'bad_sections:") as e:
        parse_args([f"--client.trainer=bad_sections:{name}", "--mine.x=1"])
    assert message in str(e.value)


CHECKED_ALGORITHMS = """
from mpi_afl.algorithms.fedasync import FedAsync
from mpi_afl.algorithms.fedrevive import FedRevive
from mpi_afl.config import ConfigError

class OddConcurrency(FedAsync):
    @classmethod
    def check_config(cls, cfg):
        if cfg.server.concurrency % 2 == 0:
            raise ConfigError(f"config key 'server.concurrency': {cfg.server.concurrency} is even")

class Revived(FedRevive):
    pass
"""


def test_a_plugin_algorithm_checks_its_config_as_a_built_in_does(tmp_path, monkeypatch):
    (tmp_path / "checked_plugins.py").write_text(CHECKED_ALGORITHMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="config key 'server.concurrency': 8 is even"):
        parse_args(["--server.algorithm=checked_plugins:OddConcurrency"])
    parse_args(["--server.algorithm=checked_plugins:OddConcurrency", "--server.concurrency=7"])
    batchnorm_group = ["--distill.ranks=1", "--model.norm=batchnorm"]
    with pytest.raises(ConfigError, match="config key 'distill.ranks': with model.norm = 'batchnorm'"):
        parse_args(["--server.algorithm=checked_plugins:Revived", *batchnorm_group])   # FedRevive's rule, inherited
    parse_args(["--server.algorithm=fedbuff", *batchnorm_group])   # a rule of the algorithm, not of the keys


@pytest.mark.mpi
@pytest.mark.slow
def test_plugin_section_under_mpiexec(tmp_path):
    """A short run of the FedProx trainer with its own key under mpiexec -n 3."""
    out = tmp_path / "prox"
    ok(run(3, [FEDPROX, "--fedprox.mu=10", *SMALL, "--max-versions", "8", "--out", str(out)]))
    s = summary(out)
    assert s["world_size"] == 3 and s["versions"] == 8
    assert "[fedprox]\nmu = 10.0\n" in (out / "config.toml").read_text()
    assert load(out).config["fedprox"] == {"mu": 10.0}


def test_a_bad_plugin_section_value_stops_the_start_with_one_line(tmp_path, capsys, monkeypatch):
    """Exit 2 with one line (rank 0 parses the config for every rank of a launched run)."""
    monkeypatch.chdir(REPO)
    line = refused_at_start([FEDPROX, "--fedprox.mu=-2", *SMALL, "--out", str(tmp_path / "bad")], capsys)
    assert line == "mpi_afl: error: config key 'fedprox.mu': -2.0 is out of range; must be >= 0"
    assert not (tmp_path / "bad").exists()
