"""The fused head's recomputing kernels alone (`fused.head_row_stats`, `fused.head_grads`) against float64 NumPy.

They take hidden (N, H) and this rank's head weight (V, H) of any float dtype and go through the classes in
blocks of `block`, each block's logits made for all rows (kernel source, "the fused head whole"). Checked: the
statistics and both gradients against the float64 formulas of `shard_math` (test_fused_kernels' references) on
the float64 logits of the rounded inputs, with class weights, label smoothing, a softcap and a slice of a
larger vocabulary (labels elsewhere), blocks of 1 class, of a part of V and of more than V, rows whose
coefficients are all zero (no gradient), N = 0 and H = 0; results that do not depend on the block (statistics)
or on the thread count (both); and the refusals.

Tolerances: the kernels make the logits with float32 sgemm over H, so every statistic and gradient carries
float32 rounding of the logits (a few ulps of |h| |w| H): statistics within 1e-5 relative or 1e-5 of their
column's largest value, gradients within 1e-5 relative or 2e-6 of their largest element. A half-precision
weight's gradient is rounded once from float32: within one unit in its last place of the float64 value
(`test_half_precision_head.assert_within_one_unit`).
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from mf_loss.ops import fused
from mf_loss.ops.shard_math import ShardSpec
from test_fused_kernels import MS_DTYPES, assert_stats_close, grad_coefficients, reference_grad, reference_stats
from test_half_precision_head import assert_within_one_unit, round_to

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", autouse=True)
def _kernels_loaded():
    fused.load()


def head_inputs(rows, width, vocab, *, hidden_dtype="float32", weight_dtype="float32", weighted=False,
                vocab_start=0, total_vocab=None, seed=0):
    """hidden (rows, width) and weight (vocab, width) rounded to their dtypes, labels over `total_vocab` global
    classes (this slice owns [vocab_start, vocab_start + vocab)), class weights of the slice."""
    rng = np.random.default_rng(seed)
    hidden = round_to(rng.standard_normal((rows, width)) * 2.0, hidden_dtype)
    weight = round_to(rng.standard_normal((vocab, width)) / max(np.sqrt(width), 1.0), weight_dtype)
    label = rng.integers(0, total_vocab or vocab, rows).astype(np.int32)
    class_weight = rng.uniform(0.2, 2.0, vocab).astype(np.float32) if weighted else None
    return dict(hidden=hidden, weight=weight, label=label, class_weight=class_weight, vocab_start=vocab_start,
                hidden_dtype=hidden_dtype, weight_dtype=weight_dtype)


def run_kernels(inp, softcap, label_smoothing, block, coefficients=None):
    """(stats, hidden_grad, weight_grad, the row statistics and coefficients used) in float64; the gradients at
    the kernel's own statistics."""
    hidden = Tensor(inp["hidden"].astype(np.float32)).astype(MS_DTYPES[inp["hidden_dtype"]])
    weight = Tensor(inp["weight"].astype(np.float32)).astype(MS_DTYPES[inp["weight_dtype"]])
    label = Tensor(inp["label"])
    class_weight = None if inp["class_weight"] is None else Tensor(inp["class_weight"])
    assert inp["vocab_start"] % weight.shape[0] == 0  # a rank's slice
    spec = ShardSpec(inp["vocab_start"] // weight.shape[0], softcap, label_smoothing, class_weight)
    stats = fused.head_row_stats(hidden, weight, label, spec, block).asnumpy().astype(np.float64)
    rows = stats.shape[0]
    row_max = stats[:, 0].astype(np.float32)
    with np.errstate(divide="ignore"):
        lse = np.log(stats[:, 1]).astype(np.float32)
    a, b, q = coefficients if coefficients is not None else grad_coefficients(rows, label_smoothing)
    hidden_grad, weight_grad = fused.head_grads(hidden, weight, label, spec, Tensor(row_max),
                                                Tensor(lse), (Tensor(a), Tensor(b), Tensor(q)), block)
    assert hidden_grad.dtype == ms.float32 and hidden_grad.shape == hidden.shape
    assert weight_grad.dtype == weight.dtype and weight_grad.shape == weight.shape
    as64 = lambda t: t.astype(ms.float32).asnumpy().astype(np.float64)  # noqa: E731
    return stats, as64(hidden_grad), as64(weight_grad), (row_max, lse, a, b, q)


def reference(inp, softcap, label_smoothing, row_max, lse, a, b, q):
    """(stats, hidden_grad, weight_grad) of the float64 logits hidden @ weight^T."""
    logits = inp["hidden"] @ inp["weight"].T
    shard = dict(logits=logits, label=inp["label"], probs=None, weight=inp["class_weight"],
                 vocab_start=inp["vocab_start"])
    grad = reference_grad(shard, softcap, row_max.astype(np.float64), lse.astype(np.float64), a, b, q,
                          label_smoothing)
    return reference_stats(shard, softcap, label_smoothing), grad @ inp["weight"], grad.T @ inp["hidden"]


def check(inp, softcap=None, label_smoothing=0.0, block=16, what=""):
    stats, hidden_grad, weight_grad, used = run_kernels(inp, softcap, label_smoothing, block)
    expected_stats, expected_hidden, expected_weight = reference(inp, softcap, label_smoothing, *used)
    assert_stats_close(stats, expected_stats, rtol=1e-5, atol_factor=1e-5, what=what)
    for got, exact, name in ((hidden_grad, expected_hidden, "d hidden"), (weight_grad, expected_weight, "d weight")):
        if name == "d weight" and inp["weight_dtype"] != "float32":
            assert_within_one_unit(got, exact, inp["weight_dtype"], f"{what}: {name}")
        else:
            scale = np.abs(exact).max(initial=1e-30)
            np.testing.assert_allclose(got, exact, rtol=1e-5, atol=2e-6 * scale, err_msg=f"{what}: {name}")
    dead = used[2] == 0
    np.testing.assert_array_equal(hidden_grad[dead], 0.0)  # rows with a = b = q = 0 take no part
    return stats, hidden_grad, weight_grad


OPTIONS = [
    dict(),
    dict(weighted=True, label_smoothing=0.1),
    dict(weighted=True, label_smoothing=0.1, softcap=8.0),
    dict(vocab_start=150, total_vocab=600, weighted=True, label_smoothing=0.2),  # most labels on other ranks
]


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "weighted_smoothing", "softcap", "slice"])
@pytest.mark.parametrize("block", [1, 16, 64, 1000])
def test_float32_head_matches_float64(options, block):
    options = dict(options)
    softcap, label_smoothing = options.pop("softcap", None), options.pop("label_smoothing", 0.0)
    check(head_inputs(37, 24, 150, **options), softcap, label_smoothing, block, f"block {block} {options}")


