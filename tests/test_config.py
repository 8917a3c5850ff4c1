"""Config: every mistake is a ConfigError naming the key and the bad value; overrides, shortcuts, round trip,
and the trainer's command line (--help, --print-config, exit code 2 on a bad key or value) through its start-up
in process, with one launched --print-config."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

from mpi_afl.config import Config, ConfigError, from_dict, parse_args
from mpi_afl.config.command_line import SHORTCUTS
from mpi_afl.config.schema import all_keys
from mpi_afl.names import ALGORITHMS, DATASETS, MODELS
from mpi_afl.run.startup import rank0_setup
from mpi_helpers import HANG_GUARD


def error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- command-line mistakes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    # a typo (one letter doubled) names the bad key and suggests the right one
    (["--client.lrr=0.01"], ["'client.lrr'", "did you mean 'client.lr'"]),
    (["--client.lrr", "0.01"], ["'client.lrr'", "did you mean 'client.lr'"]),
    (["--serverr.lr=0.5"], ["'serverr.lr'", "did you mean 'server.lr'"]),
    # wrong types given as text
    (["--run.seed=abc"], ["'run.seed'", "'abc'", "integer"]),
    (["--run.seed=1.5"], ["'run.seed'", "'1.5'", "integer"]),
    (["--client.lr=fast"], ["'client.lr'", "'fast'", "number"]),
    (["--run.overwrite=maybe"], ["'run.overwrite'", "'maybe'", "boolean"]),
    # impossible values
    (["--client.lr=0"], ["'client.lr'", "0.0", "> 0"]),
    (["--server.lr=-1"], ["'server.lr'", "-1.0", "> 0"]),
    (["--data.alpha=0"], ["'data.alpha'", "0.0", "> 0"]),
    (["--data.alpha=-0.5"], ["'data.alpha'", "-0.5", "> 0"]),
    (["--data.val_fraction=0.95"], ["'data.val_fraction'", "0.95", "<= 0.9"]),
    (["--server.concurrency=30"], ["'server.concurrency'", "30", "data.num_clients = 20", "1..20"]),
    (["--data.val_fraction=0.5", "--data.test_fraction=0.5"],
     ["'data.val_fraction'", "'data.test_fraction'", "'data.kd_fraction'", "= 1;", "< 0.95"]),
    (["--max-versions=0"], ["'run.max_versions'", "'run.max_virtual_time'", "'run.max_wall_seconds'",
                            "'run.target_accuracy'", "never stop"]),
    (["--delays.train_means=1,2"], ["'delays.train_means'", "[1.0, 2.0]", "'delays.train_probs'"]),
    (["--delays.train_probs=0.5,0.4,0.2"], ["'delays.train_probs'", "[0.5, 0.4, 0.2]", "sum to 1"]),
    # custom delays: no negative times (they would run the virtual clock backwards)
    (["--delays.train_means=-1", "--delays.train_probs=1"], ["'delays.train_means'", "[-1.0]", "> 0"]),
    (["--delays.train_probs=1.5,-0.5,0"], ["'delays.train_probs'", "[1.5, -0.5, 0.0]", ">= 0"]),
    (["--delays.upload_means=-0.5"], ["'delays.upload_means'", "[-0.5]", ">= 0"]),
    (["--delays.upload_means=0.01", "--delays.upload_spread=0.05"], ["'delays.upload_spread'", "0.05", "0.01"]),
    (["stray"], ["'stray'", "--section.key=VALUE"]),
    # FedEcho's class-expert weights need the class each synthetic image was made for
    (["--echo.weighting=expert", "--echo.inputs=proxy", "--data.kd_fraction=0.1"],
     ["'echo.weighting'", "'expert'", "echo.inputs = 'synthetic'"]),
    # ... which is the default, so proxy inputs alone name the setting to change
    (["--algorithm=fedecho", "--echo.inputs=proxy", "--data.kd_fraction=0.1"],
     ["'echo.weighting'", "(the default)", "echo.weighting = 'relative'"]),
])
def test_command_line_errors_name_key_and_value(argv, expected):
    message = error(argv)
    for text in expected:
        assert text in message, f"{text!r} missing from {message!r}"


@pytest.mark.parametrize("argv, key, bad, allowed", [
    (["--algorithm=fedbuf"], "server.algorithm", "fedbuf", list(ALGORITHMS)),
    (["--server.algorithm", "fedprox"], "server.algorithm", "fedprox", list(ALGORITHMS)),
    (["--dataset=imagenet"], "data.dataset", "imagenet", list(DATASETS)),
    (["--model.name=vgg16"], "model.name", "vgg16", list(MODELS)),
    (["--clock=cpu"], "run.clock", "cpu", ["virtual", "wall"]),
])
def test_unknown_choice_lists_allowed_values(argv, key, bad, allowed):
    message = error(argv)
    assert f"'{key}'" in message and f"'{bad}'" in message
    listed = message.split("allowed values:")[1]
    assert [v.strip() for v in listed.split(",")] == allowed


def test_preset_and_config_together_is_an_error(tmp_path):
    message = error(["--preset", "anything", "--config", write(tmp_path, "")])
    assert "--preset" in message and "--config" in message


def test_unknown_preset_is_named():
    assert "'no-such-preset'" in error(["--preset", "no-such-preset"])


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.toml"
    message = error(["--config", str(path)])
    assert "not found" in message and str(path) in message


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[server\nlr = 1\n")
    message = error(["--config", path])
    assert "not valid TOML" in message and path in message


# --- TOML mistakes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("[sevrer]\nlr = 1.0\n", ["unknown config section 'sevrer'", "did you mean 'server'"]),
    ("[zzz]\nlr = 1.0\n", ["unknown config section 'zzz'", "allowed sections: run, data, model, client, server"]),
    ("run = 3\n", ["'run' must be a table"]),
    ("[client]\nlrr = 0.01\n", ["'client.lrr'", "did you mean 'client.lr'"]),
    ("[run]\nseed = \"3\"\n", ["'run.seed'", "'3'", "integer"]),
    ("[run]\nseed = true\n", ["'run.seed'", "True", "integer"]),
    ("[client]\nlr = true\n", ["'client.lr'", "True", "number"]),
    ("[client]\nlr = \"0.1\"\n", ["'client.lr'", "'0.1'", "number"]),
    ("[run]\noverwrite = 1\n", ["'run.overwrite'", "1", "boolean"]),
    ("[model]\nname = 3\n", ["'model.name'", "3", "string"]),
    ("[delays]\ntrain_means = 1.0\n", ["'delays.train_means'", "1.0", "list of float"]),
    ("[delays]\ntrain_means = [1.0, \"x\"]\n", ["'delays.train_means'", "'x'", "number"]),
])
def test_toml_errors_name_key_and_value(tmp_path, text, expected):
    message = error(["--config", write(tmp_path, text)])
    for part in expected:
        assert part in message, f"{part!r} missing from {message!r}"


# --- what works ------------------------------------------------------------------------------------------------

def test_defaults_validate():
    cfg, _ = parse_args([])
    expected = Config()
    expected.distill.augment, expected.distill.meta_lr = "false", expected.distill.gen_lr
    assert cfg == expected


@pytest.mark.parametrize("argv, augment, meta_lr", [
    ([], "false", 3e-3),                                                  # follows client.augment, gen_lr
    (["--client.augment=true", "--distill.gen_lr=0.01"], "true", 0.01),
    (["--client.augment=true", "--distill.augment=false", "--distill.meta_lr=0.001"], "false", 0.001),
])
def test_synthesis_augmentation_and_meta_lr_follow_the_client_and_generator_by_default(argv, augment, meta_lr):
    cfg, _ = parse_args(argv)
    assert cfg.distill.augment == augment and cfg.distill.meta_lr == meta_lr


def test_shortcuts_map_to_their_keys():
    cfg, _ = parse_args(["--algorithm", "fedasync", "--dataset=mnist", "--clock", "wall", "--seed=7",
                         "--out", "somewhere", "--max-versions", "12"])
    assert (cfg.server.algorithm, cfg.data.dataset, cfg.run.clock) == ("fedasync", "mnist", "wall")
    assert (cfg.run.seed, cfg.run.out, cfg.run.max_versions) == (7, "somewhere", 12)
    assert set(SHORTCUTS.values()) == {"server.algorithm", "data.dataset", "run.clock", "run.seed", "run.out",
                                       "run.max_versions"}


@pytest.mark.parametrize("argv", [["--client.lr=0.05"], ["--client.lr", "0.05"]])
def test_dotted_override_both_forms(argv):
    cfg, _ = parse_args(argv)
    assert cfg.client.lr == 0.05 and isinstance(cfg.client.lr, float)


@pytest.mark.parametrize("means, probs", [("1,2", "0.5,0.5"), ("[1, 2]", "[0.5, 0.5]"), (" 1 , 2 ", "0.5,0.5")])
def test_list_override(means, probs):
    cfg, _ = parse_args([f"--delays.train_means={means}", f"--delays.train_probs={probs}"])
    assert cfg.delays.train_means == [1.0, 2.0] and cfg.delays.train_probs == [0.5, 0.5]
    assert all(isinstance(v, float) for v in cfg.delays.train_means)


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
                                         ("false", False), ("FALSE", False), ("0", False), ("no", False),
                                         ("off", False)])
def test_bool_override(text, value):
    cfg, _ = parse_args([f"--run.overwrite={text}", f"--client.augment={text}"])
    assert cfg.run.overwrite is value and cfg.client.augment is value


def test_toml_file_then_command_line_wins(tmp_path):
    path = write(tmp_path, "[server]\nalgorithm = \"fedasync\"\nlr = 1\nmixing = 0.8\n"
                           "[delays]\ntrain_means = [2, 3]\ntrain_probs = [0.5, 0.5]\n[run]\nseed = 4\n")
    cfg, _ = parse_args(["--config", path, "--server.mixing=0.9", "--seed", "5"])
    assert cfg.server.algorithm == "fedasync"
    assert cfg.server.lr == 1.0 and isinstance(cfg.server.lr, float)  # a TOML int is accepted for a float
    assert cfg.server.mixing == 0.9 and cfg.run.seed == 5
    assert cfg.delays.train_means == [2.0, 3.0]


def test_from_dict_round_trip():
    cfg, _ = parse_args(["--algorithm=afl_dw", "--seed=3", "--client.lr=0.02", "--run.overwrite=true",
                         "--delays.train_means=0.5,1", "--delays.train_probs=0.25,0.75", "--data.num_clients=40"])
    again = from_dict(cfg.to_dict())
    assert again == cfg and again is not cfg
    assert again.to_json() == cfg.to_json()


def test_from_dict_rejects_unknown_and_invalid():
    data = Config().to_dict()
    data["client"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match="client.lr'"):
        from_dict(data)
    data = Config().to_dict()
    data["server"]["lr"] = 0.0
    with pytest.raises(ConfigError, match="server.lr"):
        from_dict(data)


# --- the command line of `python -m mpi_afl.train` ------------------------------------------------------------

@pytest.fixture
def train(monkeypatch, capsys):
    """train(args, cwd): `python -m mpi_afl.train ARGS` in `cwd` up to the end of its start-up, in process (rank 0's
    part, which parses, prints and checks for every rank; mpi_helpers.refused_at_start): its exit code and output."""
    def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        # A wide terminal keeps argparse from wrapping help lines (it breaks words at hyphens).
        monkeypatch.setenv("COLUMNS", "3000")
        monkeypatch.chdir(cwd)
        setup = rank0_setup(args)
        setup.release()
        assert setup.result[0] == "exit", f"{args}: the start-up went on to a run"
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, setup.result[1], out, err)
    return run


def help_entries(text: str) -> dict[str, str]:
    """'--flag' -> its help text (whitespace collapsed), from argparse's option listing."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"  (--[\w.-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(body.split()) for flag, body in entries.items()}


