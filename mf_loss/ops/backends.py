"""Which implementation of the two per-shard steps (row statistics, logits gradient) a loss uses.

Both backends expose `local_row_stats` and `logits_grad` with the signatures of `shard_math`; the
composed one is MindSpore ops (every device), the fused one is a one-pass C++ kernel (CPU,
`mf_loss.ops.fused`), compiled with the machine's C++ compiler on first use and cached.

- "composed": always the MindSpore-ops path.
- "fused": the C++ kernels; raises `FusedKernelUnavailable` (with the reason: no compiler, build
  error, ...) when they cannot be built, and ValueError when the device target is not CPU.
- "auto": fused when the device target is CPU and the kernels build, else composed (with a one-time
  warning saying why the fused kernels were skipped on CPU).

`inplace=True` (fused only; ignored with a warning when "auto" falls back to composed) makes
`logits_grad` write the gradient over the logits' own buffer and return that tensor: the backward then
allocates nothing logits-sized. The logits passed to the loss are destroyed by the backward (they hold
the gradient afterwards), so nothing may read them after the loss's backward: not the caller after the
step, and in GRAPH mode no other op of the same graph (an accuracy metric on the logits, a second loss).
It saves the gradient buffer when the logits are produced inside the differentiated function (the
lm-head matmul); when they are a direct input of a GRAPH-mode graph, MindSpore copies the gradient
output that aliases the input, so the saving is lost there (the result stays right).
"""
import warnings
from types import SimpleNamespace

import mindspore as ms

from . import shard_math

BACKENDS = ("auto", "fused", "composed")
_auto_warned = False


def device_target() -> str:
    try:
        return str(ms.get_context("device_target"))
    except (ValueError, RuntimeError):
        return "CPU"


def composed() -> SimpleNamespace:
    return SimpleNamespace(name="composed", local_row_stats=shard_math.local_row_stats,
                           logits_grad=shard_math.logits_grad, inplace=False)


def fused(inplace: bool = False) -> SimpleNamespace:
    from . import fused as kernels  # imported lazily: nothing is compiled unless asked for
    target = device_target()
    if target != "CPU":
        raise ValueError(f"backend='fused' runs on CPU only, but the device target is {target}; use "
                         "backend='composed' (or 'auto')")
    kernels.load()
    return SimpleNamespace(name="fused", local_row_stats=kernels.local_row_stats,
                           logits_grad=kernels.logits_grad_inplace if inplace else kernels.logits_grad,
                           inplace=bool(inplace))


def select(backend: str, inplace: bool = False) -> SimpleNamespace:
    """The per-shard kernels for `backend` ("auto", "fused" or "composed"); see the module docstring."""
    global _auto_warned
    if backend == "composed":
        if inplace:
            raise ValueError("inplace=True needs the fused backend (backend='fused' or 'auto' on CPU)")
        return composed()
    if backend == "fused":
        return fused(inplace)
    if backend == "auto":
        if device_target() != "CPU":
            return composed()
        from .fused import FusedKernelUnavailable
        try:
            return fused(inplace)
        except FusedKernelUnavailable as err:
            if not _auto_warned:
                _auto_warned = True
                warnings.warn(f"mf_loss: the fused CPU kernels are unavailable, using the composed MindSpore-ops "
                              f"path instead (slower, more memory{'; inplace ignored' if inplace else ''}). "
                              f"Reason: {err}", RuntimeWarning, stacklevel=2)
            return composed()
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
