"""MindFormers' Llama trained with our loss on dp=2 x mp=2 msrun ranks: equal to the single-process run on the same
global batches (loss curve and final weights, to 1e-5), with every output of a run, and a resume that continues
the curve. Runs in the MindFormers environment (tests/test_mindformers_suite.py runs it there)."""
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

if importlib.util.find_spec("mindformers") is None:
    pytest.skip("needs the MindFormers environment; tests/test_mindformers_suite.py runs this file in it",
                allow_module_level=True)

from mf_loss.train.checkpoints import checkpoint_dir, load_full_weights  # noqa: E402
from mf_loss.train.curve import read_curve  # noqa: E402

pytestmark = [pytest.mark.mindformers, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mindformers_llama.yaml"
STEPS = 4
# A short run: PYNATIVE (no graph compilation: the shortest few-step run here), shorter rows.
COMMON = [f"runner_config.stop_step={STEPS}", "context.mode=1", "model.model_config.seq_length=32"]
# The resumed run swaps in the fused head: same parameters, no logits, and the model-parallel path where the loss
# itself sums the hidden state's gradient over the ranks.
RESUME_LOSS = "mf_loss.LinearCrossEntropyLoss"
SINGLE = ["parallel_config.data_parallel=1", "parallel_config.model_parallel=1", "parallel_config.micro_batch_num=4",
          "trainer.model_name=single"]  # the same 16 rows per step as 2 data-parallel ranks x 2 micro-batches x 4 rows


def short_run_config(directory: Path) -> Path:
    """configs/mindformers_llama.yaml with a checkpoint every 2 steps (a list item: --set cannot reach it)."""
    tree = yaml.safe_load(CONFIG.read_text())
    for callback in tree["callbacks"]:
        if callback["type"] == "CheckpointMonitor":
            callback["save_checkpoint_steps"] = 2
    path = directory / "mindformers_llama_short.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def train(output_dir: Path, overrides, *extra, timeout: float = 420) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mf_loss.integrations.mindformers_train", "--config",
               str(short_run_config(output_dir)), "--output-dir", str(output_dir), "--timeout", str(timeout - 30),
               *extra]
    for override in overrides:
        command += ["--set", override]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=output_dir)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def final_weights(run_dir: Path) -> dict:
    latest = json.loads((checkpoint_dir(run_dir) / "latest.json").read_text())
    return load_full_weights(checkpoint_dir(run_dir) / latest["dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The dp=2 x mp=2 run and the single-process run, at once (each is mostly start-up)."""
    out = tmp_path_factory.mktemp("mindformers_runs")
    with ThreadPoolExecutor() as pool:
        started = [pool.submit(train, out, COMMON + ["trainer.model_name=dp2_mp2"]),
                   pool.submit(train, out, COMMON + SINGLE)]
        parallel, single = (run.result() for run in started)
    return out, parallel, single


def test_dp2_mp2_run_writes_every_output(runs):
    out, parallel, _ = runs
    run_dir = out / "dp2_mp2"
    for name in ("loss.csv", "loss.png", "summary.json", "summary.txt", "progress.jsonl", "checkpoints/latest.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["layout"] == "2 x 2" and summary["steps"] == STEPS
    assert summary["model"] == "VocabParallelLlamaForCausalLM" and summary["loss"] == "mf_loss.CrossEntropyLoss"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000002", "step_000004"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_000004").glob("rank_*.ckpt")) == [
        f"rank_{r}.ckpt" for r in range(4)]
    assert f"step {STEPS}/{STEPS}" in parallel.stdout
    assert not (out / "output").exists()  # MindFormers' logs went to the run's logs/mindformers
    assert (run_dir / "logs" / "mindformers").is_dir()


def test_dp2_mp2_equals_the_single_process_run(runs):
    out, _, _ = runs
    parallel, single = read_curve(out / "dp2_mp2" / "loss.csv"), read_curve(out / "single" / "loss.csv")
    assert [r["step"] for r in parallel] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    assert [r["counted_tokens"] for r in parallel] == [r["counted_tokens"] for r in single]
    np.testing.assert_allclose([r["loss"] for r in parallel], [r["loss"] for r in single], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in parallel], [r["grad_norm"] for r in single], rtol=1e-5)
    assert parallel[-1]["loss"] < parallel[0]["loss"]
    weights_parallel, weights_single = final_weights(out / "dp2_mp2"), final_weights(out / "single")
    assert sorted(weights_parallel) == sorted(weights_single)
    assert weights_parallel["lm_head.weight"].shape == (256, 64)  # the two model-parallel halves, joined
    for name in weights_single:
        np.testing.assert_allclose(weights_parallel[name], weights_single[name], rtol=0, atol=1e-5, err_msg=name)


def test_resume_from_a_dp2_mp2_checkpoint_continues_the_same_curve(runs):
    out, _, _ = runs
    source = out / "dp2_mp2" / "checkpoints" / "step_000002"
    result = train(out, COMMON + ["trainer.model_name=resumed", f"load_checkpoint={source}",
                                  f"loss.type={RESUME_LOSS}"], "--resume")
    assert "resumed at step 2" in result.stdout
    assert json.loads((out / "resumed" / "summary.json").read_text())["loss"] == RESUME_LOSS
    uninterrupted, resumed = read_curve(out / "dp2_mp2" / "loss.csv"), read_curve(out / "resumed" / "loss.csv")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed[:2] == uninterrupted[:2]  # the curve up to the checkpoint, carried over
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in uninterrupted], rtol=0, atol=1e-5)
    weights_resumed, weights_uninterrupted = final_weights(out / "resumed"), final_weights(out / "dp2_mp2")
    for name in weights_uninterrupted:
        np.testing.assert_allclose(weights_resumed[name], weights_uninterrupted[name], rtol=0, atol=1e-5,
                                   err_msg=name)
