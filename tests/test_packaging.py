"""The library installs and runs without the tools' packages: its requirements name none of them, running both
losses imports none of them, and a bare `pip install` into a fresh virtual environment runs both losses."""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

import background

ROOT = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).resolve().parent / "bare_loss_check.py"
TOOL_PACKAGES = {"matplotlib", "tokenizers", "torch", "tqdm", "psutil", "pytest", "hypothesis"}


def requirement_names(requirements) -> set:
    return {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requirements}


def run_check(python) -> dict:
    result = subprocess.run([str(python), str(CHECK)], capture_output=True, text=True, timeout=600, cwd=CHECK.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.unit
def test_library_requirements_name_no_tool_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert requirement_names(project["dependencies"]) == {"mindspore", "numpy", "pyyaml", "scipy-openblas32"}
    extras = {name: requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert {"tokenizers", "matplotlib", "tqdm", "psutil"} <= extras["train"]
    assert {"matplotlib", "psutil"} <= extras["bench"]
    assert "torch" in extras["test"] and "torch" not in extras["train"] | extras["bench"]


@pytest.mark.unit
def test_running_both_losses_imports_no_tool_package():
    assert run_check(sys.executable)["tool_packages_imported"] == []


@background.starts_with_session("bare_environment")
def bare_install(tmp_path_factory):
    """`pip install <repo>` without extras (from the pip cache that the project's environment filled) into a
    fresh virtual environment, checked there (asserts)."""
    tmp_path = tmp_path_factory.mktemp("bare_install")
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                               check=True).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert not names & {"matplotlib", "tokenizers", "torch", "pytest", "hypothesis"}, names

    assert run_check(python)["tool_packages_imported"] == []

    # A tool started without its extra names the extra to install.
    tool = subprocess.run([str(env_dir / "bin" / "mf-loss"), "train", "--config", str(ROOT / "configs/single.yaml")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert tool.returncode != 0
    assert "mf_loss[train]" in tool.stderr and "tokenizers" in tool.stderr, tool.stderr[-2000:]


@pytest.fixture(scope="module")
def bare_environment():
    background.result(bare_install)


@pytest.mark.slow
def test_bare_install_into_a_fresh_environment_runs_both_losses(bare_environment):
    """The checks are the job's (`bare_install`): it raises on the first that fails."""
