"""LinearCrossEntropyLoss (the fused lm head + loss) on one device: values and the gradients of hidden and
head_weight against float64 NumPy written here (logits = h @ W.T in float64, tests/reference.py's loss,
dH = G @ W, dW = G.T @ h with G = d loss / d logits) and against torch (F.linear_cross_entropy where it has
the options, F.cross_entropy on the materialised logits otherwise); every bad argument; the NaN check; a
training step; a hypothesis property test over shapes, chunkings, scales and options.

Tolerances (float32 inputs). The loss makes its logits with a float32 matmul over H terms, whose error is
about sqrt(H) * u * (|h| @ |W|.T) with u = 2^-24 ~ 6e-8 (not a fraction of the logit itself: of the sum of
the |terms|). To first order a logit error dx moves an output by sum |G| dx, and G's entries by about
2 |G| dx (softmax: dp/p = dx - sum p dx). The gradients are then float32 matmuls over V (dH) and N (dW)
terms. So, with k = 4 for the bound being an estimate, elementwise:
    values:  |got - ref| <= 1e-6 |ref| + k sum_v |G_nv| dx_nv             (+ 1e-6 max|ref| for per-token)
    dH:      |got - ref| <= k (|G| (2 dx + sqrt(V) u)) @ |W|              + 1e-6 max|dH|
    dW:      |got - ref| <= k (|G| (2 dx + sqrt(N) u)).T @ |h|            + 1e-6 max|dW|
i.e. the absolute tolerance is scaled by |G| @ |W| (the sum of the |terms| the float32 arithmetic adds),
never by the gradient's own maximum alone (a gradient row near 0 can be a difference of large terms). The
1e-6 max floor covers cancellations in G itself (label smoothing's p_c ~ eps/V). With a softcap c, G carries
the factor 1 - tanh(x/c)^2, made from a float32 tanh: its relative error 2u / (1 - tanh^2) is added to dx
(large where tanh saturates, exactly where the factor is small). The z-loss output is
compared at 1e-5 relative: it is z lse^2, whose relative error is 2 dx / lse. Half-precision inputs are
compared with the float64 result of the rounded inputs; their gradients come back in their dtype, within
one unit in the last place of it (2^-10 float16, 2^-7 bfloat16, relative to the gradient's scale).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

import mf_loss
from mf_loss import CrossEntropyLoss, LinearCrossEntropyLoss, NonFiniteLossError
from cases import MS_DTYPES, REFERENCE_KEYS, class_weights, linear_inputs, rounded, upstream_weights
from reference import numpy_cross_entropy

pytestmark = pytest.mark.unit

U = 2.0 ** -24
K = 4.0
HALF_GRAD_RTOL = {"float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}  # two ulps of the dtype, of the scale
VOCAB, HIDDEN, ROWS = 12, 8, 10


# ---- inputs: tests/cases.py's factory at this file's sizes ----

def make_inputs(rng, leading=(ROWS,), hidden=HIDDEN, vocab=VOCAB, **kwargs):
    """cases.linear_inputs, by default of this file's (ROWS,), HIDDEN and VOCAB."""
    return linear_inputs(rng, leading, hidden, vocab, **kwargs)


# ---- the float64 reference and the tolerance ----

