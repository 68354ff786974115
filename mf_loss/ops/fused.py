"""The fused CPU kernels as MindSpore operators (`ops.Custom(func_type="aot")`), with shard_math's signatures.

`local_row_stats` and `logits_grad` compute what `shard_math`'s functions of the same name compute (its
module docstring defines them); each is ONE C++ kernel (`mf_loss/kernels/row_kernels.cc`, built by
`mf_loss.kernels.build`) that reads the logits once, in their own dtype (float32, float16 or bfloat16, no
float32 copy), does the maths in float32 with double-precision sums, runs its rows on several threads, and
(backward) writes the gradient once in the logits' dtype.

Threads: all CPUs of the process's affinity mask, or `$MF_LOSS_NUM_THREADS`. Instruction set: see
`mf_loss.kernels.build.isa_flags` (the results do not depend on it).

Accuracy: the kernel's exp and tanh are within 1-2 ulp of the exact functions (probabilities below
FLT_MIN, exp(x) for x < -87.3, are flushed to 0, as MindSpore's Exp does) and its sums are taken in
double; MindSpore's CPU `Exp` is within about 3e-6 (relative, near 0; growing about 1e-6 per unit of |x|)
(the composed softcap makes tanh from `Expm1`: MindSpore's CPU `Tanh` is off by 1e-4 for |x| in [3, 9]), so
the composed path, not this one, sets the size of the differences between the two
(tests/test_fused_kernels.py measures both against float64).

bfloat16 and float16 logits are passed to the kernels as they are (ops.Custom aot accepts them on CPU),
converted in registers, and the gradient is rounded back to nearest-even exactly as MindSpore's Cast does.
`logits_grad_inplace` is the opt-in in-place backward (see `backends.select(..., inplace=True)`).
"""
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from ..kernels.build import FusedKernelUnavailable, build
from .modes import run_in_jit
from .shard_math import ShardSpec, is_probability_target

__all__ = ["FusedKernelUnavailable", "FusedKernels", "accumulate_product", "accumulate_transposed_product",
           "add_chunk_grads", "chunk_logits", "first_sums", "head_grads", "head_operands", "head_row_stats",
           "hidden_rows", "load", "local_row_stats", "logits_grad", "logits_grad_inplace", "product_transposed",
           "rows_float32", "scale", "whole_hidden_grad", "zeros"]

_cast = ops.Cast()
_depend = ops.Depend()


def _stats_shape_4(logits_shape, *other_shapes):
    return (logits_shape[0], 4)


def _stats_shape_5(logits_shape, *other_shapes):
    return (logits_shape[0], 5)


def _float32(*dtypes):
    return ms.float32


def _int64(*dtypes):
    return ms.int64


def _same_as_logits(first, *others):
    return first


def _token_shape(*shapes):
    return (1,)


def _rows_shape(matrix_shape, row_ids_shape):
    return (row_ids_shape[0], matrix_shape[1])


def _head_grads_shapes(hidden_shape, weight_shape, *others):
    return hidden_shape, weight_shape


def _head_grads_dtypes(hidden_dtype, weight_dtype, *others):
    return ms.float32, weight_dtype


def _product_transposed_shape(a_shape, b_shape):
    return (a_shape[0], b_shape[0])


@dataclass(frozen=True)
class FusedKernels:
    """The loaded library and its operators (one per entry point of the C++ source)."""

    library: Path
    row_stats_4: ops.Custom       # (N, 4) statistics
    row_stats_5: ops.Custom       # (N, 5) statistics (label smoothing)
    grad: ops.Custom              # gradient into a new tensor
    grad_inplace: ops.Custom      # gradient over the logits; returns a (1,) int64 token (the address written)
    scale: ops.Custom             # total *= factor over total; returns the same kind of token
    rows_float32: ops.Custom      # matrix[row_ids] in float32
    zeros: ops.Custom             # a fresh zero buffer shaped and typed like its input
    zeros_float32: ops.Custom     # a fresh float32 zero buffer shaped like its input
    transposed_product: ops.Custom  # total[offset:] += a^T @ b over total (OpenBLAS sgemm); the same kind of token
    product_transposed: ops.Custom  # a @ b^T in float32, b of any float dtype (OpenBLAS sgemm)
    accumulate_product: ops.Custom  # total[offset:] += a @ b over total, b of any float dtype; a token
    head_row_stats_4: ops.Custom    # the fused head's (N, 4) statistics from hidden and the head weight
    head_row_stats_5: ops.Custom    # the same, (N, 5)
    head_grads: ops.Custom          # both gradients of the fused head (two outputs)


