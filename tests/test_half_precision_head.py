"""The fused head with a float16 / bfloat16 head weight: no float32 copy of the weight or of its gradient.

The kernels read the weight in its own dtype (a chunk's logits: `product_transposed`; its hidden-gradient part:
`accumulate_product`, blocks of the weight converted to float32 for sgemm). grad_mode="forward" sums the
weight gradient over the chunks in one float32 running sum, rounded once to the weight's dtype at the end.
grad_mode="recompute" (what "auto" takes for a half-precision weight) makes each vocabulary block's rows of it
complete and rounds them once. Checked against float64 NumPy on the rounded inputs, with class weights,
label smoothing, z-loss and a softcap, an upstream gradient other than 1, in both modes and both gradient
strategies, twice in a row on one cell (the running sums are fresh buffers each call); the two product
kernels alone against float64 NumPy, with shapes that leave partial blocks.

Tolerances: the loss at 2e-6 relative (float32 maths on rounded inputs). A gradient element is right when it
is within one unit in the last place of the dtype of the exact value (the float32 result rounded once is
within half of one, plus float32 matmul noise), or within 1e-5 of the gradient's largest element (float32
noise on elements near 0, and float16's subnormals below 6.1e-5, where a unit is 2^-24).
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from mf_loss import LinearCrossEntropyLoss
from cases import MS_DTYPES, class_weights, linear_inputs, rounded
from reference import numpy_cross_entropy
from test_head_running_sum import UPSTREAM, ScaledLoss

pytestmark = pytest.mark.kernel
ROWS, HIDDEN, VOCAB, CHUNK = 37, 16, 203, 10
OPTIONS = dict(weight=class_weights(VOCAB), label_smoothing=0.1, z_loss_weight=1e-3, logit_softcap=8.0)
SIGNIFICAND_BITS = {"bfloat16": 8, "float16": 11}
SMALLEST_SPACING = {"bfloat16": 2.0 ** -133, "float16": 2.0 ** -24}


def spacing(exact, dtype):
    """The distance between neighbouring values of `dtype` around each exact value (its unit in the last place)."""
    exponent = np.floor(np.log2(np.maximum(np.abs(exact), 1e-300)))
    return np.maximum(2.0 ** (exponent - SIGNIFICAND_BITS[dtype] + 1), SMALLEST_SPACING[dtype])


def round_to(values, dtype):
    return Tensor(np.asarray(values, np.float32)).astype(MS_DTYPES[dtype]).astype(ms.float32).asnumpy().astype(
        np.float64)


def assert_within_one_unit(got, exact, dtype, what):
    floor = 1e-5 * np.abs(exact).max()
    error = np.abs(got - exact)
    bad = (error > spacing(exact, dtype)) & (error > floor)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} elements off by more than a unit of {dtype}; "
                           f"worst {error.max():.3g} at {np.unravel_index(error.argmax(), error.shape)}")


def half_inputs(dtype):
    h, w, label, mask = linear_inputs(np.random.default_rng(5), (ROWS,), HIDDEN, VOCAB, scale=4.0, mask="float")
    return rounded(h, dtype), rounded(w, dtype), label.astype(np.int32), mask


def reference(h, w, label, mask):
    """UPSTREAM * the loss, and its gradients w.r.t. hidden and head_weight, in float64."""
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    outputs, grad, _ = numpy_cross_entropy(h64 @ w64.T, label, mask, **OPTIONS)
    return UPSTREAM * outputs[0], UPSTREAM * grad @ w64, UPSTREAM * grad.T @ h64


def run_twice(mode, grad_mode, dtype):
    """[(loss, d hidden, d head_weight) in float64] of two calls of one jitted/eager step."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        h, w, label, mask = half_inputs(dtype)
        loss = LinearCrossEntropyLoss(chunk_size=CHUNK, grad_mode=grad_mode, backend="fused", **OPTIONS)
        step = ms.value_and_grad(ScaledLoss(loss), grad_position=(0, 1))
        if mode == "graph":
            step = ms.jit(step)
        results = []
        for _ in range(2):
            value, (hidden_grad, weight_grad) = step(Tensor(h).astype(MS_DTYPES[dtype]),
                                                     Tensor(w).astype(MS_DTYPES[dtype]), Tensor(label), Tensor(mask))
            assert hidden_grad.dtype == MS_DTYPES[dtype] and weight_grad.dtype == MS_DTYPES[dtype]
            results.append(tuple(x.astype(ms.float32).asnumpy().astype(np.float64)
                                 for x in (value, hidden_grad, weight_grad)))
        return results, reference(h, w, label, mask)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_weight_gradient_is_the_exact_one_rounded(dtype, mode, grad_mode):
    results, (expected_loss, expected_hidden, expected_weight) = run_twice(mode, grad_mode, dtype)
    for call, (value, hidden_grad, weight_grad) in enumerate(results):
        what = f"{dtype} {mode}/{grad_mode}, call {call + 1}"
        np.testing.assert_allclose(value, expected_loss, rtol=2e-6, err_msg=what)
        assert_within_one_unit(hidden_grad, expected_hidden, dtype, f"{what}: d hidden")
        assert_within_one_unit(weight_grad, expected_weight, dtype, f"{what}: d head_weight")
    if dtype == "bfloat16":  # bfloat16 has float32's range: nearly every element is the exact value rounded
        exactly_rounded = np.mean(results[0][2] == round_to(expected_weight, dtype))
        assert exactly_rounded > 0.99, exactly_rounded