def reference(h, w, y, m, options, dout=None, *, rows_of_rank=None, hidden_share=False):
    """Float64 outputs (the z-loss appended with return_z_loss), dH, dW, and the elementwise tolerances of
    each (module docstring), for the loss built with `options` on inputs h (.., H), w (V, H) (the full
    vocabulary). For a model-parallel rank: `rows_of_rank`, a slice of W's rows, gives dW of those rows only,
    and `hidden_share` dH = G[:, rows] @ W[rows] (this rank's share) instead of the whole G @ W."""
    hidden = h.shape[-1]
    h2 = h.reshape(-1, hidden).astype(np.float64)
    w64 = w.astype(np.float64)
    logits = h2 @ w64.T
    kwargs = {k: options[k] for k in REFERENCE_KEYS if k in options}
    per_token = options.get("calculate_per_token_loss", False) or options.get("seq_split_num", 1) > 1
    outputs, grad, z_loss = numpy_cross_entropy(logits.reshape(h.shape[:-1] + (w.shape[0],)), y, m,
                                                per_token=per_token, dout=dout, **kwargs)
    grad = grad.reshape(logits.shape)
    rows, vocab = logits.shape
    dx = K * np.sqrt(hidden) * U * (np.abs(h2) @ np.abs(w64).T)
    abs_grad = np.abs(grad)
    if options.get("logit_softcap") is not None:
        # the softcap's derivative 1 - tanh^2 is made from tanh in float32: 2u absolute, 2u / (1 - tanh^2)
        # relative where tanh saturates
        saturation = 1 - np.tanh(logits / options["logit_softcap"]) ** 2
        dx = dx + 2 * U / np.maximum(saturation, 1e-30)
    mine = slice(None) if rows_of_rank is None else rows_of_rank
    share = mine if hidden_share else slice(None)
    d_hidden, d_weight = grad[:, share] @ w64[share], (grad.T @ h2)[mine]
    tol_hidden = K * (abs_grad * (2 * dx + np.sqrt(vocab) * U))[:, share] @ np.abs(w64[share])
    tol_weight = (K * (abs_grad * (2 * dx + np.sqrt(max(rows, 1)) * U)).T @ np.abs(h2))[mine]
    tol_hidden += 1e-6 * np.abs(d_hidden).max(initial=0.0)
    tol_weight += 1e-6 * np.abs(d_weight).max(initial=0.0)
    if options.get("reduction") == "none" and not per_token:
        per_row = dout.reshape(-1) if dout is not None else np.ones(rows)
        value_tols = [(abs_grad * dx).sum(axis=1).reshape(h.shape[:-1]) / per_row.reshape(h.shape[:-1])]
    else:
        value_tols = [np.float64((abs_grad * dx).sum())]
        if per_token:
            value_tols.append(np.float64(0.0))  # the denominator is exact
    if options.get("return_z_loss"):
        outputs = outputs + [z_loss]
        value_tols.append(None)
    return outputs, value_tols, (d_hidden.reshape(h.shape), tol_hidden.reshape(h.shape)), (d_weight, tol_weight)


def assert_within(got, ref, atol, what, rtol=1e-6):
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    floor = 1e-6 * np.abs(ref).max(initial=0.0) if ref.ndim else 0.0
    bound = rtol * np.abs(ref) + atol + floor
    nan_agree = np.isnan(got) == np.isnan(ref)
    bad = ~nan_agree | (~np.isnan(ref) & ~(np.abs(got - ref) <= bound))
    if bad.any():
        at = tuple(np.argwhere(bad)[0]) if got.ndim else ()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ; first at {at}: got {got[at]!r}, "
                             f"expected {ref[at]!r}, allowed {np.broadcast_to(bound, ref.shape)[at]!r}")


def assert_matches_reference(result, ref, what, dtype="float32"):
    (outputs, d_hidden, d_weight), (ref_outputs, value_tols, (ref_h, tol_h), (ref_w, tol_w)) = result, ref
    assert len(outputs) == len(ref_outputs), f"{what}: {len(outputs)} outputs, expected {len(ref_outputs)}"
    for i, (out, expected_value, tol) in enumerate(zip(outputs, ref_outputs, value_tols)):
        if tol is None:  # the z-loss term: see the module docstring
            assert_within(out, expected_value, 0.0, f"{what}: z-loss output {i}", rtol=1e-5)
        else:
            assert_within(out, expected_value, tol, f"{what}: output {i}")
    if dtype == "float32":
        assert_within(d_hidden, ref_h, tol_h, f"{what}: d hidden")
        assert_within(d_weight, ref_w, tol_w, f"{what}: d head_weight")
    else:
        for got, expected_value, name in ((d_hidden, ref_h, "d hidden"), (d_weight, ref_w, "d head_weight")):
            scale = np.abs(expected_value).max(initial=0.0)
            assert_within(got, expected_value, HALF_GRAD_RTOL[dtype] * scale, f"{what}: {name}",
                          rtol=HALF_GRAD_RTOL[dtype])


# ---- running the loss ----

def flatten(out):
    """The loss's outputs as one tuple: loss, ((numerator, denominator), z_loss), ... (GRAPH-compilable: no
    nested comprehension, no recursion)."""
    if not isinstance(out, tuple):
        return (out,)
    leaves = ()
    for item in out:
        leaves = leaves + (item if isinstance(item, tuple) else (item,))
    return leaves


class Objective(nn.Cell):
    """(output 0, or its sum weighted by `weights` for reduction='none'; then every output) of the loss on
    (hidden, head_weight), the other inputs held: a cell, which GRAPH mode compiles the same way wherever it
    is built (a nested function closing over its caller's variables did not always compile)."""

    def __init__(self, loss_fn, label, mask, weights):
        super().__init__()
        self.loss_fn, self.label, self.mask, self.weights = loss_fn, label, mask, weights

    def construct(self, x, head):
        out = self.loss_fn(x, head, self.label) if self.mask is None else self.loss_fn(x, head, self.label, self.mask)
        leaves = flatten(out)
        first = leaves[0] if self.weights is None else (leaves[0] * self.weights).sum()
        return (first,) + leaves


