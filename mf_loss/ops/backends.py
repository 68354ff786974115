"""Which implementation of the two per-shard steps (row statistics, logits gradient) a loss uses.

Both backends expose `local_row_stats` and `logits_grad` with the signatures of `shard_math`; the
composed one is MindSpore ops (every device, what Ascend runs), the fused one is a one-pass C++ kernel
(CPU, `mf_loss.ops.fused`), compiled with the machine's C++ compiler on first use and cached.

- "composed": always the MindSpore-ops path.
- "fused": the C++ kernels; raises `FusedKernelUnavailable` (with the reason: no compiler, build
  error, ...) when they cannot be built, and ValueError when the device target is not CPU.
- "auto": fused when the device target is CPU and the kernels build, else composed (with a one-time
  warning saying why the fused kernels were skipped on CPU).

`inplace=True` (fused only) makes `logits_grad` write the gradient over the logits' own buffer and return
that tensor: the backward then allocates nothing logits-sized. The logits passed to the loss are destroyed
by the backward (they hold the gradient afterwards), so nothing may read them after the loss's backward:
not the caller after the step, and in GRAPH mode no other op of the same graph (an accuracy metric on the
logits, a second loss). It saves the gradient buffer when the logits are produced inside the
differentiated function (the lm-head matmul); when they are a direct input of a GRAPH-mode graph,
MindSpore copies the gradient output that aliases the input, so the saving is lost there (the result
stays right). When "auto" falls back to composed, the in-place request is dropped with the warning.
"""
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import mindspore as ms

from ..kernels.build import FusedKernelUnavailable
from . import shard_math

_auto_warned = False


@dataclass(frozen=True)
class Backend:
    """The two per-shard steps of one implementation (signatures of `shard_math`).

    `scratch_logits_grad` is the gradient of logits that nobody reads afterwards (the fused head's chunk
    logits), and `scale(total, factor)` multiplies a running total nobody else reads by a scalar tensor: both
    written over their first input where the backend can (fused), new tensors otherwise (composed).

    The fused head's steps, None where the backend has none (the head then casts a half-precision input to
    float32 whole and uses MindSpore's matmuls): `rows_float32(matrix, start, stop)`, a chunk of a
    half-precision hidden in float32; `zeros(like, float32=False)`, a fresh buffer for a running sum;
    `product_transposed(a, b)`, `a @ b^T` in float32 with b (the head weight) in any float dtype (a chunk's
    logits); `accumulate_product(total, a, b, row_offset)`, `total[row_offset:] += a @ b` in place (the hidden
    gradient); `accumulate_transposed_product(total, a, b, row_offset)`, `total[row_offset:] += a^T @ b` in
    place (the weight-gradient sum, a chunk at a time); the whole head at once, a vocabulary block at a time (the recomputing design): `head_row_stats(hidden, head_weight, target, weight, spec, block)` and
    `head_grads(..., row_max, log_sum_exp, coefficients, block)` (`mf_loss.ops.fused`)."""

    name: str
    local_row_stats: Callable
    logits_grad: Callable
    scratch_logits_grad: Callable
    scale: Callable
    inplace: bool = False
    head_kernels: bool = False   # whether the head steps below are there
    rows_float32: Optional[Callable] = None
    zeros: Optional[Callable] = None
    accumulate_transposed_product: Optional[Callable] = None
    product_transposed: Optional[Callable] = None
    accumulate_product: Optional[Callable] = None
    head_row_stats: Optional[Callable] = None
    head_grads: Optional[Callable] = None


def _multiply(total, factor):
    return total * factor


COMPOSED = Backend("composed", shard_math.local_row_stats, shard_math.logits_grad, shard_math.logits_grad,
                   _multiply)


def device_target() -> str:
    try:
        return str(ms.get_context("device_target"))
    except (ValueError, RuntimeError):
        return "CPU"


def _fused(inplace: bool) -> Backend:
    from . import fused  # imported lazily: nothing is compiled unless asked for
    target = device_target()
    if target != "CPU":
        raise ValueError(f"backend='fused' runs on CPU only, but the device target is {target}; use "
                         "backend='composed' (or 'auto')")
    fused.load()
    return Backend("fused", fused.local_row_stats, fused.logits_grad_inplace if inplace else fused.logits_grad,
                   fused.logits_grad_inplace, fused.scale, inplace=bool(inplace), head_kernels=True,
                   rows_float32=fused.rows_float32, zeros=fused.zeros,
                   accumulate_transposed_product=fused.accumulate_transposed_product,
                   product_transposed=fused.product_transposed, accumulate_product=fused.accumulate_product,
                   head_row_stats=fused.head_row_stats, head_grads=fused.head_grads)


def select(backend: str, inplace: bool = False) -> Backend:
    """The per-shard steps for `backend` ("auto", "fused" or "composed", checked by `mf_loss.options`); see the
    module docstring."""
    global _auto_warned
    if backend == "composed":
        return COMPOSED
    if backend == "fused":
        return _fused(inplace)
    if device_target() != "CPU":
        return COMPOSED
    try:
        return _fused(inplace)
    except FusedKernelUnavailable as err:
        if not _auto_warned:
            _auto_warned = True
            warnings.warn(f"mf_loss: the fused CPU kernels are unavailable, using the composed MindSpore-ops "
                          f"path instead (slower, more memory{'; inplace ignored' if inplace else ''}). "
                          f"Reason: {err}", RuntimeWarning, stacklevel=2)
        return COMPOSED