_lock = threading.Lock()
_kernels = None


def load() -> FusedKernels:
    """Build (once per machine) and load the kernels; raises FusedKernelUnavailable when impossible."""
    global _kernels
    with _lock:
        if _kernels is None:
            library = build()

            def custom(entry, out_shape, out_dtype):
                return ops.Custom(f"{library}:{entry}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")

            try:
                _kernels = FusedKernels(library=library,
                                        row_stats_4=custom("mf_row_stats4", _stats_shape_4, _float32),
                                        row_stats_5=custom("mf_row_stats5", _stats_shape_5, _float32),
                                        grad=custom("mf_logits_grad", _same_as_logits, _same_as_logits),
                                        grad_inplace=custom("mf_logits_grad_inplace", _token_shape, _int64),
                                        scale=custom("mf_scale_inplace", _token_shape, _int64),
                                        rows_float32=custom("mf_rows_float32", _rows_shape, _float32),
                                        zeros=custom("mf_zeros", _same_as_logits, _same_as_logits),
                                        zeros_float32=custom("mf_zeros_float32", _same_as_logits, _float32),
                                        transposed_product=custom("mf_accumulate_transposed_product",
                                                                  _token_shape, _int64),
                                        product_transposed=custom("mf_product_transposed",
                                                                  _product_transposed_shape, _float32),
                                        accumulate_product=custom("mf_accumulate_product", _token_shape, _int64),
                                        head_row_stats_4=custom("mf_head_row_stats4", _stats_shape_4, _float32),
                                        head_row_stats_5=custom("mf_head_row_stats5", _stats_shape_5, _float32),
                                        head_grads=custom("mf_head_grads", _head_grads_shapes, _head_grads_dtypes))
            except (TypeError, ValueError, RuntimeError) as err:
                # e.g. $MS_CUSTOM_AOT_WHITE_LIST set to a directory that does not hold the cache
                raise FusedKernelUnavailable(
                    f"MindSpore refused the fused kernel library {library}: {err}. If "
                    "$MS_CUSTOM_AOT_WHITE_LIST is set, point $MF_LOSS_CACHE_DIR inside it") from err
    return _kernels


# ---- the two per-shard steps (signatures of shard_math) ----
# Plain functions, as in shard_math: MindSpore parses them into GRAPH-mode graphs (custom bprops included)
# and runs them eagerly in PYNATIVE.

def _kernel_target(target, vocab_start: int):
    """Class ids in this slice's index space (the kernels' view), or the slice's target probabilities."""
    if is_probability_target(target):
        return target
    local = _cast(target, ms.int32)
    if vocab_start != 0:
        local = local - vocab_start
    return local


def _kernel_inputs(first, target, spec: ShardSpec, local_vocab: int):
    """The leading inputs every kernel takes: `first` (the logits, or the head weight), target, and this slice's
    per-class arrays when there are any (the class weights)."""
    local_target = _kernel_target(target, spec.vocab_start(local_vocab))
    return (first, local_target) if spec.weight is None else (first, local_target, spec.weight)


def _config(spec: ShardSpec):
    return Tensor([0.0 if spec.logit_softcap is None else spec.logit_softcap,
                   1.0 if spec.label_smoothing > 0 else 0.0], ms.float32)


def local_row_stats(logits, target, spec: ShardSpec):
    """This rank's (N, K) row statistics; see `shard_math.local_row_stats`."""
    kernel = _kernels.row_stats_5 if spec.label_smoothing > 0 else _kernels.row_stats_4
    return kernel(*_kernel_inputs(logits, target, spec, logits.shape[-1]), _config(spec))


