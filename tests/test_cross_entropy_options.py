"""One device: every option against a float64 NumPy reference and torch's F.cross_entropy, values and gradients."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from cases import (CORE_CASES, Case, assert_close, assert_matches, evaluate, expected, full_inputs, grid_cases,
                   loss_options, to_tensors, upstream_weights)
from mf_loss import CrossEntropyLoss
from reference import numpy_cross_entropy, torch_cross_entropy

pytestmark = pytest.mark.unit


def check_case(case, options, arrays=None):
    arrays = arrays or full_inputs(case)
    loss_fn = CrossEntropyLoss(**options)
    outputs, grad = evaluate(loss_fn, *to_tensors(case, arrays), reduction=options.get("reduction", "mean"))
    assert_matches(case, outputs, grad, *expected(case, arrays, options), case.name)
    return outputs, grad


@pytest.mark.parametrize("case", CORE_CASES, ids=lambda c: c.name)
def test_core_cases_against_numpy(case):
    check_case(case, loss_options(case))


@pytest.mark.parametrize("case", grid_cases(), ids=lambda c: c.name)
def test_option_grid_against_numpy_and_torch(case):
    options = loss_options(case)
    arrays = full_inputs(case)
    outputs, grad = check_case(case, options, arrays)
    logits, label, mask = arrays
    dout = upstream_weights(logits.shape[:-1])
    torch_value, torch_grad = torch_cross_entropy(
        logits, label, mask, weight=options.get("weight"), ignore_index=options["ignore_index"],
        label_smoothing=options["label_smoothing"], reduction=options["reduction"], probs=case.target == "probs",
        dout=dout)
    assert_close(outputs[0], torch_value, 1e-6, "value vs torch")
    assert_close(grad, torch_grad, 1e-6, "gradient vs torch")


def test_ignored_rows_get_exact_zero_gradient_and_do_not_count():
    case = Case("ignored", mask="none", ignored=4)
    logits, label, _ = full_inputs(case)
    loss_fn = CrossEntropyLoss()
    (value,), grad = evaluate(loss_fn, *to_tensors(case, (logits, label, None)))
    ignored = label == -100
    assert ignored.sum() == 4 and np.all(grad[ignored] == 0.0)
    # the mean is over the other rows only: the loss of the kept rows alone, ours and NumPy's
    kept = CrossEntropyLoss()(Tensor(logits[~ignored]), Tensor(label[~ignored]))
    np.testing.assert_allclose(value, kept.asnumpy(), rtol=1e-6)
    (kept_expected,), kept_grad, _ = numpy_cross_entropy(logits[~ignored], label[~ignored], None)
    np.testing.assert_allclose(value, kept_expected, rtol=1e-6)
    assert_close(grad[~ignored], kept_grad, 1e-6, "gradient of the kept rows")


def test_masked_nan_row_does_not_poison_loss_or_gradient():
    case = Case("nan_row", mask="none", ignored=0)
    logits, label, _ = full_inputs(case)
    mask = np.ones(len(label), np.float32)
    mask[3] = 0
    (clean_expected,), clean_grad, _ = numpy_cross_entropy(logits, label, mask)  # row 3 counts for nothing
    logits[3, 5] = np.nan
    (value,), grad = evaluate(CrossEntropyLoss(), *to_tensors(case, (logits, label, mask)))
    assert np.isfinite(value) and np.all(np.isfinite(grad)) and np.all(grad[3] == 0)
    np.testing.assert_allclose(value, clean_expected, rtol=1e-6)
    assert_close(grad, clean_grad, 1e-6, "gradient")


def test_all_masked_mean_is_zero_or_nan_as_asked():
    case = Case("empty", mask="zero")
    tensors = to_tensors(case, full_inputs(case))
    (value,), grad = evaluate(CrossEntropyLoss(), *tensors)
    assert value == 0.0 and np.all(grad == 0.0)
    (value,), _ = evaluate(CrossEntropyLoss(empty_mean="nan"), *tensors)
    assert np.isnan(value)


def test_result_is_float32_scalar_for_half_inputs():
    case = Case("half", dtype="bfloat16")
    loss = CrossEntropyLoss()(*to_tensors(case, full_inputs(case)))
    assert loss.dtype == ms.float32 and loss.shape == ()
