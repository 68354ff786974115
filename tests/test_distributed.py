"""msrun jobs on 2 (mp=2) and 4 (dp=2 x mp=2) ranks, for the wiring: the exchange, the groups, the NaN report
naming its rank, the width check and the collective count. Every rank's values and gradient slice are compared
with the float64 NumPy loss on the full vocabulary (tests/reference.py), never with our own mp=1 result. The
math of every mp and the option grid are tests/test_vocab_parallel_math.py's (one process, no msrun).

One msrun launch per layout per session runs tests/dist_worker.py's part with the other distributed parts
(tests/msrun_jobs.py); a failed launch is reported by every test with the failing rank's log tail.
"""
import numpy as np
import pytest

from cases import assert_matches, expected, full_inputs, loss_options, shard
from dist_worker import HEAD_ROWS_PER_RANK, HEAD_TOKENS, SUITES, head_inputs
from msrun_jobs import LAYOUTS, modes_of
from reference import numpy_cross_entropy

pytestmark = pytest.mark.distributed
MSRUN_PART = "loss"  # tests/dist_worker.py's results in the session's msrun job of each layout


def rank_slice(arrays, width, mp_rank):
    return arrays[..., mp_rank * width:(mp_rank + 1) * width]


@pytest.mark.parametrize("layout, suite", [(layout, suite) for suite in SUITES for layout in LAYOUTS
                                           if suite[0] in modes_of(layout)],
                         ids=lambda value: "/".join(value) if isinstance(value, tuple) else value)
def test_every_rank_equals_numpy_on_the_full_vocabulary(layout, suite, msrun_ranks):
    dp, mp, ranks = msrun_ranks(layout, MSRUN_PART)
    mode, backend = suite
    for arrays, report in ranks:
        dp_rank, mp_rank = report["dp_rank"], report["mp_rank"]
        for case in SUITES[suite]:
            # the reference sees this dp rank's rows over the whole vocabulary (the rank sees its columns)
            full = shard(case, full_inputs(case, dp=dp), dp_rank, 0, 1)
            expected_outputs, expected_grad = expected(case, full, loss_options(case))
            key = f"{mode}/{backend}/{case.name}"
            outputs = []
            while f"{key}/out{len(outputs)}" in arrays:
                outputs.append(arrays[f"{key}/out{len(outputs)}"])
            width = expected_grad.shape[-1] // mp
            assert_matches(case, outputs, arrays[f"{key}/grad"], expected_outputs,
                           rank_slice(expected_grad, width, mp_rank), f"{key} on dp {dp_rank} mp {mp_rank}", backend)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_check_fires_on_the_ranks_that_see_it(layout, msrun_ranks):
    dp, mp, ranks = msrun_ranks(layout, MSRUN_PART)
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
def test_logits_width_disagreeing_between_ranks_is_an_error_on_every_rank(layout, msrun_ranks):
    dp, mp, ranks = msrun_ranks(layout, MSRUN_PART)
    for _, report in ranks:
        mine = 6 + (report["mp_rank"] == mp - 1)
        other, theirs = (mp - 1, 7) if report["mp_rank"] != mp - 1 else (0, 6)
        expected_message = (f"logits width differs between model-parallel ranks: rank {report['rank']} (dp "
                            f"{report['dp_rank']}, mp {report['mp_rank']}) has {mine} columns, mp rank {other} has "
                            f"{theirs}; every rank must hold V/mp columns of the vocabulary")
        for mode in ("width_pynative", "width_graph"):
            assert report[mode] == [expected_message, None], (mode, report[mode])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_step_has_one_collective_and_numpy_values(layout, msrun_ranks):
    """A compiled value_and_grad + SGD step through a vocab-parallel head: exactly one AllReduce in the
    executed graph (backprop included), and the loss and updated weight rows of NumPy on the full head."""
    dp, mp, ranks = msrun_ranks(layout, MSRUN_PART)
    features, label, weight = head_inputs(dp, mp)
    for arrays, report in ranks:
        assert report["collectives"] == {"AllReduce": 1, "AllGather": 0, "Broadcast": 0, "ReduceScatter": 0,
                                         "AlltoAll": 0}, report
        tokens = slice(report["dp_rank"] * HEAD_TOKENS, (report["dp_rank"] + 1) * HEAD_TOKENS)
        logits = features[tokens].astype(np.float64) @ weight.T.astype(np.float64)
        (loss,), dlogits, _ = numpy_cross_entropy(logits, label[tokens], None)
        np.testing.assert_allclose(report["train_step_loss"], loss, rtol=1e-5)
        rows = slice(report["mp_rank"] * HEAD_ROWS_PER_RANK, (report["mp_rank"] + 1) * HEAD_ROWS_PER_RANK)
        expected_weight = weight[rows] - 0.1 * dlogits[:, rows].T @ features[tokens]
        np.testing.assert_allclose(arrays["train_step/weight"], expected_weight, rtol=1e-5, atol=1e-6)
