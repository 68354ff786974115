"""The fused head's weight gradient added in vocabulary tiles and scaled in place (the paths its memory needs
at LLM shapes, `ops.chunking.weight_tile_rows`), at a small shape where the tiles are forced: values and both
gradients against float64 NumPy, with an upstream gradient other than 1, twice in a row on the same cell (the
running sum must start afresh each call: GRAPH mode would keep a folded zero buffer between calls)."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from mf_loss import LinearCrossEntropyLoss
from mf_loss.ops import chunking

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
def test_tiled_weight_gradient_equals_numpy_twice_in_a_row(monkeypatch, mode, grad_mode):
    monkeypatch.setattr(chunking, "MIN_TILE_BYTES", 256)
    tiles = chunking.chunk_bounds(VOCAB, chunking.weight_tile_rows(VOCAB, HIDDEN, CHUNK))
    assert len(tiles) > 2  # the tiled path is what runs
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        rng = np.random.default_rng(3)
        hidden = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
        head_weight = (rng.standard_normal((VOCAB, HIDDEN)) / 4).astype(np.float32)
        label = rng.integers(0, VOCAB, ROWS).astype(np.int32)
        mask = (rng.random(ROWS) > 0.2).astype(np.float32)
        loss = LinearCrossEntropyLoss(chunk_size=CHUNK, grad_mode=grad_mode, backend="fused")
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