def run_loss(loss_fn, h, w, y, m, *, dtype="float32", dout=None, how="plain"):
    """(outputs, d hidden, d head_weight) as float64 NumPy from one value_and_grad of output 0 (weighted by
    `dout` for reduction='none'), outputs as aux. how: plain (the current mode) or jit (ms.jit around it)."""
    hidden = Tensor(h).astype(MS_DTYPES[dtype])
    weight = Tensor(w).astype(MS_DTYPES[dtype])
    objective = Objective(loss_fn, Tensor(y), None if m is None else Tensor(m), None if dout is None else Tensor(dout))
    step = ms.value_and_grad(objective, grad_position=(0, 1), has_aux=True)
    if how == "jit":
        step = ms.jit(step)
    (_, *outputs), (d_hidden, d_weight) = step(hidden, weight)
    assert d_hidden.dtype == hidden.dtype and d_weight.dtype == weight.dtype, (d_hidden.dtype, d_weight.dtype)
    as_numpy = lambda t: t.astype(ms.float32).asnumpy().astype(np.float64)  # noqa: E731
    return [as_numpy(o) for o in outputs], as_numpy(d_hidden), as_numpy(d_weight)


def check_case(options, *, leading=(ROWS,), mask="int", scale=1.0, dtype="float32", how="plain", seed=0,
               hidden=HIDDEN, vocab=VOCAB, what=""):
    rng = np.random.default_rng(seed)
    h, w, y, m = make_inputs(rng, leading, hidden, vocab, scale=scale, mask=mask,
                             ignore_index=options.get("ignore_index", -100))
    if options.get("weight") == "random":
        options = dict(options, weight=class_weights(vocab))
    if dtype != "float32":
        h, w = rounded(h, dtype), rounded(w, dtype)
    none = options.get("reduction") == "none" and not options.get("calculate_per_token_loss")
    dout = upstream_weights(leading) if none else None
    result = run_loss(LinearCrossEntropyLoss(**options), h, w, y, m, dtype=dtype, dout=dout, how=how)
    assert_matches_reference(result, reference(h, w, y, m, options, dout), f"{what} {options} mask={mask}", dtype)
    return h, w, y, m, options, result


# ---- the option grid (PYNATIVE), both backends and grad modes ----

GRID = [
    dict(),
    dict(weight="random"),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(calculate_per_token_loss=True),
    dict(seq_split_num=2, weight="random"),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, weight="random", reduction="sum"),
    dict(z_loss_weight=1e-3, return_z_loss=True),
    dict(z_loss_weight=1e-2, return_z_loss=True, reduction="none"),
    dict(logit_softcap=2.0),
    dict(ignore_index=3, label_smoothing=0.05),
    dict(weight="random", label_smoothing=0.1, z_loss_weight=1e-3, logit_softcap=3.0, return_z_loss=True,
         calculate_per_token_loss=True),
]
GRID_IDS = ["default", "weight", "sum", "none", "per_token", "seq_split", "smoothing", "weight_smoothing_sum",
            "zloss", "zloss_none", "softcap", "ignore3", "everything_per_token"]


@pytest.mark.parametrize("backend", ["fused", pytest.param("composed", id="composed")])
@pytest.mark.parametrize("options", [pytest.param(o, id=i, marks=()) for o, i in zip(GRID, GRID_IDS)])
def test_option_grid_pynative(options, backend):
    grad_modes = ["recompute"] if options.get("reduction") == "none" else ["forward", "recompute"]
    for grad_mode in grad_modes:
        check_case(dict(options, backend=backend, grad_mode=grad_mode, chunk_size=4), scale=3.0,
                   what=grad_mode)


@pytest.mark.parametrize("mask", ["none", "bool", "float", "zero"])
def test_mask_kinds(mask):
    check_case(dict(backend="fused"), mask=mask, scale=2.0)
    check_case(dict(backend="composed", reduction="sum", grad_mode="recompute"), mask=mask, scale=2.0)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 5, 10, 64])
@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_chunk_sizes_that_do_and_do_not_divide_rows(chunk_size, grad_mode):
    """10 rows: chunks of 1, 3 (a short last chunk), 5, 10 (one), 64 (N smaller than a chunk), automatic."""
    check_case(dict(chunk_size=chunk_size, grad_mode=grad_mode, label_smoothing=0.1), scale=3.0)


def test_bsh_input_and_large_logits():
    check_case(dict(chunk_size=5, reduction="none"), leading=(3, 4), mask="bool")
    check_case(dict(chunk_size=5, calculate_per_token_loss=True), leading=(3, 4), mask="float")
    check_case(dict(chunk_size=4, backend="composed"), scale=300.0, mask="none")