def _run_grad(kernel, logits, target, spec: ShardSpec, row_max, log_sum_exp, coefficients):
    a, b, q = coefficients
    return kernel(*_kernel_inputs(logits, target, spec, logits.shape[-1]), row_max, log_sum_exp, a, b, q,
                  _config(spec))


def logits_grad(logits, target, spec: ShardSpec, row_max, log_sum_exp, coefficients):
    """Gradient w.r.t. this rank's logits slice (N, Vl) in the logits' dtype; see `shard_math.logits_grad`."""
    return _run_grad(_kernels.grad, logits, target, spec, row_max, log_sum_exp, coefficients)


def _written_in_place(target, token) -> bool:
    """Whether the kernel wrote `target`'s own buffer. Always in GRAPH mode / ms.jit, where `target` is then
    ordered after the kernel by the caller's Depend; in PYNATIVE MindSpore hands a view (a reshape, a slice)
    to a kernel as a private copy, so the kernel reports the address it wrote."""
    if run_in_jit() or ms.get_context("mode") == ms.GRAPH_MODE:  # @jit.cond: True
        return True
    return int(token.asnumpy()[0]) == target.data_ptr()


def _int64_input(value: int):
    """A kernel's (1,) int64 input: the first row of a running sum that a product is added to, a block size."""
    return ops.fill(ms.int64, (1,), value)


def _written_over(total, token):
    """`total` once its kernel has written it in place (a running sum: always a fresh `zeros` buffer or one
    a kernel returned, never a view, so PYNATIVE never hands it over as a copy)."""
    if _written_in_place(total, token):
        return _depend(total, token)
    raise RuntimeError("mf_loss: a running sum was handed to its kernel as a copy")  # pragma: no cover


def accumulate_transposed_product(total, a, b, row_offset: int = 0):
    """`total` with `a^T @ b` added to its rows from `row_offset` on (a (n, Vt), b (n, H) float32; total (V, H)
    float32, float16 or bfloat16, contiguous, not read by anything else afterwards), written over `total`: the
    fused head's running weight gradient, to which each chunk adds its share inside sgemm instead of making
    the (Vt, H) share and adding it."""
    return _written_over(total, _kernels.transposed_product(total, a, b, _int64_input(row_offset)))


def product_transposed(a, b):
    """`a @ b^T` in float32 (a (n, H) float32, b (V, H) float32, float16 or bfloat16): the fused head's chunk
    logits from a half-precision head weight as it is, converted to float32 a block at a time inside the
    kernel (MindSpore's CPU matmul takes no bfloat16, and a float32 copy of the weight is what this avoids)."""
    return _kernels.product_transposed(a, b)


def accumulate_product(total, a, b, row_offset: int = 0):
    """`total` (N, H) float32 with `a @ b` added to its rows from `row_offset` on (a (n, V) float32, b (V, H)
    float32, float16 or bfloat16), written over `total` inside sgemm: the fused head's hidden gradient, to
    which each chunk adds its part without a (n, H) part or a float32 copy of a half-precision weight."""
    return _written_over(total, _kernels.accumulate_product(total, a, b, _int64_input(row_offset)))


def _head_inputs(hidden, head_weight, target, spec: ShardSpec):
    """The head kernels' leading inputs: hidden, then what the per-shard kernels take with the head weight in
    the logits' place."""
    return (hidden,) + _kernel_inputs(head_weight, target, spec, head_weight.shape[0])


def head_row_stats(hidden, head_weight, target, spec: ShardSpec, block: int):
    """This rank's (N, K) row statistics of the logits `hidden @ head_weight^T` (`local_row_stats` of them),
    made `block` classes at a time for all rows without the logits: hidden (N, H) and head_weight (V/mp, H) of
    any float dtype, target (N,) class ids (kernel source, "the fused head whole")."""
    kernel = _kernels.head_row_stats_5 if spec.label_smoothing > 0 else _kernels.head_row_stats_4
    return kernel(*_head_inputs(hidden, head_weight, target, spec), _config(spec), _int64_input(block))


