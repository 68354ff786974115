"""The composed CrossEntropyLoss going through its rows in chunks (`VocabParallelCrossEntropy.bounds`), which
its automatic budget only does at LLM shapes: here `chunk_size=7` (the last chunk shorter) on small inputs,
values and logits gradients against float64 NumPy for the options whose chunked code differs (class weights,
smoothing, z-loss, softcap, probability targets, per-token and unreduced outputs), in both modes.
Half-precision logits are chunked where the device slices them (Ascend; CPU's GRAPH mode has no half-precision
slice, so there they go whole): that branch is run in PYNATIVE with the device target set to "Ascend"."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from mf_loss import CrossEntropyLoss
from cases import COMPOSED_RTOL, GRAD_RTOL, MS_DTYPES, class_weights, random_inputs, rounded
from reference import numpy_cross_entropy

pytestmark = pytest.mark.unit
ROWS, VOCAB, CHUNK = 40, 50, 7
OPTION_SETS = {
    "plain": {},
    "weights_smoothing_zloss": dict(weight=class_weights(VOCAB), label_smoothing=0.1, z_loss_weight=1e-3),
    "softcap_sum": dict(logit_softcap=5.0, reduction="sum"),
    "none": dict(reduction="none"),
    "per_token": dict(calculate_per_token_loss=True),
}


class Objective(nn.Cell):
    """The loss's first output, weighted per token for reduction='none' (each row's upstream gradient differs)."""

    def __init__(self, loss, upstream):
        super().__init__()
        self.loss, self.upstream = loss, upstream

    def construct(self, logits, label, mask):
        out = self.loss(logits, label, mask)
        first = out[0] if isinstance(out, tuple) else out
        return (first * self.upstream).sum() if self.upstream is not None else first


def chunked_loss(options, device_target="CPU"):
    loss = CrossEntropyLoss(backend="composed", chunk_size=CHUNK, **options)
    for core in (loss.core,):
        core.device_target = device_target  # which device's slicing the chunk loop plans for
    return loss


def check(options, target="index", dtype="float32", device_target="CPU"):
    rng = np.random.default_rng(2)
    logits, label, mask = random_inputs(rng, (ROWS,), VOCAB, target=target, mask="float")
    if dtype != "float32":
        logits = rounded(logits, dtype)
    loss = chunked_loss(options, device_target)
    core = loss.core
    bounds = core.bounds(Tensor(logits).astype(MS_DTYPES[dtype]))
    assert len(bounds) == -(-ROWS // CHUNK) and bounds[-1] == (35, 40), bounds
    upstream = rng.uniform(0.5, 1.5, ROWS).astype(np.float32) if options.get("reduction") == "none" else None
    step = ms.value_and_grad(Objective(loss, None if upstream is None else Tensor(upstream)))
    if ms.get_context("mode") == ms.GRAPH_MODE:
        step = ms.jit(step)
    value, grad = step(Tensor(logits).astype(MS_DTYPES[dtype]), Tensor(label), Tensor(mask))
    per_token = options.get("calculate_per_token_loss", False)
    reference_options = {k: v for k, v in options.items() if k != "calculate_per_token_loss"}
    outputs, expected_grad, _ = numpy_cross_entropy(logits, label, mask, probs=target == "probs",
                                                    per_token=per_token, dout=upstream, **reference_options)
    expected_value = (outputs[0] * upstream).sum() if upstream is not None else outputs[0]
    np.testing.assert_allclose(value.asnumpy(), expected_value, rtol=COMPOSED_RTOL, atol=1e-6)
    assert grad.dtype == MS_DTYPES[dtype]
    got = grad.astype(ms.float32).asnumpy()
    scale = np.abs(expected_grad).max()
    tolerance = max(GRAD_RTOL[dtype], COMPOSED_RTOL)
    np.testing.assert_allclose(got, expected_grad, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_chunked_composed_equals_numpy(name, mode):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        check(OPTION_SETS[name])
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_chunked_composed_probability_targets():
    check(dict(label_smoothing=0.05), target="probs")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_are_chunked_where_the_device_slices_them(dtype):
    loss = chunked_loss({})
    half = Tensor(np.zeros((ROWS, VOCAB), np.float32)).astype(MS_DTYPES[dtype])
    assert loss.core.bounds(half) == [(0, ROWS)]  # CPU: whole
    check(OPTION_SETS["weights_smoothing_zloss"], dtype=dtype, device_target="Ascend")


def test_chunk_size_is_checked_and_ignored_by_the_fused_kernels():
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        CrossEntropyLoss(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        CrossEntropyLoss(chunk_size=2.5)
    fused = CrossEntropyLoss(backend="fused", chunk_size=CHUNK)
    assert fused.core.bounds(Tensor(np.zeros((ROWS, VOCAB), np.float32))) == [(0, ROWS)]