@pytest.mark.parametrize("empty_mean", ["zero", "nan"])
@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
@pytest.mark.parametrize("leading,mask", [((0,), "int"), ((0,), "none"), ((6,), "zero")],
                         ids=["no_rows_int_mask", "no_rows_no_mask", "all_masked"])
def test_empty_batch_and_nothing_counted(leading, mask, empty_mean, grad_mode):
    """N = 0 rows, and rows that are all masked out: 0 or NaN as empty_mean says, zero gradients."""
    options = dict(empty_mean=empty_mean, grad_mode=grad_mode, chunk_size=4)
    expected_mean = np.nan if empty_mean == "nan" else 0.0
    rng = np.random.default_rng(0)
    h, w, y, m = make_inputs(rng, leading, mask=mask)
    for reduction in ("mean", "sum"):
        outputs, d_hidden, d_weight = run_loss(LinearCrossEntropyLoss(**options, reduction=reduction), h, w, y, m)
        expected_value = expected_mean if reduction == "mean" else 0.0
        np.testing.assert_array_equal(outputs[0], expected_value, err_msg=f"{leading} {mask} {reduction}")
        assert d_hidden.shape == h.shape and not d_hidden.any(), (leading, mask, reduction, d_hidden)
        assert d_weight.shape == w.shape and not d_weight.any(), (leading, mask, reduction, d_weight)
    outputs, d_hidden, d_weight = run_loss(
        LinearCrossEntropyLoss(**options, calculate_per_token_loss=True), h, w, y, m)
    assert [float(o) for o in outputs] == [0.0, 0.0] and not d_hidden.any() and not d_weight.any()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["fused", "composed"])
def test_half_precision_inputs(dtype, backend):
    check_case(dict(backend=backend, grad_mode="forward", chunk_size=3, label_smoothing=0.1), dtype=dtype,
               scale=3.0)
    check_case(dict(backend=backend, reduction="none", chunk_size=4), dtype=dtype, scale=3.0, mask="float")


# ---- GRAPH mode and ms.jit(value_and_grad) on a representative subset ----

GRAPH_SUBSET = [
    dict(backend="fused", grad_mode="forward", chunk_size=3, weight="random", label_smoothing=0.1),
    dict(backend="fused", grad_mode="recompute", chunk_size=4, reduction="none", z_loss_weight=1e-3,
         return_z_loss=True),
    dict(backend="composed", grad_mode="forward", chunk_size=4, calculate_per_token_loss=True, logit_softcap=3.0),
    dict(backend="composed", grad_mode="recompute", chunk_size=64, reduction="sum", ignore_index=3),
    # the chunk size chosen in the forward and again in the backward's replay (what Ascend runs for "none")
    dict(backend="composed", reduction="none", label_smoothing=0.1),
]


@pytest.mark.parametrize("options", GRAPH_SUBSET, ids=["fused_forward", "fused_recompute_none",
                                                       "composed_forward_per_token", "composed_recompute_sum",
                                                       "composed_none_automatic_chunks"])
def test_graph_mode(options, graph_mode):
    check_case(dict(options), scale=3.0, mask="float")


@pytest.mark.parametrize("options", GRAPH_SUBSET[:3:2], ids=["fused_forward", "composed_forward_per_token"])
def test_jit_value_and_grad(options):
    check_case(dict(options), scale=3.0, how="jit", leading=(2, 5))


def test_graph_mode_bfloat16_and_bsh(graph_mode):
    check_case(dict(chunk_size=4, grad_mode="recompute"), dtype="bfloat16", leading=(2, 5), scale=3.0)


# ---- against torch ----

def torch_linear(h, w, y, m, options, chunked):
    """torch F.linear_cross_entropy in float64 (mask 0/1 applied as ignore_index, which is what it means),
    returning (value, dH, dW)."""
    import torch
    import torch.nn.functional as TF

    ignore_index = options.get("ignore_index", -100)
    labels = y.reshape(-1).astype(np.int64).copy()
    if m is not None:
        labels[np.asarray(m).reshape(-1) == 0] = ignore_index
    hidden = torch.tensor(h.reshape(-1, h.shape[-1]), dtype=torch.float64, requires_grad=True)
    head = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    weight = options.get("weight")
    kwargs = dict(weight=None if weight is None else torch.tensor(weight, dtype=torch.float64),
                  reduction=options.get("reduction", "mean"), ignore_index=ignore_index,
                  label_smoothing=options.get("label_smoothing", 0.0))
    if chunked:
        kwargs["options"] = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    loss = TF.linear_cross_entropy(hidden, head, torch.tensor(labels), **kwargs)
    loss.backward()
    return loss.item(), hidden.grad.numpy().reshape(h.shape), head.grad.numpy()


