"""LinearCrossEntropyLoss with grad_mode="forward" makes its gradient in the forward; a PYNATIVE call that
nothing differentiates (an evaluation loop) must make only the statistics, and still give the same loss.
The core's chunk gradients are spied on and counted, with the values against float64 NumPy."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from mf_loss import LinearCrossEntropyLoss
from reference import numpy_cross_entropy

pytestmark = pytest.mark.unit
ROWS, HIDDEN, VOCAB = 12, 8, 20


def inputs():
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    head_weight = (rng.standard_normal((VOCAB, HIDDEN)) / 3).astype(np.float32)
    label = rng.integers(0, VOCAB, ROWS).astype(np.int32)
    return hidden, head_weight, label


def spy(loss):
    """Records each chunk the forward design's loop goes through (`exchanged_chunk_stats`)."""
    ran = []
    chunk_stats = loss.core.exchanged_chunk_stats

    def recorded(*args):
        ran.append("core")
        return chunk_stats(*args)
    loss.core.exchanged_chunk_stats = recorded
    return ran


def expected_loss(hidden, head_weight, label):
    logits = hidden.astype(np.float64) @ head_weight.T.astype(np.float64)
    outputs, _, _ = numpy_cross_entropy(logits, label, None)
    return outputs[0]


def test_an_undifferentiated_pynative_call_makes_only_the_statistics():
    hidden, head_weight, label = inputs()
    loss = LinearCrossEntropyLoss(grad_mode="forward", chunk_size=5)
    ran = spy(loss)
    value = loss(Tensor(hidden), Tensor(head_weight), Tensor(label))
    assert ran == []  # no chunk gradient at all
    np.testing.assert_allclose(value.asnumpy(), expected_loss(hidden, head_weight, label), rtol=1e-6)


def test_a_differentiated_pynative_call_makes_the_gradient_in_the_forward():
    hidden, head_weight, label = inputs()
    loss = LinearCrossEntropyLoss(grad_mode="forward", chunk_size=5)
    ran = spy(loss)
    value, (hidden_grad, _) = ms.value_and_grad(loss, grad_position=(0, 1))(Tensor(hidden), Tensor(head_weight),
                                                                          Tensor(label))
    assert ran == ["core"] * 3  # the gradient made in the forward, one chunk of 5 rows at a time
    np.testing.assert_allclose(value.asnumpy(), expected_loss(hidden, head_weight, label), rtol=1e-6)
    logits = hidden.astype(np.float64) @ head_weight.T.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(ROWS), label] -= 1.0
    np.testing.assert_allclose(hidden_grad.asnumpy(), probs @ head_weight / ROWS, rtol=1e-5, atol=1e-7)
