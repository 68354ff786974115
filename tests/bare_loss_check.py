"""Run as a script by tests/test_packaging.py, in whichever Python environment is being checked: both losses
forward and backward on a small batch, checked against float64 NumPy, then the names of the tools' packages
that importing and running the losses brought in (printed as JSON on the last line)."""
import json
import sys

import numpy as np

import mindspore as ms
from mindspore import Tensor

import mf_loss

TOOL_PACKAGES = ("matplotlib", "tokenizers", "torch")


def reference(logits, labels):
    """Mean cross entropy over the rows and its gradient with respect to the logits, float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1.0
    return -log_probs[rows, labels].mean(), grad / len(labels)


def main() -> int:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((6, 4)).astype(np.float32)
    head_weight = rng.standard_normal((10, 4)).astype(np.float32)
    labels = rng.integers(0, 10, 6).astype(np.int32)
    logits = hidden @ head_weight.T
    expected, expected_grad = reference(logits.astype(np.float64), labels)

    loss_fn = mf_loss.CrossEntropyLoss()
    loss, grad = ms.value_and_grad(lambda x: loss_fn(x, Tensor(labels), None))(Tensor(logits))
    np.testing.assert_allclose(loss.asnumpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(grad.asnumpy(), expected_grad, rtol=1e-4, atol=1e-6)

    head_fn = mf_loss.LinearCrossEntropyLoss()
    loss, (hidden_grad, weight_grad) = ms.value_and_grad(
        lambda h, w: head_fn(h, w, Tensor(labels), None), grad_position=(0, 1))(Tensor(hidden), Tensor(head_weight))
    np.testing.assert_allclose(loss.asnumpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(hidden_grad.asnumpy(), expected_grad @ head_weight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(weight_grad.asnumpy(), expected_grad.T @ hidden, rtol=1e-4, atol=1e-6)

    print(json.dumps({"tool_packages_imported": sorted(p for p in TOOL_PACKAGES if p in sys.modules)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
