"""`mf-loss train`: the pieces (tokenizer, batches, schedule, initial weights, chart), then short real runs:

- a single-process reference run (12 steps);
- the same run stopped at step 10 by a NaN that the loss's NaN check catches, resumed from its step-8
  checkpoint: the same curve and the same final weights as the uninterrupted run, bit for bit;
- dp=2 x mp=2 on 4 msrun ranks: rank 1 fails at step 10 -> a clear message naming rank 1 with its log tail,
  no process left, the step-8 checkpoint intact; resumed, its loss curve and final weights equal the
  single-process run to 1e-5, with data-parallel ranks holding different numbers of counted tokens.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mf_loss.config_loader import load_config
from mf_loss.train import plot
from mf_loss.train.data import BatchSpec, global_batch, rank_micro_batches
from mf_loss.train.model import HEAD, head_slice, initial_parameters
from mf_loss.train.tokenizer import CharTokenizer, read_corpus
from mf_loss.train.trainer import FAIL_ENV, learning_rate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
STEPS, CKPT_EVERY, FAIL_STEP = 12, 4, 10
SHORT = [f"--steps={STEPS}", f"--set=runner_config.save_checkpoint_steps={CKPT_EVERY}", "--set=runner_config.log_interval=4",
         "--set=lr_schedule.warmup_steps=3"]
TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------- pieces

def test_tokenizer_round_trip_and_vocabulary_fits():
    text = read_corpus("builtin")
    assert 20_000 < len(text) < 300_000
    tokenizer = CharTokenizer.from_text(text)
    assert len(tokenizer) <= load_config(CONFIGS / "dp2_mp2.yaml")["model"]["model_config"]["vocab_size"]
    sample = "In the beginning God created the heaven and the earth."
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert tokenizer.encode("\u00e9")[0] == tokenizer.unk_id


def _spec(config, pad_id=0):
    mc, rc, ds = config["model"]["model_config"], config["runner_config"], config["train_dataset"]
    return BatchSpec(rc["global_batch_size"], mc["seq_length"], ds["pad_probability"], ds["ignore_probability"],
                     config["loss"]["ignore_index"], pad_id)


def test_batches_are_deterministic_and_dp_ranks_count_different_tokens():
    config = load_config(CONFIGS / "dp2_mp2.yaml")
    spec = _spec(config)
    ids = CharTokenizer.from_text(read_corpus("builtin")).encode(read_corpus("builtin"))
    for step in range(STEPS):
        batch = global_batch(ids, spec, config["seed"], step)
        again = global_batch(ids, spec, config["seed"], step)
        assert np.array_equal(batch.tokens, again.tokens) and np.array_equal(batch.labels, again.labels)
        assert batch.tokens.shape == (16, 64)
        assert (batch.mask == 0).any() and (batch.labels == -100).any()
        assert np.all(batch.tokens[batch.mask == 0] == 0)
        parts = [rank_micro_batches(batch, 2, d, 2) for d in range(2)]
        assert parts[0].tokens.shape == (2, 4, 64)
        counts = [p.counted(-100) for p in parts]
        assert counts[0] != counts[1], f"step {step}: both dp ranks count {counts[0]} tokens"
        assert sum(counts) == batch.counted(-100)
        np.testing.assert_array_equal(np.concatenate([p.tokens.reshape(-1, 64) for p in parts]), batch.tokens)


def test_learning_rate_schedule():
    config = load_config(CONFIGS / "single.yaml")
    base, end, warmup, total = 5e-3, 3e-4, 20, 300
    assert learning_rate(config, 0) == pytest.approx(base / warmup)
    assert learning_rate(config, warmup - 1) == pytest.approx(base)
    assert learning_rate(config, warmup) == pytest.approx(base)
    assert learning_rate(config, total) == pytest.approx(end)
    constant = load_config(CONFIGS / "single.yaml", ["lr_schedule.type=ConstantWarmUpLR"])
    assert learning_rate(constant, 300) == pytest.approx(base)


def test_initial_weights_are_the_same_on_every_layout():
    mc = load_config(CONFIGS / "dp2_mp2.yaml")["model"]["model_config"]
    full = initial_parameters(mc, 7)
    again = initial_parameters(mc, 7)
    assert all(np.array_equal(full[k], again[k]) for k in full)
    slices = [head_slice(full[HEAD], r, 2) for r in range(2)]
    assert slices[0].shape == (40, 64)
    np.testing.assert_array_equal(np.concatenate(slices), full[HEAD])


def test_loss_chart_is_a_png(tmp_path):
    path = plot.line_chart_png(tmp_path / "c.png", list(range(1, 51)), [4.0 / (1 + 0.1 * i) for i in range(50)],
                               title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert int.from_bytes(data[16:20], "big") == 720 and int.from_bytes(data[20:24], "big") == 420


# ------------------------------------------------------------------------------------- real runs

def train_cli(config, output_dir, *extra, fail_at=None, timeout=420):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop(FAIL_ENV, None)
    if fail_at:
        env[FAIL_ENV] = fail_at
    command = [sys.executable, "-m", "mf_loss.cli", "train", "--config", str(CONFIGS / config),
               "--output-dir", str(output_dir), "--timeout", "300", *SHORT, *extra]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def read_csv(run_dir):
    from mf_loss.train.trainer import read_curve
    return read_curve(Path(run_dir) / "loss.csv")


def weights(run_dir, step_dir=None):
    from mf_loss.train.trainer import load_full_weights
    return load_full_weights(Path(run_dir) / "checkpoints", step_dir)


def processes_mentioning(text: str) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single process, whole batch, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    proc, _ = train_cli("single.yaml", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "single"
    return run_dir, read_csv(run_dir), weights(run_dir), proc.stdout


def test_single_process_run_writes_its_outputs(reference):
    run_dir, curve, _, stdout = reference
    assert [row["step"] for row in curve] == list(range(1, STEPS + 1))
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert re.search(rf"step {STEPS}/{STEPS} \[#+\] loss \d\.\d{{4}}  tok/s [\d,]+ ", stdout), stdout[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["layout"] == "1 x 1"
    assert summary["final_loss"] == pytest.approx(curve[-1]["loss"], rel=1e-6)
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "loss:" in (run_dir / "summary.txt").read_text()
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == STEPS


def test_resume_after_a_failure_gives_the_uninterrupted_curve(reference, tmp_path):
    _, ref_curve, ref_weights, _ = reference
    # a NaN enters the loss at step 10: check_for_nan_in_loss_and_grad stops the run, naming the rank
    proc, _ = train_cli("single.yaml", tmp_path, fail_at=f"0:{FAIL_STEP}:nan")
    assert proc.returncode == 1
    assert ("training failed on rank 0: NonFiniteLossError: non-finite loss or gradient on rank 0 (dp 0, mp 0): "
            "1 token(s)") in proc.stderr, proc.stderr[-2000:]
    assert "The last complete checkpoint is step 8" in proc.stderr and "--resume" in proc.stderr
    run_dir = tmp_path / "single"
    assert [row["step"] for row in read_csv(run_dir)][-1] == FAIL_STEP - 1  # every completed step is kept
    proc, _ = train_cli("single.yaml", tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 8" in proc.stdout
    curve = read_csv(run_dir)
    assert [row["step"] for row in curve] == list(range(1, STEPS + 1))
    assert [row["loss"] for row in curve] == [row["loss"] for row in ref_curve]
    final = weights(run_dir)
    assert all(np.array_equal(final[name], ref_weights[name]) for name in ref_weights)


@pytest.fixture(scope="module")
def dp2_mp2_failed(tmp_path_factory):
    """dp=2 x mp=2 on 4 ranks; rank 1 raises at step 10, after the step-8 checkpoint."""
    out = tmp_path_factory.mktemp("dp2_mp2")
    proc, seconds = train_cli("dp2_mp2.yaml", out, fail_at=f"1:{FAIL_STEP}")
    return out, proc, seconds


@pytest.mark.distributed
def test_rank_failure_stops_the_job_with_a_clear_message(dp2_mp2_failed):
    out, proc, seconds = dp2_mp2_failed
    run_dir = out / "dp2_mp2"
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "failed on rank 1" in proc.stderr
    assert str(run_dir / "logs" / "worker_1.log") in proc.stderr
    assert f"InjectedFailure: injected failure on rank 1 at step {FAIL_STEP}" in proc.stderr  # the log tail
    assert "The last complete checkpoint is step 8" in proc.stderr
    assert seconds < 240
    assert processes_mentioning(str(run_dir)) == []
    # rank 0 echoed its progress while the job ran
    assert re.search(r"step +8/12 \[#+\.*\] loss \d\.\d{4}  tok/s ", proc.stdout), proc.stdout[-2000:]


@pytest.mark.distributed
def test_last_checkpoint_stays_loadable_after_the_failure(dp2_mp2_failed):
    import mindspore as ms
    out, _, _ = dp2_mp2_failed
    ckpt = out / "dp2_mp2" / "checkpoints"
    latest = json.loads((ckpt / "latest.json").read_text())
    assert latest["step"] == 8 and (latest["data_parallel"], latest["model_parallel"]) == (2, 2)
    for rank in range(4):
        params = ms.load_checkpoint(str(ckpt / latest["dir"] / f"rank_{rank}.ckpt"))
        assert params[HEAD].shape == (40, 64) and "adam_m.embedding.word" in params
    assert not list(ckpt.rglob(".*partial*"))


@pytest.mark.distributed
def test_dp2_mp2_resumed_run_matches_the_single_process_run(dp2_mp2_failed, reference):
    from mf_loss.train.compare import compare_runs
    out, _, _ = dp2_mp2_failed
    proc, _ = train_cli("dp2_mp2.yaml", out, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed at step 8" in proc.stdout
    run_dir = out / "dp2_mp2"
    assert [row["step"] for row in read_csv(run_dir)] == list(range(1, STEPS + 1))
    result = compare_runs(reference[0], run_dir)
    assert result["counted_tokens_equal"]
    assert result["loss_max_diff"] <= TOLERANCE
    assert result["weight_max_diff"] <= TOLERANCE, result["per_weight"]
    print(f"dp2 x mp2 vs single process: loss curve max |diff| {result['loss_max_diff']:.2e}, "
          f"weights max |diff| {result['weight_max_diff']:.2e}")


@pytest.mark.distributed
def test_demo_prints_the_parallel_and_single_device_results_side_by_side():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "mf_loss.cli", "demo", "--dp", "1", "--mp", "2", "--timeout", "240"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "dp=1 x mp=2" in proc.stdout and "single device" in proc.stdout
    loss_line = next(line for line in proc.stdout.splitlines() if line.startswith("loss (global token mean)"))
    parallel, single, difference = (float(v) for v in loss_line.split()[-3:])
    assert abs(parallel - single) <= TOLERANCE and difference <= TOLERANCE
    grad_line = next(line for line in proc.stdout.splitlines() if line.startswith("max |gradient difference|"))
    assert float(grad_line.split()[-1]) <= TOLERANCE
    assert "rank 1 (dp 0, mp 1): rows 0-23, vocabulary 8-15" in proc.stdout
