"""The suite's loss cases, its one input factory, and the float64 expectation every test compares with.

A case is constructor options plus a recipe for the inputs. `random_inputs` draws logits, class ids (some
ignored) or probability targets, and a mask, of any leading shape and vocabulary (`linear_inputs` the fused
head's hidden states and head weight instead of logits, with the same labels and masks); `full_inputs` builds a
case's whole batch over the whole vocabulary from a seed; `shard` cuts out one rank's rows (its dp slice)
and columns (its mp slice), so a distributed rank, a simulated rank and the single-device reference see the
very same numbers. `expected` is the float64 NumPy reference (reference.py) of a case on the inputs as the
loss sees them (logits rounded to the case's dtype), and `assert_close` the one comparison rule.
"""
import itertools
from dataclasses import dataclass, field

import numpy as np

import mindspore as ms
from mindspore import Tensor

from reference import numpy_cross_entropy

VOCAB = 24  # divisible by 1, 2, 3, 4 and 8 model-parallel ranks
ROWS = 12   # per dp rank
MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
# Values are float32 math whatever the logits' dtype; the gradient is written in the logits' dtype, so it is
# compared within about one unit in the last place of that dtype (2^-10 for float16, 2^-7 for bfloat16).
VALUE_RTOL = {"float32": 1e-6, "float16": 1e-6, "bfloat16": 1e-6}
GRAD_RTOL = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
# The composed backend runs MindSpore's CPU Exp, a low-order approximation: relative error up to 3.2e-6 on
# [-1, 0] and 8e-6 on [-20, -10] (measured here; the fused kernels' exp is within about 1 ulp). Its softmax
# terms carry that error into values and gradients, so it is held to 5e-6 of float64 instead of 1e-6.
COMPOSED_RTOL = 5e-6


def tolerances(dtype, backend="fused"):
    """(value rtol, gradient rtol) for logits of `dtype` through `backend` ("composed", "fused", ...)."""
    floor = COMPOSED_RTOL if backend == "composed" else 0.0
    return max(VALUE_RTOL[dtype], floor), max(GRAD_RTOL[dtype], floor)


@dataclass(frozen=True)
class Case:
    name: str
    options: dict = field(default_factory=dict)
    dtype: str = "float32"
    batch_shape: tuple = (ROWS,)   # leading shape per dp rank, e.g. (3, 4) for (B, S, V)
    scale: float = 3.0
    mask: str = "int"              # none | int | bool | float | zero
    target: str = "index"          # index | probs
    ignored: int = 2               # rows with label == ignore_index (per dp rank)


def random_labels(rng, rows, vocab, *, ignored=2, ignore_index=-100):
    """Class ids (rows,) int32 in [0, vocab), `ignored` of them (at random rows) set to ignore_index."""
    label = rng.integers(0, vocab, rows).astype(np.int32)
    if rows:
        label[rng.choice(rows, size=min(ignored, rows), replace=False)] = ignore_index
    return label


def random_mask(rng, leading_shape, kind):
    """None (kind 'none') or a mask of `leading_shape` and `kind`: int, bool, float (weights in [0.5, 2) on
    kept rows) or zero; about a quarter of the rows masked out."""
    if kind == "none":
        return None
    rows = int(np.prod(leading_shape))
    weights = (rng.random(rows) > 0.25).astype(np.float32)
    if kind == "float":
        weights = weights * rng.uniform(0.5, 2.0, rows).astype(np.float32)
    elif kind == "zero":
        weights = np.zeros(rows, np.float32)
    weights = weights.reshape(leading_shape)
    return {"bool": weights.astype(bool), "int": weights.astype(np.int32)}.get(kind, weights)


def random_inputs(rng, leading_shape, vocab, *, scale=3.0, target="index", mask="int", ignored=2,
                  ignore_index=-100):
    """NumPy logits (*leading_shape, vocab) float32, label (class ids (*leading_shape,) with `ignored` rows
    set to ignore_index, or float32 probabilities of the logits' shape) and mask (`random_mask`)."""
    leading_shape = tuple(leading_shape)
    rows = int(np.prod(leading_shape))
    logits = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
    if target == "probs":
        raw = rng.random((rows, vocab)) ** 3
        label = (raw / raw.sum(-1, keepdims=True)).astype(np.float32).reshape(leading_shape + (vocab,))
    else:
        label = random_labels(rng, rows, vocab, ignored=ignored, ignore_index=ignore_index).reshape(leading_shape)
    return logits.reshape(leading_shape + (vocab,)), label, random_mask(rng, leading_shape, mask)


