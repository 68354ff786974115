"""Bit-reproducible training: the same command twice gives the same run, and a run resumed from a checkpoint
gives the uninterrupted run.

Two launches of the default job (the README's `bash scripts/train.sh` and `mf-loss train --config
configs/dp2_mp2.yaml`; the config as shipped: dp=2 x mp=2 on 4 msrun ranks, its model) run
side by side for 24 steps, saving at steps 12 and 24; a third resumes the first one's step-12 checkpoint in a
run directory of its own and trains to step 24. Runs used to part at step 15: MindSpore's CPU sum of a long
vector (the gradient norm's squares) settles on a block split, tuned by timing, after its first calls, and
adds the blocks in the order its threads finish; a resumed process starts that tuning again.

Checked byte for byte: loss.csv, every rank's step-24 checkpoint (parameters and optimizer state); within one
run, the replicated parameters of all four ranks.
"""
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "dp2_mp2.yaml"
STEPS, SAVE_AT = 24, 12
COMMON = [f"--steps={STEPS}", f"--set=runner_config.save_checkpoint_steps={SAVE_AT}",
          "--set=runner_config.measure_loss_time=false"]
LAUNCH_TIMEOUT_S = 900


def _start(output_dir: Path, *extra, readme_command=False) -> subprocess.Popen:
    """`mf-loss train` on the default config; with readme_command, the README's `bash scripts/train.sh` itself
    (its default config, in this interpreter's environment, which scripts/env.sh finds up to date)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MF_LOSS_VENV"] = sys.prefix
    flags = ["--output-dir", str(output_dir), "--timeout", str(LAUNCH_TIMEOUT_S - 60), *COMMON, *extra]
    if readme_command:
        command = ["bash", str(ROOT / "scripts" / "train.sh"), *flags]
    else:
        command = [sys.executable, "-m", "mf_loss.cli", "train", "--config", str(CONFIG), *flags]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, what: str) -> str:
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, f"{what} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}"
    return stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{'first', 'second', 'resumed'} -> run directory."""
    out = tmp_path_factory.mktemp("reproducible")
    first, second = out / "first", out / "second"
    started = [_start(first, readme_command=True), _start(second)]
    _finish(started[0], "the first run")
    _finish(started[1], "the second run")
    step_dir = first / "dp2_mp2" / "checkpoints" / f"step_{SAVE_AT:06d}"
    stdout = _finish(_start(out / "resumed", "--resume", f"--set=load_checkpoint={step_dir}"), "the resumed run")
    assert f"resumed at step {SAVE_AT}" in stdout, stdout[-2000:]
    return {name: out / name / "dp2_mp2" for name in ("first", "second", "resumed")}


def _first_different_line(path_a: Path, path_b: Path) -> str:
    lines_a, lines_b = path_a.read_text().splitlines(), path_b.read_text().splitlines()
    for a, b in zip(lines_a, lines_b):
        if a != b:
            return f"{a!r} against {b!r}"
    return f"{len(lines_a)} lines against {len(lines_b)}"


def _checkpoint_differences(dir_a: Path, dir_b: Path) -> list:
    """'rank r: name (max |difference|)' of every tensor that differs between two step directories."""
    import mindspore as ms
    found = []
    for rank in range(4):
        a = ms.load_checkpoint(str(dir_a / f"rank_{rank}.ckpt"))
        b = ms.load_checkpoint(str(dir_b / f"rank_{rank}.ckpt"))
        for name in sorted(set(a) | set(b)):
            if name not in a or name not in b:
                found.append(f"rank {rank}: {name} in one checkpoint only")
                continue
            x, y = a[name].asnumpy(), b[name].asnumpy()
            if x.tobytes() != y.tobytes():
                gap = np.abs(x.astype(np.float64) - y.astype(np.float64)).max() if x.shape == y.shape else "shape"
                found.append(f"rank {rank}: {name} ({gap})")
    return found


def _assert_same_run(run_a: Path, run_b: Path):
    assert (run_a / "loss.csv").read_bytes() == (run_b / "loss.csv").read_bytes(), (
        "loss.csv differs, first at " + _first_different_line(run_a / "loss.csv", run_b / "loss.csv"))
    final = f"checkpoints/step_{STEPS:06d}"
    same = [filecmp.cmp(run_a / final / f"rank_{r}.ckpt", run_b / final / f"rank_{r}.ckpt", shallow=False)
            for r in range(4)]
    if not all(same):
        differences = _checkpoint_differences(run_a / final, run_b / final)
        pytest.fail(f"step-{STEPS} checkpoints differ in {len(differences)} tensors: {differences[:8]}")


@pytest.mark.unit
@pytest.mark.parametrize("start, length", [(0, 5), (3, 1024), (0, 3000), (7, 2048), (1, 1024 * 1024 + 7)])
def test_the_norms_sum_of_squares_is_the_float64_sum_in_its_fixed_order(start, length):
    """_squares on a slice of a flat buffer: rows of SUM_ROW, the rest, and the levels of row sums (a second level
    above SUM_ROW**2 values) add up to the float64 sum; the same bits on every call."""
    import mindspore as ms
    from mindspore import Tensor, nn
    from mf_loss.train.step import SUM_ROW, _row_paddings, _squares
    flat = np.random.default_rng(length).standard_normal(start + length + 11).astype(np.float32)
    paddings = _row_paddings(length)
    assert paddings == ((SUM_ROW - 1,) if length > SUM_ROW ** 2 else ())  # 1025 row sums: one row and a padded one

    class Squares(nn.Cell):
        def construct(self, values):
            return _squares(values, start, start + length, paddings)

    cell = Squares()
    values = [cell(Tensor(flat)).asnumpy().item() for _ in range(3)]
    expected = (flat[start:start + length].astype(np.float64) ** 2).sum()
    assert values[0] == pytest.approx(expected, rel=2e-6)
    assert values[1:] == values[:1] * 2


@pytest.mark.distributed
def test_two_runs_of_the_default_job_are_identical(runs):
    _assert_same_run(runs["first"], runs["second"])


@pytest.mark.distributed
def test_a_resumed_run_is_identical_to_the_uninterrupted_one(runs):
    _assert_same_run(runs["first"], runs["resumed"])


@pytest.mark.distributed
def test_replicated_parameters_are_identical_on_every_rank(runs):
    import mindspore as ms
    step_dir = runs["first"] / "checkpoints" / f"step_{STEPS:06d}"
    info = json.loads((step_dir / "step.json").read_text())
    ranks = [ms.load_checkpoint(str(step_dir / f"rank_{r}.ckpt")) for r in range(4)]
    replicated = [name for name in ranks[0] if name not in info["split_parameters"]
                  and not any(name == f"{prefix}.{split}" for split in info["split_parameters"]
                              for prefix in ("adam_m", "adam_v"))]
    assert "tok_embeddings" in replicated and "adam_m.tok_embeddings" in replicated
    differ = [f"{name} on rank {r}" for name in replicated for r in range(1, 4)
              if ranks[r][name].asnumpy().tobytes() != ranks[0][name].asnumpy().tobytes()]
    assert not differ, f"replicated tensors differ from rank 0's: {differ[:8]} ({len(differ)} in all)"
