"""MindFormers stays optional: the library never imports it, and the integration registers our losses in its
registry when it is importable, or fails with what to run when it is not. Runs in both environments (the main
one, and the MindFormers one through tests/test_mindformers_suite.py), with a check that can fail in each."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mf_loss import CrossEntropyLoss, get_loss_class
from mf_loss.integrations import is_mindformers_config
from mindformers_env import MindFormersEnvError, check_python

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
HAS_MINDFORMERS = importlib.util.find_spec("mindformers") is not None


def test_mindformers_is_optional():
    """Importing the library (losses, registry, config loader, the integrations package) imports no MindFormers,
    in either environment."""
    probe = ("import sys, mf_loss, mf_loss.registry, mf_loss.config_loader, mf_loss.integrations; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindformers'))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_loss_is_registered_in_mindformers_when_it_is_importable():
    assert get_loss_class("CrossEntropyLoss") is CrossEntropyLoss
    if HAS_MINDFORMERS:
        from mf_loss.integrations import mindformers as integration
        from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
        assert "mf_loss.CrossEntropyLoss" in integration.REGISTERED_LOSSES
        assert MindFormerRegister.get_cls(MindFormerModuleType.LOSS, "mf_loss.CrossEntropyLoss") is CrossEntropyLoss
        assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "VocabParallelLlamaForCausalLM") is \
            integration.VocabParallelLlamaForCausalLM
    else:
        with pytest.raises(ImportError, match=r"bash scripts/mindformers_env\.sh"):
            import mf_loss.integrations.mindformers  # noqa: F401


@pytest.mark.skipif(not HAS_MINDFORMERS, reason="MindFormers is not importable here")
def test_importing_the_integration_writes_no_logs_into_the_working_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_DEFAULT_PATH"}
    result = subprocess.run([sys.executable, "-c", "import mf_loss.integrations.mindformers"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # MindFormers' default would be ./output/log


@pytest.mark.skipif(HAS_MINDFORMERS, reason="here MindFormers is importable: the command would train")
def test_the_trainer_without_mindformers_says_what_to_run(tmp_path):
    command = [sys.executable, "-m", "mf_loss.integrations.mindformers_train", "--config",
               str(ROOT / "configs" / "mindformers_llama.yaml"), "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 1
    assert "needs MindFormers" in result.stderr and "bash scripts/mindformers_env.sh" in result.stderr


def test_train_sh_tells_mindformers_configs_apart():
    assert is_mindformers_config(ROOT / "configs" / "mindformers_llama.yaml")
    assert is_mindformers_config(ROOT / "configs" / "mindformers_trainer.yaml")  # MindFormers' own Trainer
    assert not is_mindformers_config(ROOT / "configs" / "dp2_mp2.yaml")
    assert not is_mindformers_config(ROOT / "configs" / "mindformers_tiny_lm.yaml")  # our own trainer's
    assert not is_mindformers_config(ROOT / "configs" / "no_such_file.yaml")


def test_a_missing_or_broken_environment_names_what_to_run(tmp_path):
    with pytest.raises(MindFormersEnvError, match=r"missing .*bash scripts/mindformers_env\.sh"):
        check_python(tmp_path / "no_env" / "bin" / "python")
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'mindformers'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(MindFormersEnvError, match=r"broken(.|\n)*rm -rf \.venv-mindformers && bash "
                                                  r"scripts/mindformers_env\.sh(.|\n)*No module named"):
        check_python(broken)
