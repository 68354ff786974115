"""Bit-reproducible training: the same job gives the same run, on one node or on two, and a run resumed from a
checkpoint gives the uninterrupted run.

Two launches of the default job (the config as shipped: dp=2 x mp=2 on 4 msrun ranks, its model) run side by
side for 24 steps, saving at steps 12 and 24: the README's `bash scripts/train.sh` on one node, and `mf-loss
train --nnodes 2` as two nodes of 2 ranks each on this machine (each model-parallel pair on its own node);
a third resumes the first one's step-12 checkpoint in a run directory of its own and trains to step 24.
Without a fixed order of additions runs part within 24 steps: MindSpore's CPU sum of a long vector (the
gradient norm's squares) settles on a block split, tuned by timing, after its first calls, and adds the
blocks in the order its threads finish; a resumed process starts that tuning again.

Checked byte for byte: loss.csv, every rank's step-24 checkpoint (parameters and optimizer state); within one
run, the replicated parameters of all four ranks. The two-node run writes its outputs on node 0 and each
node's checkpoints on that node.
"""
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mf_loss.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "dp2_mp2.yaml"
STEPS, SAVE_AT = 24, 12
COMMON = [f"--steps={STEPS}", f"--set=runner_config.save_checkpoint_steps={SAVE_AT}",
          "--set=runner_config.measure_loss_time=false"]
LAUNCH_TIMEOUT_S = 900


class Run:
    """A finished run: its run directories, node 0's first (loss.csv and the other outputs are there)."""

    def __init__(self, *run_dirs: Path):
        self.dirs, self.main = run_dirs, run_dirs[0]

    def step_dir(self, step: int, rank: int) -> Path:
        """The step directory that holds `rank`'s checkpoint (a rank's own node's)."""
        name = f"checkpoints/step_{step:06d}"
        holding = [d / name for d in self.dirs if (d / name / f"rank_{rank}.ckpt").exists()]
        assert len(holding) == 1, f"rank {rank}'s step-{step} checkpoint is in {len(holding)} of {self.dirs}"
        return holding[0]


def _start(output_dir: Path, *extra, readme_command=False) -> subprocess.Popen:
    """`mf-loss train` on the default config; with readme_command, the README's `bash scripts/train.sh` itself
    (its default config, in this interpreter's environment, which scripts/env.sh finds up to date)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MF_LOSS_VENV"] = sys.prefix
    flags = ["--output-dir", str(output_dir), "--timeout", str(LAUNCH_TIMEOUT_S - 60), *COMMON, *map(str, extra)]
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
    """{'one_node', 'two_nodes', 'resumed'} -> Run."""
    out = tmp_path_factory.mktemp("reproducible")
    port = free_port()
    nodes = [out / f"two_nodes_{k}" for k in (0, 1)]
    started = [_start(out / "one_node", readme_command=True)] + [
        _start(nodes[k], "--nnodes", 2, "--node-rank", k, "--master-addr", "127.0.0.1", "--master-port", port)
        for k in (0, 1)]
    for process, what in zip(started, ("the one-node run", "node 0 of the two-node run", "node 1 of the two-node run")):
        _finish(process, what)
    step_dir = out / "one_node" / "dp2_mp2" / "checkpoints" / f"step_{SAVE_AT:06d}"
    stdout = _finish(_start(out / "resumed", "--resume", f"--set=load_checkpoint={step_dir}"), "the resumed run")
    assert f"resumed at step {SAVE_AT}" in stdout, stdout[-2000:]
    return {"one_node": Run(out / "one_node" / "dp2_mp2"), "two_nodes": Run(*(n / "dp2_mp2" for n in nodes)),
            "resumed": Run(out / "resumed" / "dp2_mp2")}


def _first_different_line(path_a: Path, path_b: Path) -> str:
    lines_a, lines_b = path_a.read_text().splitlines(), path_b.read_text().splitlines()
    for a, b in zip(lines_a, lines_b):
        if a != b:
            return f"{a!r} against {b!r}"
    return f"{len(lines_a)} lines against {len(lines_b)}"


def _checkpoint_differences(dir_a: Path, dir_b: Path, rank: int) -> list:
    """'rank r: name (max |difference|)' of every tensor of `rank` that differs between two step directories."""
    import mindspore as ms
    found = []
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


def _assert_same_run(run_a: Run, run_b: Run):
    loss_a, loss_b = run_a.main / "loss.csv", run_b.main / "loss.csv"
    assert loss_a.read_bytes() == loss_b.read_bytes(), "loss.csv differs, first at " + _first_different_line(loss_a,
                                                                                                           loss_b)
    pairs = [(run_a.step_dir(STEPS, r), run_b.step_dir(STEPS, r)) for r in range(4)]
    same = [filecmp.cmp(a / f"rank_{r}.ckpt", b / f"rank_{r}.ckpt", shallow=False) for r, (a, b) in enumerate(pairs)]
    if not all(same):
        differences = [d for r, (a, b) in enumerate(pairs) for d in _checkpoint_differences(a, b, r)]
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
def test_the_job_on_one_node_and_on_two_nodes_is_the_same_run(runs):
    _assert_same_run(runs["one_node"], runs["two_nodes"])


@pytest.mark.distributed
def test_the_two_node_run_writes_its_outputs_on_node_0_only(runs):
    node0, node1 = runs["two_nodes"].dirs
    for name in ("loss.csv", "summary.json", "step_times.csv"):
        assert (node0 / name).exists() and not (node1 / name).exists(), name


@pytest.mark.distributed
def test_a_resumed_run_is_identical_to_the_uninterrupted_one(runs):
    _assert_same_run(runs["one_node"], runs["resumed"])


@pytest.mark.distributed
def test_replicated_parameters_are_identical_on_every_rank(runs):
    import mindspore as ms
    step_dir = runs["one_node"].step_dir(STEPS, 0)
    info = json.loads((step_dir / "step.json").read_text())
    ranks = [ms.load_checkpoint(str(step_dir / f"rank_{r}.ckpt")) for r in range(4)]
    replicated = [name for name in ranks[0] if name not in info["split_parameters"]
                  and not any(name == f"{prefix}.{split}" for split in info["split_parameters"]
                              for prefix in ("adam_m", "adam_v"))]
    assert "tok_embeddings" in replicated and "adam_m.tok_embeddings" in replicated
    differ = [f"{name} on rank {r}" for name in replicated for r in range(1, 4)
              if ranks[r][name].asnumpy().tobytes() != ranks[0][name].asnumpy().tobytes()]
    assert not differ, f"replicated tensors differ from rank 0's: {differ[:8]} ({len(differ)} in all)"