def head_grads(hidden, head_weight, target, spec: ShardSpec, row_max, log_sum_exp, coefficients, block: int):
    """(hidden's gradient (N, H) float32, head_weight's (V/mp, H) in its dtype) through the logits gradient that
    `logits_grad` would give, made `block` classes at a time without the logits: each block's rows of the
    weight gradient are complete in one product over all rows, rounded once."""
    a, b, q = coefficients
    return _kernels.head_grads(*_head_inputs(hidden, head_weight, target, spec), row_max, log_sum_exp, a, b, q,
                               _config(spec), _int64_input(block))


def scale(total, factor):
    """`total * factor` (factor a float32 scalar tensor), written over `total` (float32, float16 or
    bfloat16, contiguous, not read by anything else afterwards)."""
    token = _kernels.scale(total, factor.reshape(1))
    if _written_in_place(total, token):
        return _depend(total, token)
    return total * factor  # pragma: no cover - a fresh buffer is never handed over as a copy


def rows_float32(matrix, start: int, stop: int):
    """`matrix[start:stop]` in float32 (matrix (N, H) float32, float16 or bfloat16; the fused head's chunk of a
    half-precision hidden): MindSpore's CPU slicing takes no bfloat16 in GRAPH mode, and a float32 copy of the
    whole matrix is what this avoids."""
    return _kernels.rows_float32(matrix, Tensor(np.arange(start, stop, dtype=np.int64)))


def zeros(like, float32: bool = False):
    """A fresh zero tensor shaped like `like`, of its dtype (or float32), to be written in place (a constant
    would be shared)."""
    return _kernels.zeros_float32(like) if float32 else _kernels.zeros(like)


def logits_grad_inplace(logits, target, spec: ShardSpec, row_max, log_sum_exp, coefficients):
    """`logits_grad` written over the logits' own buffer; returns the tensor that holds the gradient.

    The logits are destroyed (they hold the gradient afterwards). GRAPH mode / ms.jit: the gradient is
    the logits' graph value, ordered after the kernel by a Depend. PYNATIVE: MindSpore hands a view (a
    reshape, a slice) to a kernel as a private copy, so the kernel reports the address it wrote; when that
    is not the logits' own, the logits are intact and the gradient is computed out of place instead
    (correct, without the saving: pass 2-D logits that are not a view to get it). A non-contiguous view
    is first made contiguous (a copy, written over instead).
    """
    logits = logits.contiguous()
    token = _run_grad(_kernels.grad_inplace, logits, target, spec, row_max, log_sum_exp, coefficients)
    if _written_in_place(logits, token):
        return _depend(logits, token)
    return logits_grad(logits, target, spec, row_max, log_sum_exp, coefficients)


# ---- the fused head's steps (the chunk loop's; shard_math has the composed backend's) ----

def head_operands(hidden, head_weight):
    """(what the chunks of hidden are taken from, the head weight as the products take it): both as they are,
    any float dtype (the kernels convert blocks of them: a float32 copy of a half-precision hidden is (N, H)
    float32 beside it)."""
    return hidden, head_weight


def hidden_rows(source, start: int, stop: int):
    """Rows [start, stop) of hidden in float32 (GRAPH mode on CPU slices no half-precision tensor)."""
    if source.dtype == ms.float32:
        return source[start:stop]
    return rows_float32(source, start, stop)


def chunk_logits(chunk, weight):
    return product_transposed(chunk, weight)


def first_sums(hidden, head_weight):
    """The running sums of (hidden's, head_weight's) gradient before any chunk: fresh float32 zero buffers that
    each chunk's part is added into in place, inside the sgemm that makes it (no (N, H) concatenation beside
    the parts; no (V/mp, H) share written out and read back)."""
    return (zeros(hidden, True),), (zeros(head_weight, True),)


def add_chunk_grads(hidden_sum, weight_sum, grad, chunk, weight, row_offset: int):
    """The running sums with the chunk's parts added in place: `grad @ weight` to hidden's rows from
    `row_offset` on, `grad^T @ chunk` to the weight's (grad: the chunk's logits gradient)."""
    return ((accumulate_product(hidden_sum[0], grad, weight, row_offset),),
            (accumulate_transposed_product(weight_sum[0], grad, chunk, 0),))


def whole_hidden_grad(hidden_sum):
    return hidden_sum[0]