# ---- the kernel that takes a chunk of a half-precision hidden, alone (PYNATIVE) ----

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rows_float32_are_the_rows_exact_values(dtype):
    from mf_loss.ops import fused
    fused.load()
    rng = np.random.default_rng(11)
    matrix = Tensor(rng.standard_normal((30, 7)).astype(np.float32)).astype(MS_DTYPES[dtype])
    tile = fused.rows_float32(matrix, 11, 23)
    assert tile.dtype == ms.float32 and tile.shape == (12, 7)
    np.testing.assert_array_equal(tile.asnumpy(), matrix.astype(ms.float32).asnumpy()[11:23])


# ---- the products with the head weight in its own dtype, alone (PYNATIVE) ----

@pytest.fixture
def kernels():
    from mf_loss.ops import fused
    fused.load()
    return fused


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rows,hidden,vocab", [(7, 33, 1100), (1, 2100, 5), (0, 8, 9), (5, 0, 6), (130, 64, 3000)])
def test_product_kernels_read_the_weight_in_its_dtype(kernels, dtype, rows, hidden, vocab):
    """a @ w^T and total[offset:] += g @ w against float64 NumPy on w's rounded values: blocks of the weight's
    rows (1100 and 3000 classes leave partial blocks of the 512-row sums and of the logits' blocks), of H's
    columns (2100 > the 2048-column block), no rows, no hidden width. float32 sums of <= 3000 terms of size ~1:
    within 1e-5 of the largest |terms| sum."""
    rng = np.random.default_rng(rows + hidden + vocab)
    w = Tensor(rng.standard_normal((vocab, hidden)).astype(np.float32)).astype(MS_DTYPES[dtype])
    w64 = w.astype(ms.float32).asnumpy().astype(np.float64)
    a = rng.standard_normal((rows, hidden)).astype(np.float32)
    logits = kernels.product_transposed(Tensor(a), w)
    assert logits.dtype == ms.float32 and logits.shape == (rows, vocab)
    bound = 1e-5 * max(1.0, (np.abs(a) @ np.abs(w64.T)).max(initial=0))
    np.testing.assert_allclose(logits.asnumpy(), a @ w64.T, rtol=0, atol=bound)
    g = rng.standard_normal((rows, vocab)).astype(np.float32)
    offset, total_rows = 3, rows + 5
    start = rng.standard_normal((total_rows, hidden)).astype(np.float32)
    total = kernels.accumulate_product(Tensor(start.copy()), Tensor(g), w, offset)
    expected = start.astype(np.float64)
    expected[offset:offset + rows] += g @ w64
    bound = 1e-5 * max(1.0, (np.abs(g) @ np.abs(w64)).max(initial=0))
    np.testing.assert_allclose(total.asnumpy(), expected, rtol=0, atol=bound)
    np.testing.assert_array_equal(total.asnumpy()[:offset], start[:offset])  # rows outside untouched
    np.testing.assert_array_equal(total.asnumpy()[offset + rows:], start[offset + rows:])


def test_product_kernels_refuse_what_does_not_fit(kernels, capfd):
    w = Tensor(np.ones((6, 4), np.float32)).astype(ms.bfloat16)
    with pytest.raises(RuntimeError):
        kernels.product_transposed(Tensor(np.ones((2, 5), np.float32)), w).asnumpy()  # H 5, the weight's 4
    assert "mf_product_transposed: expects a (n, H) float32, weight (V, H) float" in capfd.readouterr().err
    with pytest.raises(RuntimeError):  # 2 rows from row 3 of a 4-row total
        kernels.accumulate_product(Tensor(np.zeros((4, 4), np.float32)), Tensor(np.ones((2, 6), np.float32)), w,
                                   3).asnumpy()
    assert "mf_accumulate_product: a's rows do not fit in total at this offset" in capfd.readouterr().err