def linear_inputs(rng, leading_shape, hidden, vocab, *, scale=1.0, mask="int", ignored=2, ignore_index=-100):
    """The fused head's inputs: NumPy hidden (*leading_shape, hidden) and head weight (vocab, hidden) float32
    whose logits h @ W.T are about scale * N(0, 1), labels (`random_labels`) and a mask (`random_mask`)."""
    leading_shape = tuple(leading_shape)
    rows = int(np.prod(leading_shape))
    h = (rng.standard_normal((rows, hidden)) * np.sqrt(scale)).astype(np.float32)
    w = (rng.standard_normal((vocab, hidden)) * np.sqrt(scale / hidden)).astype(np.float32)
    label = random_labels(rng, rows, vocab, ignored=ignored, ignore_index=ignore_index)
    return (h.reshape(leading_shape + (hidden,)), w, label.reshape(leading_shape),
            random_mask(rng, leading_shape, mask))


def class_weights(vocab, seed=7):
    """Per-class weights in [0.2, 2), the same for a vocabulary size wherever they are drawn."""
    return np.random.default_rng(seed).uniform(0.2, 2.0, vocab).astype(np.float32)


def full_inputs(case: Case, dp: int = 1, seed: int = 0):
    """NumPy inputs for all dp ranks stacked on axis 0: logits (dp*B.., V), label, mask (or None)."""
    shape = (dp * case.batch_shape[0],) + tuple(case.batch_shape[1:])
    return random_inputs(np.random.default_rng(seed), shape, VOCAB, scale=case.scale, target=case.target,
                         mask=case.mask, ignored=case.ignored * dp,
                         ignore_index=case.options.get("ignore_index", -100))


def shard(case: Case, arrays, dp_rank: int, mp_rank: int, mp: int):
    """One rank's view: its dp rows and, for logits and probability targets, its vocabulary columns."""
    logits, label, mask = arrays
    per_dp = case.batch_shape[0]
    rows = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    width = logits.shape[-1] // mp
    cols = slice(mp_rank * width, (mp_rank + 1) * width)
    logits = logits[rows][..., cols]
    label = label[rows][..., cols] if case.target == "probs" else label[rows]
    return logits, label, None if mask is None else mask[rows]


def to_tensors(case: Case, arrays):
    logits, label, mask = arrays
    return (Tensor(np.ascontiguousarray(logits)).astype(MS_DTYPES[case.dtype]), Tensor(np.ascontiguousarray(label)),
            None if mask is None else Tensor(np.ascontiguousarray(mask)))


def rounded(logits, dtype):
    """The logits as a loss of that dtype sees them: rounded to the dtype, back in float32."""
    return Tensor(np.ascontiguousarray(logits)).astype(MS_DTYPES[dtype]).astype(ms.float32).asnumpy()


def upstream_weights(shape, seed=1):
    """Per-token upstream gradient for reduction='none', so each row's dout differs."""
    return np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(np.float32)


REFERENCE_KEYS = ("weight", "ignore_index", "label_smoothing", "z_loss_weight", "logit_softcap", "reduction",
                  "empty_mean")


def expected(case: Case, arrays, options):
    """Float64 NumPy outputs (the z-loss appended with return_z_loss) and d(output 0)/d(logits) of the loss
    built with `options` on `arrays` (full vocabulary); reduction='none' is weighted by `upstream_weights`."""
    logits, label, mask = arrays
    kwargs = {k: options[k] for k in REFERENCE_KEYS if k in options}
    outputs, grad, z_loss = numpy_cross_entropy(
        rounded(logits, case.dtype), label, mask, probs=case.target == "probs",
        dout=upstream_weights(logits.shape[:-1]), per_token=options.get("calculate_per_token_loss", False), **kwargs)
    return (outputs + [z_loss] if options.get("return_z_loss") else outputs), grad


