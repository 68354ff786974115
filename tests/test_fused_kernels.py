"""The fused C++ kernels (mf_loss.ops.fused) against the composed MindSpore-ops path and float64 NumPy.

Tolerances. Both paths compute the formulas of `shard_math`'s docstring in float32. They are compared
with rtol=1e-6 and an atol scaled to the magnitude of the compared values (per statistics column, per
gradient array). Two measured facts about the composed path set the size of that atol:
- MindSpore's CPU `Exp` is a low-order approximation: relative error up to 3e-6 near 0, growing about
  1e-6 per unit of |x| (the fused exp is within about 1 ulp); its `ReduceSum` is a plain float32 sum.
  So sum_exp differs by ~1e-6 relative, and every gradient element by up to 3e-6 of its own value.
- MindSpore's CPU `Tanh` is off by up to 1e-4 for |x| in [3, 9] (2.5 ulp below 1): softcap tests
  keep |x / cap| < 1.
The fused path is also checked against a float64 NumPy evaluation of the same formulas, where it is an
order of magnitude closer than the composed one. Half-precision gradients are rounded to 11 (float16)
or 8 (bfloat16) bits: two float32 values that agree to 1e-6 can round to neighbouring half values, so
those are compared within one unit in the last place of their dtype.
"""
import concurrent.futures
import dataclasses
import warnings

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

import mf_loss
from mf_loss.kernels import build as kernel_build
from mf_loss.ops import backends, fused
from mf_loss.ops import shard_math as composed
from mf_loss.ops.shard_math import ShardSpec
from mf_loss.options import LossOptions

