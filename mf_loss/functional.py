"""The functional core: the steps every loss call is made of, and one-call functional forms.

A call is: validate the shapes (`check_logits_call`, `check_linear_call`) -> count the tokens
(`count_tokens`) -> a vocab-parallel core gives per-token losses (`nn.vocab_parallel`,
`nn.linear_vocab_parallel`) -> the diagnostics record -> `reduce_tokens`. `CrossEntropyLoss` and
`LinearCrossEntropyLoss` are thin cells holding the options, a core and these steps, standing on this module
(which imports no cell); `nn.one_call` has the one-call forms returning a named `LossOutput`.

The validation functions are plain Python on shapes and dtypes: MindSpore runs them at compile time in
GRAPH mode, so they raise there too.
"""
from typing import NamedTuple

import mindspore as ms
from mindspore import Tensor, ops

_select = ops.Select()
_zeros_like = ops.ZerosLike()
_cast = ops.Cast()

FLOAT_DTYPES = (ms.float32, ms.float16, ms.bfloat16)
INT_DTYPES = (ms.int32, ms.int64, ms.int16, ms.int8, ms.uint8)


class LossOutput(NamedTuple):
    """What the one-call forms return."""

    loss: Tensor         # "mean"/"sum": scalar; "none": per token (the input's leading shape)
    denominator: Tensor  # sum over the counted tokens of w[y] * mask: what "mean" divides by
    z_loss: Tensor       # the z-loss term alone, reduced like `loss` (no gradient)


# ---- validation ----

def _rows(leading_shape) -> int:
    rows = 1
    for size in leading_shape:
        rows *= size
    return rows


def _check_label_and_mask(leading_shape, label_shape, label_dtype, mask_shape, logits_name):
    rows = _rows(leading_shape)
    if label_dtype not in INT_DTYPES:
        raise TypeError(f"label must be integer class ids or float probabilities, got {label_dtype}")
    if tuple(label_shape) not in (tuple(leading_shape), (rows,)):
        expected = f"{tuple(leading_shape)}" if len(leading_shape) == 1 else f"{tuple(leading_shape)} or ({rows},)"
        raise ValueError(f"label must have shape {expected} to match {logits_name}, got {label_shape}")
    if mask_shape is not None:
        allowed = ((tuple(leading_shape), (rows, 1)) if len(leading_shape) == 1 else
                   (tuple(leading_shape), (rows,), (rows, 1)))
        if tuple(mask_shape) not in allowed:
            raise ValueError(f"input_mask must have shape {' or '.join(map(str, allowed))} to match {logits_name}, "
                             f"got {mask_shape}")


def check_logits_call(logits_shape, logits_dtype, label_shape, label_dtype, mask_shape) -> bool:
    """Validate one `CrossEntropyLoss` call; returns True when `label` holds probability targets."""
    if logits_dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits_dtype}")
    if len(logits_shape) not in (2, 3):
        raise ValueError(f"logits must have shape (N, V/mp) or (B, S, V/mp), got {logits_shape}")
    if label_dtype in FLOAT_DTYPES:
        if tuple(label_shape) != tuple(logits_shape):
            raise ValueError(f"float label is read as probability targets and must have the logits' shape "
                             f"{logits_shape} (each rank its vocabulary slice), got {label_shape}; class "
                             "ids must be an integer tensor")
        if mask_shape is not None:
            _check_label_and_mask(logits_shape[:-1], logits_shape[:-1], ms.int32, mask_shape, f"logits {logits_shape}")
        return True
    _check_label_and_mask(logits_shape[:-1], label_shape, label_dtype, mask_shape, f"logits {logits_shape}")
    return False


def check_linear_call(hidden_shape, hidden_dtype, weight_shape, weight_dtype, label_shape, label_dtype, mask_shape):
    """Validate one `LinearCrossEntropyLoss` call."""
    if hidden_dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden_dtype}")
    if weight_dtype not in FLOAT_DTYPES:
        raise TypeError(f"head_weight must be float32, float16 or bfloat16, got {weight_dtype}")
    if len(hidden_shape) not in (2, 3):
        raise ValueError(f"hidden must have shape (N, H) or (B, S, H), got {hidden_shape}")
    if len(weight_shape) != 2 or weight_shape[1] != hidden_shape[-1]:
        raise ValueError(f"head_weight must have shape (V/mp, H) = (V/mp, {hidden_shape[-1]}) to match hidden "
                         f"{hidden_shape}, got {weight_shape}")
    if label_dtype in FLOAT_DTYPES:
        raise TypeError("LinearCrossEntropyLoss takes integer class ids as label, got float "
                        f"{label_shape}: probability targets are (N, V) themselves, the size the fused head "
                        "avoids; use CrossEntropyLoss on the logits for them")
    _check_label_and_mask(hidden_shape[:-1], label_shape, label_dtype, mask_shape, f"hidden {hidden_shape}")


# ---- the steps ----

def count_tokens(input_mask, rows: int):
    """(mask (N,) float32, counted (N,) bool): which tokens count, and their weights."""
    mask = ops.ones((rows,), ms.float32) if input_mask is None else _cast(input_mask.reshape(-1), ms.float32)
    return mask, mask != 0


def out_of_range_nan(values, outside):
    """`values` with NaN where `outside`: a label outside [0, V) must never pass silently."""
    return _select(outside, ops.fill(ms.float32, values.shape, float("nan")), values)


def z_loss_tokens(row_max, log_sum_exp, counted, mask, z_loss_weight: float):
    """The z-loss term of each counted token, weighted by its mask (no gradient)."""
    lse = ops.stop_gradient(row_max + log_sum_exp)
    return _select(counted, z_loss_weight * lse * lse * mask, _zeros_like(lse))


def safe_denominator(denominator):
    """(denominator > 0, the denominator or 1): the division itself is guarded, not only its result, since
    the gradient of x / 0 is inf and inf * 0 = NaN."""
    nonempty = denominator > 0
    return nonempty, _select(nonempty, denominator, ops.ones_like(denominator))


def reduce_tokens(token_loss, denominator, *, reduction: str, per_token: bool, empty_mean_nan: bool,
                  leading_shape):
    """MindFormers' outputs: (numerator, denominator) per token, or the reduction of the token losses."""
    if per_token:
        return token_loss.sum(), denominator
    if reduction == "none":
        return token_loss.reshape(leading_shape)
    total = token_loss.sum()
    if reduction == "sum":
        return total
    nonempty, divisor = safe_denominator(denominator)
    return _select(nonempty, total / divisor, ops.fill(ms.float32, (), float("nan") if empty_mean_nan else 0.0))