@pytest.mark.parametrize("hidden_dtype, weight_dtype", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                                        ("float32", "bfloat16"), ("bfloat16", "float32")])
def test_half_precision_inputs_read_as_they_are(hidden_dtype, weight_dtype):
    inp = head_inputs(41, 24, 203, hidden_dtype=hidden_dtype, weight_dtype=weight_dtype, weighted=True)
    check(inp, 8.0, 0.1, 50, f"{hidden_dtype} hidden, {weight_dtype} weight")


def test_statistics_do_not_depend_on_the_block_and_nothing_on_the_threads(monkeypatch):
    inp = head_inputs(53, 32, 257, weighted=True, seed=3)
    by_block = [run_kernels(inp, 8.0, 0.1, block)[0] for block in (1, 13, 257)]
    for stats in by_block[1:]:
        np.testing.assert_allclose(stats, by_block[0], rtol=1e-6, atol=1e-6)
    many = run_kernels(inp, 8.0, 0.1, 13)
    monkeypatch.setenv("MF_LOSS_NUM_THREADS", "1")
    one = run_kernels(inp, 8.0, 0.1, 13)
    for got, expected in zip(one[:3], many[:3]):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("rows, width", [(0, 16), (5, 0), (1, 16)])
def test_edge_shapes(rows, width):
    """No rows: empty statistics, a zero weight gradient; H = 0: every logit is 0 (uniform softmax), the
    gradients are empty; one row."""
    inp = head_inputs(rows, width, 40)
    stats, hidden_grad, weight_grad = check(inp, None, 0.1, 16, f"{rows} x {width}")
    assert stats.shape == (rows, 5)
    if rows == 0:
        np.testing.assert_array_equal(weight_grad, 0.0)
    if width == 0:
        np.testing.assert_allclose(stats[:, 1], 40.0)  # sum of exp(0) over the classes


def test_refusals(capfd):
    hidden, weight = Tensor(np.ones((4, 8), np.float32)), Tensor(np.ones((10, 8), np.float32))
    label = Tensor(np.zeros(4, np.int32))
    with pytest.raises(RuntimeError):
        fused.head_row_stats(hidden, weight, label, ShardSpec(), 0).asnumpy()
    assert "block (1,) int64 >= 1" in capfd.readouterr().err
    with pytest.raises((RuntimeError, ValueError)):
        fused.head_row_stats(hidden, Tensor(np.ones((10, 6), np.float32)), label, ShardSpec(), 4).asnumpy()