TORCH_OPTIONS = [dict(), dict(weight="random"), dict(reduction="sum", label_smoothing=0.1),
                 dict(weight="random", label_smoothing=0.2, ignore_index=3)]


@pytest.mark.parametrize("options", TORCH_OPTIONS, ids=["plain", "weight", "sum_smoothing", "weight_smoothing_ig3"])
@pytest.mark.parametrize("chunked", [False, True], ids=["reference_path", "chunked"])
def test_against_torch_linear_cross_entropy(options, chunked):
    for mask in (("int",) if chunked else ("none",)):
        h, w, y, m, built, (outputs, d_hidden, d_weight) = check_case(
            dict(options, chunk_size=3, grad_mode="forward" if chunked else "recompute"), mask=mask, scale=3.0)
        value, torch_hidden, torch_weight = torch_linear(h, w, y, m, built, chunked)
        _, value_tols, (_, tol_h), (_, tol_w) = reference(h, w, y, m, built)
        assert_within(outputs[0], value, value_tols[0], f"torch {options} {mask}: loss")
        assert_within(d_hidden, torch_hidden, tol_h, f"torch {options} {mask}: d hidden")
        assert_within(d_weight, torch_weight, tol_w, f"torch {options} {mask}: d head_weight")


def test_against_torch_cross_entropy_float_mask_and_none():
    """Float masks and reduction='none' (torch's fused head has neither): F.cross_entropy on the float64
    logits, the mask applied to its per-token losses."""
    import torch
    import torch.nn.functional as TF

    for reduction in ("none", "mean"):
        options = dict(weight="random", reduction=reduction, label_smoothing=0.1, chunk_size=4)
        h, w, y, m, built, (outputs, d_hidden, d_weight) = check_case(options, mask="float", scale=3.0)
        dout = upstream_weights((ROWS,)) if reduction == "none" else None
        hidden = torch.tensor(h, dtype=torch.float64, requires_grad=True)
        head = torch.tensor(w, dtype=torch.float64, requires_grad=True)
        tokens = TF.cross_entropy(hidden @ head.T, torch.tensor(y.astype(np.int64)),
                                  weight=torch.tensor(built["weight"], dtype=torch.float64), reduction="none",
                                  label_smoothing=0.1) * torch.tensor(m.astype(np.float64))
        if reduction == "none":
            value = tokens
            (tokens * torch.tensor(dout, dtype=torch.float64)).sum().backward()
        else:
            kept = torch.tensor((y != -100).astype(np.float64))
            denominator = (torch.tensor(built["weight"][np.where(y == -100, 0, y)], dtype=torch.float64) * kept
                           * torch.tensor(m.astype(np.float64))).sum()
            value = tokens.sum() / denominator
            value.backward()
        _, value_tols, (_, tol_h), (_, tol_w) = reference(h, w, y, m, built, dout)
        assert_within(outputs[0], value.detach().numpy(), value_tols[0], f"torch CE {reduction}: loss")
        assert_within(d_hidden, hidden.grad.numpy(), tol_h, f"torch CE {reduction}: d hidden")
        assert_within(d_weight, head.grad.numpy(), tol_w, f"torch CE {reduction}: d head_weight")


# ---- equal to CrossEntropyLoss on the materialised logits ----

@pytest.mark.parametrize("options", [dict(), dict(weight="random", label_smoothing=0.1, reduction="sum"),
                                     dict(z_loss_weight=1e-3, logit_softcap=3.0, return_z_loss=True,
                                          calculate_per_token_loss=True)], ids=["plain", "weight_smoothing_sum",
                                                                                "zloss_softcap_per_token"])
@pytest.mark.parametrize("backend", ["fused", "composed"])
def test_equals_cross_entropy_loss_on_materialised_logits(options, backend):
    rng = np.random.default_rng(3)
    h, w, y, m = make_inputs(rng, scale=3.0, mask="float")
    if options.get("weight") == "random":
        options = dict(options, weight=class_weights(VOCAB))
    options = dict(options, backend=backend)
    fused = run_loss(LinearCrossEntropyLoss(**options, chunk_size=3), h, w, y, m)
    plain_loss = CrossEntropyLoss(**options)
    unfused = run_loss(lambda x, head, *rest: plain_loss(ops.matmul(x, head.T), *rest), h, w, y, m)
    _, value_tols, (_, tol_h), (_, tol_w) = reference(h, w, y, m, options)
    for i, (a, b) in enumerate(zip(fused[0], unfused[0])):
        assert_within(a, b, 0.0 if value_tols[i] is None else value_tols[i], f"output {i}",
                      rtol=1e-5 if value_tols[i] is None else 1e-6)
    assert len(fused[0]) == len(unfused[0])
    assert_within(fused[1], unfused[1], tol_h, "d hidden")
    assert_within(fused[2], unfused[2], tol_w, "d head_weight")