pytestmark = pytest.mark.kernel

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
HALF_ULP = {"float32": 0.0, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


@pytest.fixture(autouse=True)
def _no_kernel_build_in_working_dir(tmp_path):
    # conftest runs each test in tmp_path; the kernels must never be compiled into it.
    yield
    assert not (tmp_path / "custom_kernel_meta").exists()


@pytest.fixture(scope="module", autouse=True)
def _kernels_loaded():
    fused.load()


def as_f64(tensor):
    return tensor.astype(ms.float32).asnumpy().astype(np.float64)


# ---- inputs ----

def make_inputs(rows=37, vocab=300, *, dtype="float32", scale=3.0, shift=0.0, seed=0, target="index",
                weighted=False, vocab_start=0, total_vocab=None):
    """NumPy inputs of one rank's slice: logits (rows, vocab), labels over `total_vocab` global classes
    (some outside the slice), probabilities of the slice, class weights of the slice."""
    rng = np.random.default_rng(seed)
    total_vocab = total_vocab or vocab
    logits = (rng.standard_normal((rows, vocab)) * scale + shift).astype(np.float32)
    logits = Tensor(logits).astype(MS_DTYPES[dtype]).astype(ms.float32).asnumpy()  # exactly representable
    label = rng.integers(0, total_vocab, rows).astype(np.int32)
    probs = rng.dirichlet(np.full(vocab, 0.3), rows).astype(np.float32) if target == "probs" else None
    weight = rng.uniform(0.2, 2.0, vocab).astype(np.float32) if weighted else None
    return dict(logits=logits, label=label, probs=probs, weight=weight, vocab_start=vocab_start, dtype=dtype)


def shard_args(inp):
    """(logits, target, weight) tensors: target is the class ids, or the probabilities when there are any."""
    logits = Tensor(inp["logits"]).astype(MS_DTYPES[inp["dtype"]])
    target = Tensor(inp["label"]) if inp["probs"] is None else Tensor(inp["probs"])
    weight = None if inp["weight"] is None else Tensor(inp["weight"])
    return logits, target, weight


def shard_spec(inp, softcap, label_smoothing, weight):
    """The ShardSpec of the slice `inp` holds (its first class a multiple of its width: a rank's slice)."""
    width = inp["logits"].shape[-1]
    assert inp["vocab_start"] % width == 0
    return ShardSpec(inp["vocab_start"] // width, softcap, label_smoothing, weight)


def grad_coefficients(rows, label_smoothing, seed=1, dead_rows=3):
    """Per-row (a, b, q) like grad_coefficients makes them, some rows all zero (masked)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.1, 1.5, rows).astype(np.float32)
    b = (rng.uniform(0.0, 1e-3, rows) * (label_smoothing > 0)).astype(np.float32)
    q = rng.uniform(0.1, 1.0, rows).astype(np.float32)
    a[:dead_rows] = b[:dead_rows] = q[:dead_rows] = 0.0
    return a, b, q


# ---- float64 reference of the shard formulas (shard_math's docstring) ----

def reference_stats(inp, softcap, label_smoothing):
    x = inp["logits"].astype(np.float64)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    rows, vocab = x.shape
    w = np.ones(vocab) if inp["weight"] is None else inp["weight"].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        m = x.max(axis=1)
        m = np.where(m == -np.inf, 0.0, m)
        shifted = x - m[:, None]
        cols = [m, np.exp(shifted).sum(axis=1)]
        if inp["probs"] is None:
            local = inp["label"].astype(np.int64) - inp["vocab_start"]
            owned = (local >= 0) & (local < vocab)
            index = np.where(owned, local, 0)
            mass = np.where(owned, w[index], 0.0)
            cols += [np.where(owned, mass * shifted[np.arange(rows), index], 0.0), mass]
        else:
            wt = inp["probs"].astype(np.float64) * w
            cols += [(wt * shifted).sum(axis=1), wt.sum(axis=1)]
        if label_smoothing > 0:
            cols.append((shifted * w).sum(axis=1))
    return np.stack(cols, axis=-1)


def reference_grad(inp, softcap, row_max, lse, a, b, q, label_smoothing):
    raw = inp["logits"].astype(np.float64)
    x = raw if softcap is None else softcap * np.tanh(raw / softcap)
    rows, vocab = x.shape
    w = np.ones(vocab) if inp["weight"] is None else inp["weight"].astype(np.float64)
    g = np.exp(x - row_max[:, None] - lse[:, None]) * a[:, None]
    if label_smoothing > 0:
        g = g - b[:, None] * w
    if inp["probs"] is None:
        local = inp["label"].astype(np.int64) - inp["vocab_start"]
        owned = (local >= 0) & (local < vocab)
        g[np.flatnonzero(owned), local[owned]] -= (q * w[np.where(owned, local, 0)])[owned]
    else:
        g = g - q[:, None] * inp["probs"].astype(np.float64) * w
    if softcap is not None:
        g = g * (1 - (x / softcap) ** 2)
    live = (a != 0) | (b != 0) | (q != 0)
    return np.where(live[:, None], g, 0.0)


# ---- comparisons ----

def assert_stats_close(actual, expected, *, rtol, atol_factor, what):
    """Column by column: |actual - expected| <= rtol |expected| + atol_factor * max|expected column|."""
    for column in range(expected.shape[1]):
        e = expected[:, column]
        finite = np.isfinite(e)
        scale = np.abs(e[finite]).max() if finite.any() else 1.0
        np.testing.assert_allclose(actual[:, column], e, rtol=rtol, atol=atol_factor * max(scale, 1e-30),
                                   err_msg=f"{what}: statistics column {column}")


def assert_grad_close(actual, expected, *, dtype, rtol, atol_factor, what):
    scale = np.abs(expected[np.isfinite(expected)]).max(initial=1e-30)
    ulp = HALF_ULP[dtype]
    np.testing.assert_allclose(actual, expected, rtol=max(rtol, ulp), atol=max(atol_factor, ulp * 1e-3) * scale,
                               err_msg=what)


def run_both(inp, softcap=None, label_smoothing=0.0, *, coefficients=None):
    """(stats, grad) of the fused and the composed path on the same inputs; the gradient of both is taken
    at the composed statistics so that only the gradient kernels differ."""
    logits, target, weight = shard_args(inp)
    spec = shard_spec(inp, softcap, label_smoothing, weight)
    args = (logits, target, spec)
    stats_f = as_f64(fused.local_row_stats(*args))
    stats_c = as_f64(composed.local_row_stats(*args))
    rows = stats_c.shape[0]
    row_max = stats_c[:, 0].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.log(stats_c[:, 1]).astype(np.float32)
    a, b, q = coefficients if coefficients is not None else grad_coefficients(rows, label_smoothing)
    gargs = (logits, target, spec, Tensor(row_max), Tensor(lse), (Tensor(a), Tensor(b), Tensor(q)))
    grad_f_tensor = fused.logits_grad(*gargs)
    assert grad_f_tensor.dtype == logits.dtype and grad_f_tensor.shape == logits.shape
    grad_f = as_f64(grad_f_tensor)
    grad_c = as_f64(composed.logits_grad(*gargs))
    return dict(stats_f=stats_f, stats_c=stats_c, grad_f=grad_f, grad_c=grad_c, row_max=row_max, lse=lse, a=a, b=b,
                q=q)


# Composed-path error budget (see the module docstring): sum_exp and gradients carry MindSpore's exp.
COMPOSED_ATOL = 3e-6
REFERENCE_ATOL = 2e-7


def check_against_composed_and_reference(inp, softcap=None, label_smoothing=0.0, what=""):
    out = run_both(inp, softcap, label_smoothing)
    dtype = inp["dtype"]
    # MindSpore's Tanh (2.5 ulp) adds to its Exp's error: the composed gradient is then within 3.3e-6
    # (relative to its largest element) of float64, measured
    composed_atol = COMPOSED_ATOL * (2.0 if softcap is not None else 1.0)
    assert_stats_close(out["stats_f"], out["stats_c"], rtol=1e-6, atol_factor=composed_atol,
                       what=f"{what} fused vs composed")
    ref = reference_stats(inp, softcap, label_smoothing)
    cap_factor = 1.0 if softcap is None else 5.0  # float32 rounding of cap * tanh(x / cap) itself
    assert_stats_close(out["stats_f"], ref, rtol=1e-6, atol_factor=REFERENCE_ATOL * cap_factor,
                       what=f"{what} fused vs float64")
    assert_grad_close(out["grad_f"], out["grad_c"], dtype=dtype, rtol=1e-6, atol_factor=composed_atol,
                      what=f"{what} gradient fused vs composed")
    ref_grad = reference_grad(inp, softcap, out["row_max"].astype(np.float64), out["lse"].astype(np.float64),
                              out["a"], out["b"], out["q"], label_smoothing)
    assert_grad_close(out["grad_f"], ref_grad, dtype=dtype, rtol=1e-6, atol_factor=REFERENCE_ATOL * cap_factor,
                      what=f"{what} gradient fused vs float64")
    assert np.all(out["grad_f"][:3] == 0)  # rows with a = b = q = 0
    return out


OPTION_GRID = [
    dict(),
    dict(weighted=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.1, weighted=True),
    dict(softcap=20.0),
    dict(softcap=20.0, label_smoothing=0.05, weighted=True),
    dict(target="probs"),
    dict(target="probs", weighted=True, label_smoothing=0.1),
    dict(target="probs", softcap=20.0),
    dict(vocab_start=300, total_vocab=1200),  # a slice of a bigger vocabulary: most labels elsewhere
    dict(vocab_start=600, total_vocab=1200, weighted=True, label_smoothing=0.2),
]


def _option_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items()) or "plain"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("options", OPTION_GRID, ids=_option_id)
def test_shard_steps_match_composed_and_float64(options, dtype):
    options = dict(options)
    softcap = options.pop("softcap", None)
    label_smoothing = options.pop("label_smoothing", 0.0)
    inp = make_inputs(dtype=dtype, **options)
    check_against_composed_and_reference(inp, softcap, label_smoothing, what=f"{dtype} {options}")


def test_rows_not_divisible_by_threads(monkeypatch):
    monkeypatch.setenv("MF_LOSS_NUM_THREADS", "3")
    inp = make_inputs(rows=37, vocab=8192, weighted=True)  # 3 threads, 37 = 3 * 12 + 1 rows
    check_against_composed_and_reference(inp, None, 0.1, what="3 threads")
    monkeypatch.setenv("MF_LOSS_NUM_THREADS", "1")
    single = run_both(inp, None, 0.1)
    monkeypatch.setenv("MF_LOSS_NUM_THREADS", "3")
    threaded = run_both(inp, None, 0.1)
    np.testing.assert_array_equal(single["stats_f"], threaded["stats_f"])
    np.testing.assert_array_equal(single["grad_f"], threaded["grad_f"])


def test_long_rows_span_many_blocks():
    # rows longer than the kernel's block, with the maximum in a late block (the online re-basing)
    inp = make_inputs(rows=5, vocab=5000, dtype="float32")
    inp["logits"][:, 4100] += 12.0
    inp["logits"][1, 10] += 20.0
    check_against_composed_and_reference(inp, None, 0.1, what="long rows")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_single_class_slice(dtype):
    inp = make_inputs(rows=9, vocab=1, total_vocab=3, vocab_start=1, dtype=dtype)
    check_against_composed_and_reference(inp, None, 0.1, what="Vl=1")


@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_very_large_and_very_negative_logits(shift):
    inp = make_inputs(rows=16, vocab=400, scale=2.0, shift=shift)
    out = check_against_composed_and_reference(inp, None, 0.1, what=f"logits around {shift}")
    # re-based statistics keep their precision: the target logit relative to the max is exact
    x = inp["logits"].astype(np.float64)
    expected = x[np.arange(16), inp["label"]] - x.max(axis=1)
    np.testing.assert_allclose(out["stats_f"][:, 2], expected, rtol=0, atol=1e-9)


def test_rows_all_minus_inf_but_one_and_whole_minus_inf_rows():
    inp = make_inputs(rows=6, vocab=50, weighted=True)
    x = inp["logits"]
    x[:4] = -np.inf
    x[0, 7] = 2.5               # one finite class, the label
    inp["label"][0] = 7
    x[1, 3] = -1.0              # one finite class, label elsewhere (its logit is -inf)
    inp["label"][1] = 9
    inp["label"][2] = 4         # all -inf: re-based at 0, target -inf
    inp["label"][3] = 4         # all -inf and not alive: exact zero gradient
    a, b, q = grad_coefficients(6, 0.1, dead_rows=0)
    a[3] = b[3] = q[3] = 0.0
    out = run_both(inp, None, 0.1, coefficients=(a, b, q))
    np.testing.assert_array_equal(out["stats_f"][:, 0], out["stats_c"][:, 0])
    np.testing.assert_array_equal(out["stats_f"][2:4, :2], [[0.0, 0.0], [0.0, 0.0]])
    assert_stats_close(out["stats_f"], out["stats_c"], rtol=1e-6, atol_factor=COMPOSED_ATOL, what="-inf rows")
    finite_rows = slice(0, 2)
    assert_grad_close(out["grad_f"][finite_rows], out["grad_c"][finite_rows], dtype="float32", rtol=1e-6,
                      atol_factor=COMPOSED_ATOL, what="-inf rows gradient")
    assert np.all(out["grad_f"][3] == 0)


def test_nan_and_inf_propagate_and_dead_rows_stay_zero():
    inp = make_inputs(rows=6, vocab=40)
    x = inp["logits"]
    x[0, 5] = np.nan
    x[1, 9] = np.inf
    x[2, 0] = np.nan            # a masked row with a NaN: exact zeros
    a, b, q = grad_coefficients(6, 0.0, dead_rows=0)
    a[2] = b[2] = q[2] = 0.0
    out = run_both(inp, None, 0.0, coefficients=(a, b, q))
    lse_f = out["stats_f"][:, 0] + np.log(out["stats_f"][:, 1])
    lse_c = out["stats_c"][:, 0] + np.log(out["stats_c"][:, 1])
    np.testing.assert_array_equal(np.isfinite(lse_f), np.isfinite(lse_c))
    assert not np.isfinite(lse_f[:3]).any() and np.isfinite(lse_f[3:]).all()
    assert np.all(out["grad_f"][2] == 0)
    assert np.isnan(out["grad_f"][0]).all()
    np.testing.assert_allclose(out["stats_f"][3:], out["stats_c"][3:], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_contiguous_inputs(dtype):
    inp = make_inputs(rows=24, vocab=160, dtype=dtype, target="probs", weighted=True)
    base = Tensor(np.ascontiguousarray(inp["logits"].T)).astype(MS_DTYPES[dtype])
    transposed = base.T                                 # (rows, vocab) view, not contiguous
    wide = Tensor(np.concatenate([inp["logits"], inp["logits"]], axis=1)).astype(MS_DTYPES[dtype])
    sliced = wide[:, 160:]                              # column slice: row stride 320
    probs_wide = Tensor(np.concatenate([inp["probs"], inp["probs"]], axis=1))[:, :160]
    assert not transposed.is_contiguous() and not sliced.is_contiguous() and not probs_wide.is_contiguous()
    plain_logits, plain_probs, weight = shard_args(inp)
    spec = ShardSpec(0, None, 0.1, weight)
    coefficients = tuple(Tensor(c) for c in grad_coefficients(24, 0.1))
    row_stats = [Tensor(np.zeros(24, np.float32)), Tensor(np.full(24, 5.0, np.float32))]
    for logits, probs in [(transposed, plain_probs), (sliced, probs_wide)]:
        for impl in (fused, composed):
            got = impl.local_row_stats(logits, probs, spec).asnumpy()
            want = impl.local_row_stats(plain_logits, plain_probs, spec).asnumpy()
            np.testing.assert_array_equal(got, want)
            g = impl.logits_grad(logits, probs, spec, *row_stats, coefficients)
            g0 = impl.logits_grad(plain_logits, plain_probs, spec, *row_stats, coefficients)
            np.testing.assert_array_equal(as_f64(g), as_f64(g0))


def test_int64_labels_and_half_probability_targets():
    inp = make_inputs(rows=10, vocab=64, target="probs")
    logits, probs, _ = shard_args(inp)
    half_probs = probs.astype(ms.bfloat16)
    spec = ShardSpec()
    f = fused.local_row_stats(logits, half_probs, spec).asnumpy()
    c = composed.local_row_stats(logits, half_probs, spec).asnumpy()
    assert_stats_close(f.astype(np.float64), c.astype(np.float64), rtol=1e-6, atol_factor=COMPOSED_ATOL,
                       what="bf16 probs")
    label = Tensor(inp["label"].astype(np.int64))
    f = fused.local_row_stats(logits, label, spec).asnumpy()
    c = composed.local_row_stats(logits, label.astype(ms.int32), spec).asnumpy()
    assert_stats_close(f.astype(np.float64), c.astype(np.float64), rtol=1e-6, atol_factor=COMPOSED_ATOL,
                       what="int64 labels")


# ---- the whole loss: backend="fused" vs backend="composed" ----

LOSS_CASES = [
    ("plain", dict(), "index", "float32", (12, 96)),
    ("weight_smoothing_zloss", dict(weight="random", label_smoothing=0.1, z_loss_weight=1e-3), "index", "float32",
     (12, 96)),
    ("softcap_mask", dict(logit_softcap=15.0), "index", "float32", (3, 4, 96)),
    ("probs_weight_smoothing", dict(weight="random", label_smoothing=0.05), "probs", "float32", (12, 96)),
    ("bfloat16_zloss", dict(z_loss_weight=1e-2), "index", "bfloat16", (12, 96)),
    ("float16_per_token", dict(calculate_per_token_loss=True), "index", "float16", (12, 96)),
    ("none_reduction", dict(reduction="none", label_smoothing=0.1), "index", "float32", (12, 96)),
]


def loss_inputs(shape, target, dtype, seed=3):
    rng = np.random.default_rng(seed)
    vocab = shape[-1]
    logits = Tensor((rng.standard_normal(shape) * 3).astype(np.float32)).astype(MS_DTYPES[dtype])
    if target == "probs":
        label = Tensor(rng.dirichlet(np.ones(vocab), shape[:-1]).astype(np.float32))
    else:
        y = rng.integers(0, vocab, shape[:-1]).astype(np.int32)
        y.reshape(-1)[:2] = -100
        label = Tensor(y)
    mask = Tensor((rng.uniform(size=shape[:-1]) > 0.2).astype(np.float32))
    return logits, label, mask


def loss_values_and_grads(backend, options, inputs, mode):
    ms.set_context(mode=mode)
    options = dict(options)
    if options.get("weight") == "random":
        options["weight"] = np.random.default_rng(7).uniform(0.3, 2.0, inputs[0].shape[-1]).astype(np.float32)
    loss = mf_loss.CrossEntropyLoss(backend=backend, **options)
    assert loss.core.backend == backend

    def objective(logits, label, mask):
        out = loss(logits, label, mask)
        if isinstance(out, tuple):
            return out[0] / out[1]
        return out.sum() if out.ndim else out

    value, grad = ms.value_and_grad(objective, grad_position=0)(*inputs)
    return value.asnumpy().astype(np.float64), as_f64(grad)


# every case in PYNATIVE; a representative subset in GRAPH (each graph compiles for ~1 s)
GRAPH_SUBSET = ("weight_smoothing_zloss", "probs_weight_smoothing", "bfloat16_zloss")
LOSS_MODE_CASES = [pytest.param(*case, mode, id=f"{case[0]}-{mode_id}")
                   for mode, mode_id in ((ms.PYNATIVE_MODE, "pynative"), (ms.GRAPH_MODE, "graph"))
                   for case in LOSS_CASES if mode == ms.PYNATIVE_MODE or case[0] in GRAPH_SUBSET]


@pytest.mark.parametrize("name,options,target,dtype,shape,mode", LOSS_MODE_CASES)
def test_loss_fused_equals_composed(name, options, target, dtype, shape, mode):
    inputs = loss_inputs(shape, target, dtype)
    value_f, grad_f = loss_values_and_grads("fused", options, inputs, mode)
    value_c, grad_c = loss_values_and_grads("composed", options, inputs, mode)
    np.testing.assert_allclose(value_f, value_c, rtol=1e-6, atol=1e-6 * np.abs(value_c).max())
    assert_grad_close(grad_f, grad_c, dtype=dtype, rtol=1e-6, atol_factor=COMPOSED_ATOL, what=name)


def test_loss_under_jit_in_pynative():
    inputs = loss_inputs((12, 96), "index", "float32")
    loss = mf_loss.CrossEntropyLoss(backend="fused", label_smoothing=0.1)

    def objective(logits, label, mask):
        return loss(logits, label, mask)

    step = ms.jit(ms.value_and_grad(objective, grad_position=0))
    value, grad = step(*inputs)
    value_c, grad_c = loss_values_and_grads("composed", dict(label_smoothing=0.1), inputs, ms.PYNATIVE_MODE)
    np.testing.assert_allclose(value.asnumpy(), value_c, rtol=1e-6)
    assert_grad_close(as_f64(grad), grad_c, dtype="float32", rtol=1e-6, atol_factor=COMPOSED_ATOL, what="jit")


# ---- in-place backward ----

INPLACE_CASES = [c for c in LOSS_CASES if c[0] in ("weight_smoothing_zloss", "softcap_mask", "probs_weight_smoothing",
                                                     "bfloat16_zloss")]


@pytest.mark.parametrize("mode", ["pynative", "graph", "jit"])
@pytest.mark.parametrize("name,options,target,dtype,shape", INPLACE_CASES, ids=[c[0] for c in INPLACE_CASES])
def test_inplace_backward_option_matches_out_of_place(name, options, target, dtype, shape, mode):
    """CrossEntropyLoss(inplace_backward=True): the values and gradients of the out-of-place fused
    backward; 2-D logits hold the gradient afterwards, 3-D ones (reshaped inside the
    loss, so the kernel writes a private copy) are left intact."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    logits, label, mask = loss_inputs(shape, target, dtype)
    options = dict(options)
    if options.get("weight") == "random":
        options["weight"] = np.random.default_rng(7).uniform(0.3, 2.0, shape[-1]).astype(np.float32)
    results = {}
    for inplace in (False, True):
        loss = mf_loss.CrossEntropyLoss(backend="fused", inplace_backward=inplace, **options)
        assert loss.core.inplace is inplace

        def objective(x, y, m):
            return loss(x, y, m)

        step = ms.value_and_grad(objective, grad_position=0)
        if mode == "jit":
            step = ms.jit(step)
        own_logits = logits.copy()
        value, grad = step(own_logits, label, mask)
        results[inplace] = (value.asnumpy(), as_f64(grad), as_f64(own_logits))
    (value, grad, after), (value_ref, grad_ref, after_ref) = results[True], results[False]
    # The kernels are the same code, but not bit for bit the same run: MindSpore's PYNATIVE CPU `Log`
    # switches implementation after a few calls of the same shape (1 ulp apart), which moves lse by 1 ulp.
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-6 * np.abs(grad_ref).max())
    np.testing.assert_array_equal(after_ref, as_f64(logits))  # out of place never touches the logits
    np.testing.assert_array_equal(after, grad if len(shape) == 2 else as_f64(logits))


def test_inplace_backward_errors():
    with pytest.raises(ValueError, match="inplace_backward=True needs the fused kernels.*got backend='composed'"):
        mf_loss.CrossEntropyLoss(backend="composed", inplace_backward=True)
    with pytest.raises(TypeError, match="inplace_backward must be a bool, got 'yes'"):
        mf_loss.CrossEntropyLoss(inplace_backward="yes")
    assert mf_loss.CrossEntropyLoss(backend="auto", inplace_backward=True).core.inplace


def test_inplace_kernel_overwrites_plain_logits_and_never_loses_a_view():
    inp = make_inputs(rows=12, vocab=80, weighted=True)
    _, label, weight = shard_args(inp)
    spec = ShardSpec(0, None, 0.1, weight)
    stats = composed.local_row_stats(Tensor(inp["logits"]), label, spec).asnumpy()
    rest = (Tensor(stats[:, 0]), Tensor(np.log(stats[:, 1])), tuple(Tensor(c) for c in grad_coefficients(12, 0.1)))
    expected = fused.logits_grad(Tensor(inp["logits"]), label, spec, *rest).asnumpy()
    logits = Tensor(inp["logits"].copy())                        # a plain tensor: written in place
    grad = fused.logits_grad_inplace(logits, label, spec, *rest)
    assert grad.data_ptr() == logits.data_ptr()
    np.testing.assert_array_equal(grad.asnumpy(), expected)
    np.testing.assert_array_equal(logits.asnumpy(), expected)
    base = Tensor(np.concatenate([inp["logits"], inp["logits"]]))  # a view: MindSpore gives the kernel a copy
    view = base[12:]
    grad = fused.logits_grad_inplace(view, label, spec, *rest)
    np.testing.assert_array_equal(grad.asnumpy(), expected)
    transposed = Tensor(np.ascontiguousarray(inp["logits"].T)).T  # non-contiguous: made contiguous first
    grad = fused.logits_grad_inplace(transposed, label, spec, *rest)
    np.testing.assert_array_equal(grad.asnumpy(), expected)


# ---- backend selection, build and cache ----

def test_select_names_and_errors():
    assert backends.select("composed").name == "composed"
    assert backends.select("composed").local_row_stats is composed.local_row_stats
    chosen = backends.select("fused")
    assert chosen.name == "fused" and chosen.local_row_stats is fused.local_row_stats
    assert chosen.logits_grad is fused.logits_grad and not chosen.inplace
    assert backends.select("auto").name == "fused"  # CPU and a compiler here
    # the choice is checked once, by the options the cells build (mf_loss.options), not again by select
    with pytest.raises(ValueError, match="backend must be one of"):
        LossOptions(backend="fast")
    with pytest.raises(ValueError, match="inplace_backward=True needs the fused kernels"):
        LossOptions(backend="composed", inplace_backward=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        chosen.name = "composed"


def test_no_compiler_auto_falls_back_and_fused_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(backends, "_auto_warned", False)
    monkeypatch.setenv("MF_LOSS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-mf-loss")
    with pytest.raises(fused.FusedKernelUnavailable, match="needs a C\\+\\+ compiler .*backend='composed'"):
        backends.select("fused")
    with pytest.warns(RuntimeWarning, match="fused CPU kernels are unavailable"):
        assert backends.select("auto").name == "composed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("auto").name == "composed"  # the warning is given once
    with pytest.raises(fused.FusedKernelUnavailable):
        mf_loss.CrossEntropyLoss(backend="fused")
