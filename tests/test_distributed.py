"""msrun jobs on 2 (mp=2) and 4 (dp=2 x mp=2) ranks: every case equals the single-device result on the full
vocabulary, in PYNATIVE and GRAPH; the NaN check names the right ranks; one collective per training step."""
import json

import numpy as np
import pytest

import mindspore as ms

from cases import CORE_CASES, full_inputs, grid_cases, loss_options, shard, to_tensors, evaluate
from mf_loss import CrossEntropyLoss
from mf_loss.launch import launch

pytestmark = pytest.mark.distributed
LAYOUTS = {"mp2": (1, 2), "dp2_mp2": (2, 2)}
_jobs = {}


def run_job(name, tmp_path_factory):
    """Launch the worker battery for one layout once per session; returns (dp, mp, outputs per rank)."""
    if name not in _jobs:
        dp, mp = LAYOUTS[name]
        out = tmp_path_factory.mktemp(name)
        result = launch(__file__.replace("test_distributed.py", "dist_worker.py"),
                        ["--dp", dp, "--mp", mp, "--out", out, "--grid", "--backends", "composed,fused,fused_inplace"],
                        workers=dp * mp, log_dir=out / "logs", timeout=900)
        ranks = None
        if result.ok:
            ranks = [(np.load(out / f"rank{r}.npz"), json.loads((out / f"rank{r}.json").read_text()))
                     for r in range(dp * mp)]
        _jobs[name] = (dp, mp, ranks, result.message)  # a failed job is reported by every test, launched once
    dp, mp, ranks, message = _jobs[name]
    assert ranks is not None, message
    return dp, mp, ranks


_references = {}


def single_device(case, dp, dp_rank, backend):
    """The loss on one device over the full vocabulary for one dp rank's rows (shared by its mp ranks), with
    the same backend (each backend is checked against float64 NumPy by the single-device tests)."""
    key = (case.name, dp, dp_rank, backend)
    if key not in _references:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        arrays = shard(case, full_inputs(case, dp=dp), dp_rank, 0, 1)
        options = loss_options(case, dict(backend=backend))
        _references[key] = evaluate(CrossEntropyLoss(**options), *to_tensors(case, arrays),
                                    options.get("reduction", "mean"))
    return _references[key]


def assert_rank_matches(arrays, key, case, dp, mp, dp_rank, mp_rank):
    backend = key.split("/")[1]
    # the in-place backward is compared with the out-of-place fused one on a single device
    outputs, grad = single_device(case, dp, dp_rank, "fused" if backend == "fused_inplace" else backend)
    width = grad.shape[-1] // mp
    rtol = 1e-6 if case.dtype == "float32" else 1e-2
    for i, expected in enumerate(outputs):
        np.testing.assert_allclose(arrays[f"{key}/out{i}"], expected, rtol=1e-6,
                                   atol=1e-6 * max(np.abs(expected).max(initial=0), 1e-30),
                                   err_msg=f"{key} output {i} on dp {dp_rank} mp {mp_rank}")
    expected_grad = grad[..., mp_rank * width:(mp_rank + 1) * width]
    np.testing.assert_allclose(arrays[f"{key}/grad"], expected_grad, rtol=rtol,
                               atol=rtol * max(np.abs(grad).max(), 1e-30),
                               err_msg=f"{key} gradient on dp {dp_rank} mp {mp_rank}")


# (mode, backend, cases): GRAPH runs the core cases with the composed path, PYNATIVE everything with both,
# and the core cases with the in-place fused backward.
SUITES = {"graph-composed-core": ("graph", "composed", CORE_CASES),
          "pynative-composed-core": ("pynative", "composed", CORE_CASES),
          "pynative-fused-core": ("pynative", "fused", CORE_CASES),
          "pynative-fused_inplace-core": ("pynative", "fused_inplace", CORE_CASES),
          "pynative-composed-grid": ("pynative", "composed", grid_cases()),
          "pynative-fused-grid": ("pynative", "fused", grid_cases())}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("suite", SUITES)
def test_every_rank_equals_single_device_on_the_full_vocabulary(layout, suite, tmp_path_factory):
    dp, mp, ranks = run_job(layout, tmp_path_factory)
    mode, backend, cases = SUITES[suite]
    for arrays, report in ranks:
        for case in cases:
            assert_rank_matches(arrays, f"{mode}/{backend}/{case.name}", case, dp, mp, report["dp_rank"],
                                report["mp_rank"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_check_fires_on_the_ranks_that_see_it(layout, tmp_path_factory):
    dp, mp, ranks = run_job(layout, tmp_path_factory)
    for _, report in ranks:
        sees_nan = report["dp_rank"] == dp - 1  # the NaN is planted in the last dp rank's rows
        owns_nan = sees_nan and report["mp_rank"] == mp - 1  # ... in a column of the last mp rank
        for mode in ("nan_pynative", "nan_graph"):
            if not sees_nan:
                assert report[mode] is None, report
                continue
            assert report[mode] == (
                f"non-finite loss or gradient on rank {report['rank']} (dp {report['dp_rank']}, mp "
                f"{report['mp_rank']}): 1 token(s) (0 of them masked out); {int(owns_nan)} of them non-finite "
                "in this rank's own vocabulary slice")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_width_disagreeing_between_ranks_is_an_error_on_every_rank(layout, tmp_path_factory):
    dp, mp, ranks = run_job(layout, tmp_path_factory)
    for _, report in ranks:
        mine = 6 + (report["mp_rank"] == mp - 1)
        other, theirs = (mp - 1, 7) if report["mp_rank"] != mp - 1 else (0, 6)
        expected = (f"logits width differs between model-parallel ranks: rank {report['rank']} (dp "
                    f"{report['dp_rank']}, mp {report['mp_rank']}) has {mine} columns, mp rank {other} has {theirs}; "
                    "every rank must hold V/mp columns of the vocabulary")
        for mode in ("width_pynative", "width_graph"):
            assert report[mode] == [expected, None], (mode, report[mode])


def test_one_collective_per_training_step(tmp_path_factory):
    _, _, ranks = run_job("mp2", tmp_path_factory)
    for _, report in ranks:
        assert report["collectives"] == {"AllReduce": 1, "AllGather": 0, "Broadcast": 0, "ReduceScatter": 0}, report
