"""Plug-ins by import path: the examples/ algorithm, model and data set under real mpiexec, resume of a
plug-in run, and the errors for a wrong path or a broken contract."""

from pathlib import Path

import pytest

from mpi_afl import plugins
from mpi_afl.config import ConfigError, parse_args
from mpi_afl.results import load
from mpi_helpers import HANG_GUARD, launch, summary

REPO = Path(__file__).resolve().parents[1]
PLUGINS = ["--server.algorithm=examples.custom_algorithm:ClippedAsync", "--model.name=examples.custom_model:mlp",
           "--data.dataset=examples.custom_dataset:stripes"]
SMALL = ["--data.num_clients=12", "--server.concurrency=4", "--client.iterations=5", "--run.eval_every=10"]


def run(ranks: int, args: list[str], **kw):
    # examples/ is found through PYTHONPATH on every rank, as a user's own package would be
    return launch(ranks, args, cwd=REPO, **kw)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_examples_run_under_mpiexec_and_learn(tmp_path):
    out = tmp_path / "plug"
    _ok(run(3, [*PLUGINS, *SMALL, "--max-versions", "20", "--out", str(out)]))
    s = summary(out)
    assert s["world_size"] == 3 and s["versions"] == 20
    assert s["algorithm"] == "examples.custom_algorithm:ClippedAsync"
    assert s["final_accuracy"] > 0.6, s  # 4 stripe classes: chance is 0.25
    run_ = load(out)
    assert run_.label == "ClippedAsync s0"
    weights = run_.tables["arrivals"]["weight"]
    assert ((weights > 0) & (weights <= 1)).all() and (weights < 1).any()   # clipping happened


def test_plugin_run_resumes_bit_identically(tmp_path):
    args = [*PLUGINS, *SMALL, "--seed", "2"]
    whole, half = tmp_path / "whole", tmp_path / "half"
    _ok(run(1, [*args, "--max-versions", "20", "--out", str(whole)]))
    _ok(run(1, [*args, "--max-versions", "10", "--out", str(half)]))
    _ok(run(1, ["--resume", str(half), "--max-versions", "20"]))
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


def test_bad_plugin_stops_the_run_with_one_line(tmp_path):
    proc = run(1, ["--model.name=examples.custom_dataset:nothing", "--out", str(tmp_path / "x")], timeout=HANG_GUARD)
    assert proc.returncode == 2
    assert "mpi_afl: error: config key 'model.name': module 'examples.custom_dataset' has no attribute" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


def test_contract_breach_found_after_start_ends_every_rank(tmp_path):
    # A loader is only called once the ranks have started: the data set "loader" here returns a model.
    proc = run(3, ["--data.dataset=examples.custom_model:mlp", "--out", str(tmp_path / "x")], timeout=HANG_GUARD)
    assert proc.returncode != 0
    assert "config key 'data.dataset'" in proc.stderr


# ------------------------------------------------------------------ client-side: client.trainer
FEDPROX = "--client.trainer=examples.fedprox:FedProx"


def test_fedprox_runs_under_mpiexec_identically_for_any_rank_count_and_resumes(tmp_path):
    args = [FEDPROX, *SMALL, "--seed", "3"]
    three, one, half = tmp_path / "three", tmp_path / "one", tmp_path / "half"
    _ok(run(3, [*args, "--max-versions", "20", "--out", str(three)]))
    _ok(run(1, [*args, "--max-versions", "20", "--out", str(one)]))
    _ok(run(3, [*args, "--max-versions", "10", "--out", str(half)]))
    _ok(run(3, ["--resume", str(half), "--max-versions", "20"]))
    assert summary(three)["model_sha256"] == summary(one)["model_sha256"] == summary(half)["model_sha256"]
    assert summary(three)["final_accuracy"] > 0.5, summary(three)["evals"]
    plain = tmp_path / "plain"
    _ok(run(1, [*SMALL, "--seed", "3", "--max-versions", "20", "--out", str(plain)]))
    assert summary(plain)["model_sha256"] != summary(one)["model_sha256"]   # the proximal term is in the loss


def test_proximal_term_keeps_local_models_closer_to_the_base():
    """In process: the same job with plain cross-entropy, FedProx (mu 0.01) and a strong FedProx (mu 10);
    the built-in trainer gives train_job's result bit for bit."""
    import sys
    import torch
    sys.path.insert(0, str(REPO))
    from examples.fedprox import FedProx, FedProxStrong
    from mpi_afl.client.local_train import train_job
    from mpi_afl.client.trainer import LocalTrainer
    from mpi_afl.models import build_model
    from mpi_afl.models.flat import flatten
    cfg, _ = parse_args(["--client.iterations=20"])
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, image_size=8, num_classes=10, norm="stat")
    base = flatten(model).clone()
    g = torch.Generator().manual_seed(1)
    x, y, indices = torch.randn(64, 1, 8, 8, generator=g), torch.randint(10, (64,), generator=g), torch.arange(64)
    norms = {}
    for cls in (LocalTrainer, FedProx, FedProxStrong):
        result = cls(cfg).train(model, base, x, y, indices, client_id=2, job_index=5)
        norms[cls.__name__] = float(result.delta.norm())
        if cls is LocalTrainer:
            c = cfg.client
            plain = train_job(model, base, x, y, indices, iterations=c.iterations, batch_size=c.batch_size,
                              optimizer=c.optimizer, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                              augment=c.augment, seed=cfg.run.seed, client_id=2, job_index=5)
            assert torch.equal(plain.delta, result.delta)
    assert norms["FedProxStrong"] < norms["FedProx"] <= norms["LocalTrainer"] * 1.001


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