def assert_close(actual, expected_value, rtol, what):
    """|actual - expected| <= rtol |expected| + rtol max|expected|: relative, with an absolute floor at the
    scale of the compared array (entries near 0 are differences of terms of that size)."""
    expected_value = np.asarray(expected_value, np.float64)
    scale = max(np.abs(expected_value).max(initial=0.0), 1e-30)
    np.testing.assert_allclose(actual, expected_value, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_matches(case: Case, outputs, grad, expected_outputs, expected_grad, what, backend="fused"):
    """Every output (shape and value) and the gradient against the reference, at the tolerances of the
    case's dtype and the backend."""
    value_rtol, grad_rtol = tolerances(case.dtype, backend)
    assert len(outputs) == len(expected_outputs), f"{what}: {len(outputs)} outputs, expected {len(expected_outputs)}"
    for i, (out, ref) in enumerate(zip(outputs, expected_outputs)):
        assert np.shape(out) == np.shape(ref), f"{what}: output {i} has shape {np.shape(out)}, expected {np.shape(ref)}"
        assert_close(out, ref, value_rtol, f"{what}: output {i}")
    assert np.shape(grad) == np.shape(expected_grad), f"{what}: gradient shape {np.shape(grad)}"
    assert_close(grad, expected_grad, grad_rtol, f"{what}: gradient")


def evaluate(loss_fn, logits, label, mask, reduction="mean"):
    """The loss's outputs and the gradient w.r.t. logits of output 0 (with reduction='none', of its sum
    weighted by `upstream_weights`), as float64 NumPy, from one `ms.value_and_grad` call (outputs as aux)."""
    weighted = reduction == "none" and not getattr(loss_fn, "per_token", False)
    dout = Tensor(upstream_weights(logits.shape[:-1])) if weighted else None

    def objective(x):
        out = loss_fn(x, label, mask)
        out = out if isinstance(out, tuple) else (out,)
        return ((out[0] * dout).sum() if weighted else out[0],) + out

    (_, *outputs), grad = ms.value_and_grad(objective, grad_position=0, has_aux=True)(logits)
    as_numpy = lambda tensor: tensor.astype(ms.float32).asnumpy().astype(np.float64)  # noqa: E731
    return [as_numpy(o) for o in outputs], as_numpy(grad)


# Cases that the single-device tests, the in-process model-parallel tests and every msrun layout run: the
# input kinds (dtypes, shapes, masks, targets) and every option.
CORE_CASES = [
    Case("ignore_and_int_mask"),
    Case("per_token", options=dict(calculate_per_token_loss=True)),
    Case("float16", dtype="float16"),
    Case("bfloat16", dtype="bfloat16"),
    Case("bsv_bool_mask", batch_shape=(3, 4), mask="bool"),
    Case("large_logits", scale=1e4, mask="none"),
    Case("all_masked", mask="zero"),
    Case("all_masked_per_token", mask="zero", options=dict(calculate_per_token_loss=True)),
    Case("weight_smoothing_sum", options=dict(weight="random", label_smoothing=0.1, reduction="sum")),
    Case("none_float_mask", mask="float", options=dict(reduction="none")),
    Case("probs_smoothing_weight", target="probs", options=dict(label_smoothing=0.2, weight="random")),
    Case("zloss_softcap", options=dict(z_loss_weight=1e-3, logit_softcap=5.0, return_z_loss=True)),
    Case("other_ignore_index", options=dict(ignore_index=7, label_smoothing=0.05)),
]


def grid_cases():
    """Every combination of weight x reduction x label_smoothing x ignore_index x mask x target kind."""
    cases = []
    for weighted, reduction, eps, ignore, mask, target in itertools.product(
            (False, True), ("mean", "sum", "none"), (0.0, 0.1), (-100, 3), ("none", "float"), ("index", "probs")):
        if target == "probs" and ignore != -100:
            continue  # ignore_index has no meaning for probability targets
        options = dict(reduction=reduction, label_smoothing=eps, ignore_index=ignore)
        if weighted:
            options["weight"] = "random"
        name = f"w{int(weighted)}_{reduction}_eps{eps}_ig{ignore}_{mask}_{target}"
        cases.append(Case(name, options=options, mask=mask, target=target))
    return cases


def loss_options(case: Case, extra=None):
    """Constructor keyword arguments: the case's options with 'random' weights made concrete."""
    options = dict(case.options)
    if options.get("weight") == "random":
        options["weight"] = class_weights(VOCAB)
    options.update(extra or {})
    return options