# ---- the functional form, the registry, the collective count ----

def test_functional_form_registry_and_collectives():
    rng = np.random.default_rng(4)
    h, w, y, m = make_inputs(rng, scale=3.0, mask="float")
    options = dict(z_loss_weight=1e-3, label_smoothing=0.1, chunk_size=4)
    out = mf_loss.linear_cross_entropy(Tensor(h), Tensor(w), Tensor(y), Tensor(m), **options)
    assert isinstance(out, mf_loss.functional.LossOutput)
    (ref_loss,), _, ref_z = numpy_cross_entropy(h.astype(np.float64) @ w.T.astype(np.float64), y, m,
                                                z_loss_weight=1e-3, label_smoothing=0.1)
    ref_denominator = np.where(y != -100, m, 0).sum()
    _, value_tols, _, _ = reference(h, w, y, m, options)
    assert_within(out.loss.asnumpy(), ref_loss, value_tols[0], "loss")
    assert_within(out.denominator.asnumpy(), ref_denominator, 0.0, "denominator")
    assert_within(out.z_loss.asnumpy(), ref_z, 0.0, "z_loss", rtol=1e-5)
    from mf_loss.registry import get_loss_class
    assert get_loss_class("LinearCrossEntropyLoss") is LinearCrossEntropyLoss
    for grad_mode in ("forward", "recompute"):
        assert LinearCrossEntropyLoss(grad_mode=grad_mode).collectives_per_call(100, 12) == \
            {"forward": 0, "backward": 0}


def test_auto_grad_mode_follows_the_weight_dtype():
    """"auto": forward for a float32 weight, recompute for a half-precision one on the fused backend, forward on
    the composed backend; recompute for reduction="none"."""
    fused_auto = LinearCrossEntropyLoss(backend="fused")
    assert not fused_auto.recomputes(ms.float32)
    assert fused_auto.recomputes(ms.bfloat16) and fused_auto.recomputes(ms.float16)
    assert not LinearCrossEntropyLoss(backend="fused", grad_mode="forward").recomputes(ms.bfloat16)
    assert LinearCrossEntropyLoss(backend="composed", reduction="none").recomputes(ms.float32)
    assert not LinearCrossEntropyLoss(backend="composed").recomputes(ms.bfloat16)
    assert LinearCrossEntropyLoss(backend="composed", grad_mode="recompute").recomputes(ms.float32)


# ---- errors ----

def test_out_of_range_labels_raise_in_pynative():
    rng = np.random.default_rng(5)
    h, w, y, m = make_inputs(rng, mask="none")
    for bad, grad_mode in ((VOCAB, "forward"), (-3, "recompute")):
        label = y.copy()
        label[4] = bad
        loss_fn = LinearCrossEntropyLoss(grad_mode=grad_mode, chunk_size=4)
        with pytest.raises(ValueError, match=rf"label\[4\] = {bad} is outside \[0, {VOCAB}\) and is not "
                                             r"ignore_index=-100"):
            loss_fn(Tensor(h), Tensor(w), Tensor(label))


def test_out_of_range_labels_are_nan_in_graph(graph_mode):
    rng = np.random.default_rng(5)
    h, w, y, m = make_inputs(rng, mask="int")
    y[4], m[4] = VOCAB + 2, 1
    for grad_mode, reduction in (("forward", "mean"), ("recompute", "sum")):
        value = LinearCrossEntropyLoss(grad_mode=grad_mode, reduction=reduction, chunk_size=4)(
            Tensor(h), Tensor(w), Tensor(y), Tensor(m))
        assert np.isnan(value.asnumpy()), (grad_mode, reduction, value)