def test_help_is_short_with_examples_and_points_to_help_all(train, tmp_path):
    result = train(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < 80 and max(map(len, lines)) <= 120
    assert lines[0].startswith("usage: [mpiexec -n R] mpi-afl train") and "examples:" in result.stdout
    assert "--help-all" in result.stdout and "[fault]" not in result.stdout and "--print-config" in result.stdout
    assert not list(tmp_path.iterdir())


def test_print_config_is_toml_that_config_reads_back(train, tmp_path):
    result = train(["--algorithm", "fedasync", "--client.lr=0.01", "--print-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    parsed = tomllib.loads(result.stdout)
    assert parsed["server"]["algorithm"] == "fedasync" and parsed["client"]["lr"] == 0.01
    (tmp_path / "c.toml").write_text(result.stdout)
    cfg, _ = parse_args(["--config", str(tmp_path / "c.toml")])
    assert cfg.server.algorithm == "fedasync" and cfg.client.lr == 0.01
    as_json = train(["--print-config", "--format", "json"], tmp_path)
    assert json.loads(as_json.stdout)["server"]["algorithm"] == "fedbuff"


@pytest.mark.slow
def test_print_config_into_a_closed_pipe_is_not_an_error(tmp_path):
    read, write = os.pipe()
    os.close(read)   # the reader is gone before anything is written (`--print-config | head` at its worst)
    try:
        proc = subprocess.run([sys.executable, "-m", "mpi_afl.train", "--print-config"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=HANG_GUARD)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_help_all_lists_every_key_with_default(train, tmp_path):
    result = train(["--help-all"], tmp_path)
    assert result.returncode == 0, result.stderr
    entries = help_entries(result.stdout)
    for key, (_, f) in all_keys().items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert f"--{key}" in entries, f"--{key} missing from --help"
        assert f"(default: {default!r})" in entries[f"--{key}"], entries[f"--{key}"]
    for flag in SHORTCUTS:
        assert f"--{flag.replace('_', '-')}" in entries
    assert not list(tmp_path.iterdir())  # --help writes no run directory


@pytest.mark.parametrize("arg, key", [("--client.lrr=0.01", "client.lr"), ("--server.lr=-1", "server.lr")])
def test_bad_override_exits_2_naming_the_key(train, tmp_path, arg, key):
    result = train([arg], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"'{key}'" in result.stderr and result.stderr.startswith("mpi_afl: error:")
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())
