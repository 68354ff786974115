"""LinearCrossEntropyLoss under msrun: mp=2 on 2 ranks and dp=2 x mp=2 on 4 ranks (tests/dist_linear_worker.py's
part of the session's one msrun launch per layout, tests/msrun_jobs.py).

Every rank's loss and gradients are compared with float64 NumPy on the FULL vocabulary (the reference and
tolerances of tests/test_linear_cross_entropy.py): dW is the rank's rows of the full dW, dH the full G @ W
with complete_hidden_grad=True and this rank's share G[:, slice] @ W[slice] with False. Also: the NaN check
names the rank that sees the NaN, and a compiled value_and_grad + SGD step has exactly the collectives that
`collectives_per_call` declares, with NumPy's loss and updated parameters.
"""
import numpy as np
import pytest

from cases import upstream_weights
from dist_linear_worker import (CASES, DESIGNS, NAN_HIDDEN_ROW, ROWS, RUNS, VOCAB, job_inputs, nan_arrays,
                                train_inputs)
from mf_loss import ParallelConfig
from msrun_jobs import LAYOUTS, modes_of
from reference import numpy_cross_entropy
from test_linear_cross_entropy import assert_matches_reference, reference

pytestmark = pytest.mark.distributed
MSRUN_PART = "linear"  # tests/dist_linear_worker.py's results in the session's msrun job of each layout


def dp_rows(array, dp, dp_rank):
    if array is None:
        return None
    per_dp = array.shape[0] // dp
    return array[dp_rank * per_dp:(dp_rank + 1) * per_dp]


@pytest.mark.parametrize("layout, mode", [(layout, mode) for layout in LAYOUTS for mode in modes_of(layout)])
def test_every_rank_equals_numpy_on_the_full_vocabulary(layout, mode, msrun_ranks):
    dp, mp, ranks = msrun_ranks(layout, MSRUN_PART)
    width = VOCAB // mp
    compared = 0
    for arrays, report in ranks:
        dp_rank, mp_rank = report["dp_rank"], report["mp_rank"]
        for (backend, grad_mode, complete), name in RUNS[mode]:
            options, _, leading, dtype = CASES[name]
            none = options.get("reduction") == "none"
            h, w, y, m, options = job_inputs(name, dp)
            h, y, m = dp_rows(h, dp, dp_rank), dp_rows(y, dp, dp_rank), dp_rows(m, dp, dp_rank)
            ref = reference(h, w, y, m, options, upstream_weights(leading) if none else None,
                            rows_of_rank=slice(mp_rank * width, (mp_rank + 1) * width), hidden_share=not complete)
            key = f"{mode}/{backend}/{grad_mode}/{complete}/{name}"
            outputs = []
            while f"{key}/out{len(outputs)}" in arrays:
                outputs.append(arrays[f"{key}/out{len(outputs)}"])
            assert_matches_reference((outputs, arrays[f"{key}/d_hidden"], arrays[f"{key}/d_weight"]), ref,
                                     f"{key} on dp {dp_rank} mp {mp_rank}", dtype)
            # a bfloat16 weight is read as it is by the fused kernels (the composed path casts it)
            read = dtype != "float32" and backend == "fused"
            assert bool(arrays[f"{key}/half_weight_read"]) == read, key
            compared += 1
    assert compared == len(ranks) * len(RUNS[mode])
    assert {design for design, _ in RUNS[mode]} == set(DESIGNS)  # every design runs in every mode


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_check_names_the_rank(layout, msrun_ranks):
    dp, mp, ranks = msrun_ranks(layout, MSRUN_PART)
    config = ParallelConfig(data_parallel=dp, model_parallel=mp)
    for _, report in ranks:
        rank, dp_rank, mp_rank = report["rank"], report["dp_rank"], report["mp_rank"]
        where = f"rank {rank} (dp {dp_rank}, mp {mp_rank})"
        # a NaN in a hidden row: only that dp group sees it, on every mp rank (each of its logits is NaN)
        hidden_message = (f"non-finite loss or gradient on {where}: 1 token(s) (0 of them masked out); 1 of them "
                          "non-finite in this rank's own vocabulary slice")
        # a NaN in a head-weight row of the last mp rank: every token of every dp group, local to that rank
        _, _, y, m = nan_arrays(config, "head_weight")
        y, m = dp_rows(y, dp, dp_rank), dp_rows(m, dp, dp_rank)
        masked = int(((m == 0) | (y == -100)).sum())
        local = ROWS if mp_rank == mp - 1 else 0
        weight_message = (f"non-finite loss or gradient on {where}: {ROWS} token(s) ({masked} of them masked out); "
                          f"{local} of them non-finite in this rank's own vocabulary slice")
        for mode in ("pynative", "graph"):
            assert report[f"nan/{mode}/hidden"] == (hidden_message if dp_rank == dp - 1 else None), \
                (mode, NAN_HIDDEN_ROW, report)
            assert report[f"nan/{mode}/head_weight"] == weight_message, (mode, report)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_training_step_collectives_and_numpy_update(layout, grad_mode, msrun_ranks):
    """A compiled value_and_grad + SGD step of tanh(x @ A) -> fused head: the AllReduces in the executed graph
    (backprop included) are collectives_per_call's forward + backward and nothing else; the loss and the
    parameters after the step are NumPy's on the full head."""
    dp, mp, ranks = msrun_ranks(layout, MSRUN_PART)
    features, label, projection, head = train_inputs(dp)
    width = VOCAB // mp
    for arrays, report in ranks:
        step = report[f"train/{grad_mode}"]
        declared = step["declared"]
        assert step["collectives"] == {"AllReduce": declared["forward"] + declared["backward"], "AllGather": 0,
                                       "Broadcast": 0, "ReduceScatter": 0, "AlltoAll": 0}, (report["rank"], step)
        assert declared["forward"] == (3 if grad_mode == "forward" else 1) and declared["backward"] == 1, step
        tokens = slice(report["dp_rank"] * ROWS, (report["dp_rank"] + 1) * ROWS)
        x = features[tokens].astype(np.float64)
        hidden = np.tanh(x @ projection.astype(np.float64))
        (loss,), grad, _ = numpy_cross_entropy(hidden @ head.T.astype(np.float64), label[tokens], None)
        np.testing.assert_allclose(step["loss"], loss, rtol=1e-5)
        rows = slice(report["mp_rank"] * width, (report["mp_rank"] + 1) * width)
        d_projection = x.T @ ((grad @ head.astype(np.float64)) * (1 - hidden ** 2))
        np.testing.assert_allclose(arrays[f"train/{grad_mode}/head"], head[rows] - 0.1 * (grad.T @ hidden)[rows],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arrays[f"train/{grad_mode}/projection"], projection - 0.1 * d_projection,
                                   rtol=1e-5, atol=1e-6)
