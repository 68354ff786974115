"""The MindFormers tests, run from the main suite: builds the MindFormers environment (scripts/mindformers_env.sh;
cached when present, about 3 minutes the first time) and runs tests/test_mindformers*.py inside it, started
with the session (tests/background.py). A failure shows the inner run's tail; a missing or broken environment
fails with what to run."""
import os
import re
import subprocess
from pathlib import Path

import pytest

import background
from mindformers_env import ROOT, build_environment

pytestmark = [pytest.mark.mindformers, pytest.mark.distributed, pytest.mark.slow]

INNER = ["tests/test_mindformers_optional.py", "tests/test_mindformers.py", "tests/test_mindformers_distributed.py",
         "tests/test_mindformers_trainer.py",
         # what a user without MindFormers sees: checked in the main environment, where it runs
         "--deselect", "tests/test_mindformers_optional.py::test_the_trainer_without_mindformers_says_what_to_run"]
INNER_TIMEOUT = 900
INNER_ENV = "MF_LOSS_MINDFORMERS_INNER"


@background.starts_with_session("mindformers_run")
def mindformers_tests(tmp_path_factory):
    """(the inner command, its CompletedProcess or TimeoutExpired): the MindFormers tests run in their own
    environment, built first when missing. Nothing inside that environment (the suite's test is skipped there)."""
    if os.environ.get(INNER_ENV) == "1":
        return None
    python = build_environment()
    env = dict(os.environ, PATH=f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}", **{INNER_ENV: "1"})
    command = [str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *INNER]
    try:
        return command, subprocess.run(command, capture_output=True, text=True, timeout=INNER_TIMEOUT, cwd=ROOT,
                                       env=env)
    except subprocess.TimeoutExpired as error:
        return command, error


@pytest.fixture(scope="module")
def mindformers_run():
    return background.result(mindformers_tests)


@pytest.mark.skipif(os.environ.get(INNER_ENV) == "1", reason="already inside the MindFormers environment")
def test_mindformers_tests_pass_in_the_mindformers_environment(mindformers_run):
    command, result = mindformers_run
    if isinstance(result, subprocess.TimeoutExpired):
        pytest.fail(f"the MindFormers tests did not finish in {INNER_TIMEOUT} s:\n{str(result.stdout or '')[-6000:]}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-8000:]}"
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, \
        f"nothing may be skipped there:\n{output[-4000:]}"