ERRORS = [
    (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int (rows per chunk), got 0"),
    (dict(chunk_size=2.5), ValueError, "chunk_size must be None or a positive int (rows per chunk), got 2.5"),
    (dict(chunk_size=True), ValueError, "chunk_size must be None or a positive int (rows per chunk), got True"),
    (dict(grad_mode="fast"), ValueError, "grad_mode must be one of 'auto', 'forward', 'recompute', got 'fast'"),
    (dict(grad_mode="forward", reduction="none"), ValueError,
     "grad_mode='forward' needs a scalar loss (reduction 'mean' or 'sum', or calculate_per_token_loss); "
     "reduction='none' needs grad_mode='recompute' or 'auto'"),
    (dict(complete_hidden_grad="yes"), TypeError, "complete_hidden_grad must be a bool, got 'yes'"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be a float in [0, 1], got 1.5"),
    (dict(z_loss_weight=-1.0), ValueError, "z_loss_weight must be a float >= 0, got -1.0"),
    (dict(logit_softcap=0.0), ValueError, "logit_softcap must be None or a float > 0, got 0.0"),
    (dict(empty_mean="inf"), ValueError, "empty_mean must be one of"),
    (dict(seq_split_num=0), ValueError, "seq_split_num must be a positive int, got 0"),
    (dict(chunk_sise=4), TypeError, "LinearCrossEntropyLoss got an unknown argument 'chunk_sise'; did you mean "
                                    "'chunk_size'?"),
    (dict(weight=np.ones((2, 3))), ValueError, "weight must have shape (V,) for the whole vocabulary"),
    (dict(weight=-np.ones(VOCAB)), ValueError, "weight must be finite and >= 0"),
]


@pytest.mark.parametrize("options,error,message", ERRORS, ids=[str(sorted(o)) + str(i) for i, (o, _, _)
                                                                in enumerate(ERRORS)])
def test_bad_constructor_arguments(options, error, message):
    with pytest.raises(error) as raised:
        LinearCrossEntropyLoss(**options)
    assert message in str(raised.value), str(raised.value)


def _call_errors():
    h = np.zeros((4, HIDDEN), np.float32)
    w = np.zeros((VOCAB, HIDDEN), np.float32)
    y = np.zeros(4, np.int32)
    return [
        ("head_weight width", (h, np.zeros((VOCAB, HIDDEN + 1), np.float32), y, None), ValueError,
         f"head_weight must have shape (V/mp, H) = (V/mp, {HIDDEN}) to match hidden (4, {HIDDEN}), got "
         f"(12, {HIDDEN + 1})"),
        ("head_weight 1-D", (h, np.zeros(HIDDEN, np.float32), y, None), ValueError,
         "head_weight must have shape (V/mp, H)"),
        ("hidden 1-D", (np.zeros(HIDDEN, np.float32), w, y[:1], None), ValueError,
         "hidden must have shape (N, H) or (B, S, H), got (8,)"),
        ("hidden int", (h.astype(np.int32), w, y, None), TypeError, "hidden must be float32, float16 or bfloat16"),
        ("head_weight float64", (h, w.astype(np.float64), y, None), TypeError,
         "head_weight must be float32, float16 or bfloat16"),
        ("label rows", (h, w, np.zeros(5, np.int32), None), ValueError, "label must have shape (4,) to match hidden"),
        ("mask rows", (h, w, y, np.ones(3, np.int32)), ValueError, "input_mask must have shape"),
        ("probability targets", (h, w, np.full((4, VOCAB), 1.0 / VOCAB, np.float32), None), TypeError,
         "LinearCrossEntropyLoss takes integer class ids as label, got float"),
    ]


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_bad_call_arguments(mode):
    ms.set_context(mode=ms.PYNATIVE_MODE if mode == "pynative" else ms.GRAPH_MODE)
    for what, arrays, error, message in _call_errors():
        tensors = [None if a is None else Tensor(a) for a in arrays]
        loss_fn = LinearCrossEntropyLoss(chunk_size=2)
        with pytest.raises(error) as raised:
            loss_fn(*tensors[:3]) if tensors[3] is None else loss_fn(*tensors)
        assert message in str(raised.value), f"{mode} {what}: {raised.value}"


def test_class_weight_of_the_wrong_length_is_an_error():
    """weight has V entries for the whole vocabulary: one of another length must not pass silently."""
    rng = np.random.default_rng(6)
    h, w, y, m = make_inputs(rng, mask="none")
    loss_fn = LinearCrossEntropyLoss(weight=np.ones(VOCAB - 2, np.float32), chunk_size=4)
    with pytest.raises(ValueError, match="weight"):
        loss_fn(Tensor(h), Tensor(w), Tensor(y))


def test_nan_check_names_the_rank():
    rng = np.random.default_rng(8)
    h, w, y, m = make_inputs(rng, mask="int")
    y[2], m[2] = 1, 1
    for where in ("hidden", "head_weight"):
        hidden, head = h.copy(), w.copy()
        if where == "hidden":
            hidden[2, 0] = np.nan
        else:
            head[1, 0] = np.nan  # every row's logit of class 1
        for grad_mode in ("forward", "recompute"):
            loss_fn = LinearCrossEntropyLoss(check_for_nan_in_loss_and_grad=True, grad_mode=grad_mode, chunk_size=4)
            with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient on rank 0 \(dp 0, mp 0\): "):
                loss_fn(Tensor(hidden), Tensor(head), Tensor(y), Tensor(m))
    checked = LinearCrossEntropyLoss(check_for_nan_in_loss_and_grad=True, chunk_size=4)
    value = checked(Tensor(h), Tensor(w), Tensor(y), Tensor(m))  # finite inputs pass
    assert np.isfinite(value.asnumpy())


def test_value_and_grad_without_input_mask_in_pynative():
    rng = np.random.default_rng(9)
    h, w, y, _ = make_inputs(rng, mask="none")
    loss_fn = LinearCrossEntropyLoss(chunk_size=4)
    value, (d_hidden, d_weight) = ms.value_and_grad(loss_fn, grad_position=(0, 1))(Tensor(h), Tensor(w), Tensor(y))
    _, value_tols, (ref_h, tol_h), (ref_w, tol_w) = reference(h, w, y, None, {})
    (ref_value,), _, _ = numpy_cross_entropy(h.astype(np.float64) @ w.T.astype(np.float64), y, None)
    assert_within(value.asnumpy(), ref_value, value_tols[0], "loss")
    assert_within(d_hidden.asnumpy(), ref_h, tol_h, "d hidden")
    assert_within(d_weight.asnumpy(), ref_w, tol_w, "d head_weight")


# ---- a training step ----

class TinyFusedHeadModel(nn.Cell):
    """tokens' features -> tanh(x @ A) -> the fused head (W) and loss."""

    def __init__(self, a, w, **loss_options):
        super().__init__()
        self.a = Parameter(Tensor(a), name="a")
        self.head = Parameter(Tensor(w), name="head")
        self.loss = LinearCrossEntropyLoss(**loss_options)

    def construct(self, x, label, mask):
        return self.loss(ops.tanh(ops.matmul(x, self.a)), self.head, label, mask)


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_train_one_step_cell_descends_and_first_step_equals_numpy(grad_mode):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((ROWS, 6)).astype(np.float32)
    a = (rng.standard_normal((6, HIDDEN)) * 0.5).astype(np.float32)
    _, w, y, m = make_inputs(rng, scale=2.0, mask="float")
    lr = 0.5
    model = TinyFusedHeadModel(a, w, grad_mode=grad_mode, chunk_size=4, label_smoothing=0.1)
    step = nn.TrainOneStepCell(model, nn.SGD(model.trainable_params(), learning_rate=lr))
    step.set_train()
    inputs = (Tensor(x), Tensor(y), Tensor(m))
    losses = [float(step(*inputs).asnumpy())]
    # NumPy: the same forward and backward in float64
    pre = x.astype(np.float64) @ a.astype(np.float64)
    h = np.tanh(pre)
    (ref_loss,), grad, _ = numpy_cross_entropy(h @ w.T.astype(np.float64), y, m, label_smoothing=0.1)
    d_head = grad.T @ h
    d_a = x.astype(np.float64).T @ ((grad @ w.astype(np.float64)) * (1 - h ** 2))
    np.testing.assert_allclose(losses[0], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(model.head.asnumpy(), w - lr * d_head, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.a.asnumpy(), a - lr * d_a, rtol=1e-5, atol=1e-6)
    for _ in range(5):
        losses.append(float(step(*inputs).asnumpy()))
    assert losses[-1] < 0.9 * losses[0] and all(b < a_ for a_, b in zip(losses, losses[1:])), losses


# ---- property test ----

@st.composite
def linear_cases(draw):
    rows = draw(st.integers(1, 9))  # N = 0 is test_empty_batch_and_nothing_counted's
    hidden = draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 9))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    options = dict(
        chunk_size=draw(st.one_of(st.none(), st.integers(max(1, -(-rows // 3)), rows + 3))),  # at most 3 chunks
        reduction=reduction,
        backend=draw(st.sampled_from(["fused", "composed"])),
        grad_mode="recompute" if reduction == "none" else draw(st.sampled_from(["forward", "recompute", "auto"])),
        calculate_per_token_loss=reduction != "none" and draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        z_loss_weight=draw(st.sampled_from([0.0, 1e-2])),
        logit_softcap=draw(st.sampled_from([None, None, 2.0])),
        ignore_index=draw(st.sampled_from([-100, 0])),
        empty_mean=draw(st.sampled_from(["zero", "nan"])),
    )
    if draw(st.booleans()):
        options["weight"] = "random"
    return dict(rows=rows, hidden=hidden, vocab=vocab, options=options,
                scale=draw(st.sampled_from([0.01, 1.0, 10.0, 100.0])),
                mask=draw(st.sampled_from(["none", "int", "bool", "float"])), seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(linear_cases())
def test_property_random_shapes_chunks_scales_and_options(case):
    check_case(dict(case["options"]), leading=(case["rows"],), mask=case["mask"], scale=case["scale"],
               seed=case["seed"], hidden=case["hidden"], vocab=case["vocab"], what="property")
