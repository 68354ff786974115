"""One device: every option against a float64 NumPy reference and torch's F.cross_entropy, values and gradients."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from cases import CORE_CASES, Case, evaluate, full_inputs, grid_cases, loss_options, to_tensors, upstream_weights
from mf_loss import CrossEntropyLoss
from reference import numpy_cross_entropy, torch_cross_entropy

TOLERANCE = {"float32": 1e-6, "float16": 1e-6, "bfloat16": 1e-6}
GRAD_TOLERANCE = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}  # the gradient is written in the input dtype


def rounded(case, arrays):
    """The inputs as the loss sees them: logits rounded to the case's dtype."""
    logits, label, mask = arrays
    logits = to_tensors(case, arrays)[0].astype(ms.float32).asnumpy()
    return logits, label, mask


def reference(case, arrays, options):
    logits, label, mask = rounded(case, arrays)
    keys = ("weight", "ignore_index", "label_smoothing", "z_loss_weight", "logit_softcap", "reduction", "empty_mean")
    kwargs = {k: options[k] for k in keys if k in options}
    dout = upstream_weights(label.shape if case.target == "index" else label.shape[:-1])
    return numpy_cross_entropy(logits, label, mask, probs=case.target == "probs", dout=dout,
                               per_token=options.get("calculate_per_token_loss", False), **kwargs)


def assert_close(actual, expected, rtol, what):
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def check_case(case, options, arrays=None):
    arrays = arrays or full_inputs(case)
    loss_fn = CrossEntropyLoss(**options)
    outputs, grad = evaluate(loss_fn, *to_tensors(case, arrays), reduction=options.get("reduction", "mean"))
    expected, expected_grad, expected_z = reference(case, arrays, options)
    if options.get("return_z_loss"):
        expected = expected + [expected_z]
    assert len(outputs) == len(expected)
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.shape == np.shape(ref), f"output {i}: shape {out.shape}, expected {np.shape(ref)}"
        assert_close(out, ref, TOLERANCE[case.dtype], f"{case.name}: output {i}")
    assert_close(grad, expected_grad, GRAD_TOLERANCE[case.dtype], f"{case.name}: gradient")
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
    assert np.all(grad[ignored] == 0.0)
    kept = CrossEntropyLoss()(Tensor(logits[~ignored]), Tensor(label[~ignored]))
    np.testing.assert_allclose(value, kept.asnumpy(), rtol=1e-6)


def test_masked_nan_row_does_not_poison_loss_or_gradient():
    case = Case("nan_row", mask="none", ignored=0)
    logits, label, _ = full_inputs(case)
    logits[3, 5] = np.nan
    mask = np.ones(len(label), np.float32)
    mask[3] = 0
    (value,), grad = evaluate(CrossEntropyLoss(), *to_tensors(case, (logits, label, mask)))
    assert np.isfinite(value) and np.all(np.isfinite(grad)) and np.all(grad[3] == 0)


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
