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
from typing import Callable

import mindspore as ms
from mindspore import ops

from ..kernels.build import FusedKernelUnavailable
from . import chunking, shard_math

_auto_warned = False


@dataclass(frozen=True)
class Backend:
    """The two per-shard steps of one implementation (signatures of `shard_math`).

    `scratch_logits_grad` is the gradient of logits that nobody reads afterwards (the fused head's chunk
    logits), and `scale(total, factor)` multiplies a running total nobody else reads by a scalar tensor: both
    written over their first input where the backend can (fused), new tensors otherwise (composed).
    `chunks_logits`: whether `CrossEntropyLoss` goes through the logits' rows in chunks (the composed ops'
    temporaries are logits-sized; the fused kernels read each row once and need no chunks).

    The fused head's chunk loop (`shard_math.chunk_loop`): `head_operands(hidden, head_weight)` -> (what the
    chunks of hidden are taken from, the head weight as the products take it); `hidden_rows(source, start,
    stop)`, a chunk of hidden in float32; `chunk_logits(chunk, weight)`, its float32 logits; `first_sums(hidden,
    head_weight)` and `add_chunk_grads(hidden_sum, weight_sum, grad, chunk, weight, row_offset)`, the running
    sums of both gradients; `whole_hidden_grad(hidden_sum)`. `chunk_buffers`: the float32 chunk-sized buffers
    a chunk of either loop holds at once (what an automatic chunk size is planned for).

    The head's recomputing design (statistics in the forward, gradients in the backward):
    `head_row_stats(hidden, head_weight, target, spec, block)` -> this rank's (N, K) statistics and
    `head_grads(..., row_max, log_sum_exp, coefficients, block)` -> (hidden's gradient in float32, the weight's
    in its dtype), `block` their unit of work, `recompute_block(rows, width, local_vocab, chunk_size)`. Fused:
    kernels that go through the whole head a block of classes at a time (`mf_loss.ops.fused`); composed: the
    chunk loop's steps over chunks of rows for the statistics, and the chunk loop replayed in the backward.
    `auto_recomputes_half_weight`: whether grad_mode="auto" takes this design for a half-precision head weight
    (the fused kernels round each block of the weight gradient once and hold one block of logits: the leaner
    design there)."""

    name: str
    inplace: bool
    local_row_stats: Callable
    logits_grad: Callable
    scratch_logits_grad: Callable
    scale: Callable
    chunks_logits: bool
    chunk_buffers: int
    head_operands: Callable
    hidden_rows: Callable
    chunk_logits: Callable
    first_sums: Callable
    add_chunk_grads: Callable
    whole_hidden_grad: Callable
    head_row_stats: Callable
    head_grads: Callable
    recompute_block: Callable
    auto_recomputes_half_weight: bool


def _multiply(total, factor):
    return total * factor


def _chunked_head_row_stats(hidden, head_weight, target, spec, chunk: int):
    """The composed backend's `head_row_stats`: this rank's (N, K) row statistics of the logits
    `hidden @ head_weight^T`, made by the chunk loop's steps `chunk` rows at a time, each chunk sliced once the
    previous one's statistics exist. (The steps are reached through COMPOSED, as the replay in the backward
    reaches them: MindSpore 2.10 fails to compile a function with a branch that a forward calls by its name and
    its custom bprop through an object's attribute, "The func graph is empty".)"""
    source, weight = COMPOSED.head_operands(hidden, head_weight)
    shares = []
    previous = None
    for start, stop in chunking.chunk_bounds(hidden.shape[0], chunk):
        logits = COMPOSED.chunk_logits(COMPOSED.hidden_rows(shard_math.after(source, previous), start, stop), weight)
        previous = COMPOSED.local_row_stats(logits, target[start:stop], spec)
        shares.append(previous)
    return ops.concat(shares, 0)


def _replayed_head_grads(hidden, head_weight, target, spec, row_max, log_sum_exp, coefficients, chunk: int):
    """The composed backend's `head_grads`: the head's chunk loop (`shard_math.chunk_loop`) replayed `chunk` rows
    at a time with the statistics the forward saved and the per-row upstream gradient's coefficients; the weight
    gradient is one float32 (V/mp, H) sum, rounded once to the weight's dtype."""
    hidden_grad, weight_grad, _ = shard_math.chunk_loop(COMPOSED, hidden, head_weight, target, spec,
                                                        chunking.chunk_bounds(hidden.shape[0], chunk),
                                                        shard_math.replayed_chunk_stats,
                                                        (row_max, log_sum_exp, coefficients))
    return hidden_grad, shard_math.from_float32(weight_grad, head_weight.dtype)


COMPOSED = Backend(
    name="composed", inplace=False, local_row_stats=shard_math.local_row_stats, logits_grad=shard_math.logits_grad,
    scratch_logits_grad=shard_math.logits_grad, scale=_multiply, chunks_logits=True,
    chunk_buffers=shard_math.CHUNK_BUFFERS, head_operands=shard_math.head_operands,
    hidden_rows=shard_math.hidden_rows, chunk_logits=shard_math.chunk_logits, first_sums=shard_math.first_sums,
    add_chunk_grads=shard_math.add_chunk_grads, whole_hidden_grad=shard_math.whole_hidden_grad,
    head_row_stats=_chunked_head_row_stats, head_grads=_replayed_head_grads,
    recompute_block=shard_math.recompute_rows, auto_recomputes_half_weight=False)


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
    return Backend(
        name="fused", inplace=bool(inplace), local_row_stats=fused.local_row_stats,
        logits_grad=fused.logits_grad_inplace if inplace else fused.logits_grad,
        scratch_logits_grad=fused.logits_grad_inplace, scale=fused.scale, chunks_logits=False, chunk_buffers=1,
        head_operands=fused.head_operands, hidden_rows=fused.hidden_rows, chunk_logits=fused.chunk_logits,
        first_sums=fused.first_sums, add_chunk_grads=fused.add_chunk_grads, whole_hidden_grad=fused.whole_hidden_grad,
        head_row_stats=fused.head_row_stats, head_grads=fused.head_grads, recompute_block=chunking.class_block,
        auto_recomputes_half_weight=True)


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
