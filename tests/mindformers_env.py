"""Finding the MindFormers environment for the main suite: build it (scripts/mindformers_env.sh, cached when
present) and check that its python imports MindFormers and mf_loss; every failure names what to run."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_SCRIPT = ROOT / "scripts" / "mindformers_env.sh"
REBUILD = ("rebuild it with `rm -rf .venv-mindformers && bash scripts/mindformers_env.sh` "
           "(or set MF_LOSS_MINDFORMERS_VENV to another directory)")


class MindFormersEnvError(RuntimeError):
    pass


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def build_environment(timeout: float = 900) -> Path:
    """The MindFormers environment's python, built by scripts/mindformers_env.sh when missing or stale."""
    try:
        result = subprocess.run(["bash", str(ENV_SCRIPT)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        raise MindFormersEnvError(f"`bash scripts/mindformers_env.sh` did not finish in {timeout:.0f} s; run it by "
                                  f"hand to see where it stops:\n{_tail(str(error.stderr or ''))}") from None
    if result.returncode != 0:
        raise MindFormersEnvError(f"`bash scripts/mindformers_env.sh` failed (exit {result.returncode}); "
                                  f"{REBUILD}. Its output:\n{_tail(result.stderr + result.stdout)}")
    python = Path(result.stdout.strip().splitlines()[-1])
    check_python(python)
    return python


def check_python(python: Path, timeout: float = 300) -> None:
    """Raises MindFormersEnvError naming what to run unless `python` imports MindFormers and mf_loss."""
    if not Path(python).exists():
        raise MindFormersEnvError(f"the MindFormers environment is missing ({python} does not exist); build it "
                                  "with `bash scripts/mindformers_env.sh`")
    probe = "import mindformers, mf_loss.integrations.mindformers"
    scratch = os.environ.get("TMPDIR", "/tmp")  # MindFormers writes ./output/log into its working directory
    try:
        result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=timeout,
                                cwd=scratch, env=dict(os.environ, LOCAL_DEFAULT_PATH=str(Path(scratch) / "mf_log")))
    except OSError as error:
        raise MindFormersEnvError(f"the MindFormers environment is broken: {python} does not run ({error}); "
                                  f"{REBUILD}") from None
    if result.returncode != 0:
        raise MindFormersEnvError(f"the MindFormers environment is broken: {python} -c '{probe}' failed; {REBUILD}."
                                  f"\n{_tail(result.stderr)}")
