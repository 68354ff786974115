"""The fused head's weight gradient: one float32 running sum that each chunk's share is added into inside an
sgemm (`fused.accumulate_transposed_product`), scaled in place by the upstream gradient (forward design).
The kernel alone against float64 NumPy (a non-zero total, strided shapes, its error message); the head with
several chunks, both modes and both gradient designs: values and both gradients against float64 NumPy, with
an upstream gradient other than 1, twice in a row on the same cell (the running sum must start afresh each
call: GRAPH mode would keep a folded zero buffer between calls)."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from mf_loss import LinearCrossEntropyLoss
from mf_loss.ops import chunking, fused

pytestmark = pytest.mark.kernel
ROWS, HIDDEN, VOCAB, CHUNK = 37, 16, 203, 10
UPSTREAM = 3.0


class ScaledLoss(nn.Cell):
    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def construct(self, hidden, head_weight, label, mask):
        return self.loss(hidden, head_weight, label, mask) * UPSTREAM


def reference(hidden, head_weight, label, mask):
    """UPSTREAM * the masked token mean of the cross entropy, and its gradients, in float64."""
    h, w = hidden.astype(np.float64), head_weight.astype(np.float64)
    logits = h @ w.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(label))
    weights = mask / mask.sum()
    loss = -(np.log(probs[rows, label]) * weights).sum()
    grad = probs.copy()
    grad[rows, label] -= 1.0
    grad *= weights[:, None] * UPSTREAM
    return UPSTREAM * loss, grad @ w, grad.T @ h


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_summed_weight_gradient_equals_numpy_twice_in_a_row(mode, grad_mode):
    assert len(chunking.chunk_bounds(ROWS, CHUNK)) == 4  # three chunks add into the first one's sum
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        rng = np.random.default_rng(3)
        hidden = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
        head_weight = (rng.standard_normal((VOCAB, HIDDEN)) / 4).astype(np.float32)
        label = rng.integers(0, VOCAB, ROWS).astype(np.int32)
        mask = (rng.random(ROWS) > 0.2).astype(np.float32)
        loss = LinearCrossEntropyLoss(chunk_size=CHUNK, grad_mode=grad_mode, backend="fused")
        assert loss.backend == "fused"  # the in-place sums are what runs
        step = ms.value_and_grad(ScaledLoss(loss), grad_position=(0, 1))
        if mode == "graph":
            step = ms.jit(step)
        expected_loss, expected_hidden_grad, expected_weight_grad = reference(hidden, head_weight, label, mask)
        for call in range(2):
            value, (hidden_grad, weight_grad) = step(Tensor(hidden), Tensor(head_weight), Tensor(label),
                                                     Tensor(mask))
            what = f"{mode}/{grad_mode}, call {call + 1}"
            np.testing.assert_allclose(value.asnumpy(), expected_loss, rtol=1e-6, err_msg=what)
            # float32 matmuls over H = 16 and the chunk's rows: a few ulps of the largest term
            np.testing.assert_allclose(hidden_grad.asnumpy(), expected_hidden_grad, rtol=1e-5, atol=1e-7,
                                       err_msg=what)
            np.testing.assert_allclose(weight_grad.asnumpy(), expected_weight_grad, rtol=1e-5, atol=1e-7,
                                       err_msg=what)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("rows", [0, 1, 37])
def test_transposed_product_kernel_adds_into_total(rows):
    """total[offset:offset + Vt] + a^T @ b, written over a float32 total that already holds a sum, other rows
    untouched (rows = 0: unchanged)."""
    fused.load()
    rng = np.random.default_rng(rows)
    offset, tile = 50, 120
    total = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    a = rng.standard_normal((rows, tile)).astype(np.float32)
    b = rng.standard_normal((rows, HIDDEN)).astype(np.float32)
    result = fused.accumulate_transposed_product(Tensor(total.copy()), Tensor(a), Tensor(b), offset).asnumpy()
    expected = total.astype(np.float64)
    expected[offset:offset + tile] += a.T.astype(np.float64) @ b.astype(np.float64)
    # float32 products summed over `rows` terms: a few ulps of the sum of magnitudes
    magnitude = np.abs(total).astype(np.float64)
    magnitude[offset:offset + tile] += np.abs(a.T) @ np.abs(b)
    assert np.all(np.abs(result - expected) <= 1e-6 * magnitude + 1e-7)
    np.testing.assert_array_equal(result[:offset], total[:offset])
    np.testing.assert_array_equal(result[offset + tile:], total[offset + tile:])


def test_transposed_product_kernel_refuses_what_does_not_fit(capfd):
    """MindSpore turns the kernel's failure into a RuntimeError; the kernel's own message, on stderr, says what
    it expects (here: 4 columns of grad from row 2 of a 5-row total would write past its end)."""
    fused.load()
    total = Tensor(np.zeros((5, 3), np.float32))
    with pytest.raises(RuntimeError):
        fused.accumulate_transposed_product(total, Tensor(np.ones((2, 4), np.float32)),
                                            Tensor(np.ones((2, 3), np.float32)), 2).asnumpy()
    assert "mf_accumulate_transposed_product: the grad's columns do not fit in total" in capfd.readouterr().err
    with pytest.raises(RuntimeError):
        fused.accumulate_transposed_product(total, Tensor(np.ones((2, 4), np.float32)),
                                            Tensor(np.ones((3, 3), np.float32))).asnumpy()
    assert "expects total (V, H) float32, grad (n, Vt) and rows (n, H)" in capfd.readouterr().err


def test_float32_and_same_dtype_zeros_do_not_share_a_kernel():
    """PYNATIVE caches a Custom operator's kernel by its function and inputs: the float32 zeros (the running
    sum of a bfloat16 weight's float32 copy) once handed a bfloat16 weight's own running sum a float32 buffer
    when both ran on a weight of the same shape (the msrun job's copy case, then its tiles case)."""
    fused.load()
    like = Tensor(np.ones((12, 8), np.float32)).astype(ms.bfloat16)
    assert fused.zeros(like, True).dtype == ms.float32
    same = fused.zeros(like)
    assert same.dtype == ms.bfloat16 and same.shape == (12, 8)
    assert not same.astype(ms.float32).asnumpy().any()
