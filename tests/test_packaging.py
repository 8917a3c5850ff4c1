"""Packaging: a wheel installed into a fresh venv works outside the source tree (console script,
--version, shipped presets, a plug-in by import path under mpiexec, CSV export without torch), and
environment.yml lists what pyproject.toml lists."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from mpi_afl import __version__
from mpi_afl.launch import mpiexec_path
from mpi_helpers import HANG_GUARD, REPO


def _setuptools_builds_pep639() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin, a work directory outside the source tree) with only the wheel installed;
    the dependencies (torch, mpi4py, ...) come from this interpreter's site-packages through a .pth
    file, so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp / "dist")]
    if _setuptools_builds_pep639():
        build.append("--no-build-isolation")   # offline; otherwise pip fetches setuptools>=77 to build
    done = subprocess.run(build, capture_output=True, text=True, timeout=HANG_GUARD, env=_env())
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp / "dist").glob("mpi_afl-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=HANG_GUARD)
    python = tmp / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=_env()).stdout.strip()
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=HANG_GUARD, env=_env())
    assert done.returncode == 0, done.stderr
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "work"
    work.mkdir()
    return python, python.parent, work


def _env() -> dict:
    """The environment without PYTHONPATH: a checkout on it (with the egg-info an in-tree build leaves)
    would make pip take the wheel for installed already, and the venv import the checkout."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(cmd, cwd, timeout=HANG_GUARD):
    env = _env()
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # mpi4py finds the `mpich` wheel's libmpi under its venv's prefix; the fresh venv borrows this one's
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(Path(sys.prefix) / "lib"), env.get("LD_LIBRARY_PATH")]))
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_ships_presets_console_script_and_license(installed):
    python, bin_dir, work = installed
    done = _run([bin_dir / "mpi-afl", "--version"], work)
    assert done.returncode == 0 and done.stdout.strip() == f"mpi_afl {__version__}", done
    where = _run([python, "-c", "import mpi_afl, sys; print(mpi_afl.__file__)"], work).stdout
    assert str(REPO) not in where and "site-packages" in where   # the wheel, not the checkout
    meta = _run([python, "-c", "from importlib.metadata import metadata; m = metadata('mpi_afl'); "
                               "print(m['License-Expression'])"], work).stdout
    assert meta.strip() == "Apache-2.0"


@pytest.mark.slow
def test_wheel_runs_a_preset_and_exports_without_torch(installed):
    python, bin_dir, work = installed
    out = work / "quick"
    done = _run([bin_dir / "mpi-afl", "train", "--preset", "quickstart", "--max-versions", "10",
                 "--out", out], work)
    assert done.returncode == 0, done.stderr
    assert "[server] done (max_versions): 10 versions" in done.stdout
    script = ("import sys; from mpi_afl.cli import main; rc = main(['export', 'quick', '--out', 'csv']); "
              "assert 'torch' not in sys.modules; sys.exit(rc)")
    done = _run([python, "-c", script], work)
    assert done.returncode == 0, done.stderr
    assert (work / "csv" / "quick" / "evals.csv").read_text().startswith("version,wall_time,virtual_time")


@pytest.mark.mpi
@pytest.mark.slow
def test_wheel_runs_an_example_plugin_under_mpiexec(installed):
    python, bin_dir, work = installed
    shutil.copytree(REPO / "examples", work / "examples")   # a user's own package, outside the source tree
    out = work / "plug"
    done = _run([mpiexec_path(), "-n", "3", bin_dir / "mpi-afl", "train",
                 "--server.algorithm=examples.custom_algorithm:ClippedAsync", "--data.num_clients=12",
                 "--client.trainer=examples.fedprox:FedProx", "--fedprox.mu=0.1",   # with its own config section
                 "--server.concurrency=4", "--client.iterations=5", "--max-versions", "12", "--out", out], work)
    assert done.returncode == 0, done.stderr
    assert '"world_size": 3' in (out / "summary.json").read_text()
    assert "[fedprox]\nmu = 0.1\n" in (out / "config.toml").read_text()


def _lower_bounds(requirements: list[str]) -> dict[str, str]:
    bounds = {}
    for req in requirements:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9.]+))?", req)
        bounds[m.group(1).lower()] = m.group(2) or ""
    return bounds


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _lower_bounds(project["dependencies"])
    for extra in ("mpich", "results", "tensorboard", "mlflow", "test"):
        wanted.update(_lower_bounds(project["optional-dependencies"][extra]))
    wanted["pytorch"] = wanted.pop("torch")   # conda-forge's name
    text = (REPO / "environment.yml").read_text().split("dependencies:", 1)[1]
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    have = _lower_bounds([line[2:] for line in lines if line.startswith("- ") and line != "- pip"])
    have.pop("python")
    assert have == wanted
    assert project["requires-python"] == ">=3.10" and "- python>=3.10" in lines
