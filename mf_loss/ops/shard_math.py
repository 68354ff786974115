"""Pure per-shard cross-entropy math, in composed MindSpore ops. No communication happens here.

A rank holds `logits[:, vocab_start:vocab_start + Vl]`. The loss of a row needs a few row statistics over
the whole vocabulary; each is a sum over classes, so each rank computes its share (`local_row_stats`),
the communication layer gathers the shares, and `combine_row_stats` finishes them identically on every
rank. All shares are taken relative to the rank's own max `m_r` and re-based on the global max `m`
with `(m_r - m)` terms: at logits ~1e4 a float32 `lse - x_y` would lose ~5e-4, the shifted form loses
nothing (x - m is exact when x is close to m, and negligible when it is not).

Columns of the per-rank statistics (N, K):
    0  row_max      m_r = max_c x_c                           (-inf rows are re-based at 0)
    1  sum_exp      s_r = sum_c exp(x_c - m_r)
    2  target_dot   sum_c w_c t_c (x_c - m_r)                  (class index: w_y (x_y - m_r) on the owner)
    3  target_mass  sum_c w_c t_c                              (class index: w_y on the owner, else 0)
    4  smooth_dot   sum_c w_c (x_c - m_r)                       (only with label smoothing)

Per token, with lse = m + log_s and V the full vocabulary, W = sum_c w_c:
    loss = (1-eps) (mass log_s - target_shifted) + eps/V (W log_s - smooth_shifted) + z lse^2
and the gradient w.r.t. the (soft-capped) logits is
    dx_c = p_c a - w_c (b + q t_c),   p_c = exp(x_c - m - log_s)
    a = dout ((1-eps) mass + eps W / V + 2 z lse),   b = dout eps / V,   q = dout (1-eps)
A row whose a, b and q are all zero (masked, ignored, or zero upstream gradient) gets exact zeros,
whatever its logits hold.

The fused kernels (`mf_loss.ops.fused`) compute the same statistics and gradient; this module is their
reference and the portable path for every backend.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from . import chunking

# Primitive instances, not functional forms: inside a custom bprop in GRAPH mode the functional
# `ops.zeros_like` and friends fail to compile ("The func graph is empty").
_select = ops.Select()
_zeros_like = ops.ZerosLike()
_ones_like = ops.OnesLike()
_exp = ops.Exp()
_log = ops.Log()
_expm1 = ops.Expm1()
_cast = ops.Cast()
_depend = ops.Depend()
_isfinite = ops.IsFinite()
_stack = ops.Stack(-1)
_gather_d = ops.GatherD()
_scatter_add = ops.TensorScatterElements(axis=1, reduction="add")

ROW_MAX, SUM_EXP, TARGET_DOT, TARGET_MASS, SMOOTH_DOT = range(5)
_FLOAT_DTYPES = (ms.float32, ms.float16, ms.bfloat16)


@dataclass(frozen=True)
class ShardSpec:
    """What the per-shard steps know beyond the tensors they are called with: this rank's place among the
    model-parallel ranks (its slice of a vocabulary split in `mp` equal slices starts at class
    `mp_rank * Vl`), the options that change the per-element maths, and this slice's per-class arrays
    (`weight`: its class weights (Vl,), or None). Built once per loss (`shard_spec`); GRAPH mode folds it in."""

    mp_rank: int = 0
    logit_softcap: Optional[float] = None
    label_smoothing: float = 0.0
    weight: Optional[Tensor] = None

    def vocab_start(self, local_vocab: int) -> int:
        """The first class of this rank's slice, `local_vocab` classes wide."""
        return self.mp_rank * local_vocab


def rank_slice(array: np.ndarray, name: str, mp_rank: int, mp_size: int) -> Tensor:
    """Rank `mp_rank`'s part of a per-class option (V,) split in `mp_size` equal slices."""
    if array.shape[0] % mp_size:
        raise ValueError(f"{name} has {array.shape[0]} classes, not divisible by model_parallel={mp_size}")
    return Tensor(array.reshape(mp_size, -1)[mp_rank].copy())


def shard_spec(options, mp_rank: int, mp_size: int) -> ShardSpec:
    """The `ShardSpec` of a loss with `options` (`mf_loss.options`) on model-parallel rank `mp_rank` of
    `mp_size`: each per-class option sliced to the rank's classes."""
    slices = {name: rank_slice(array, name, mp_rank, mp_size) for name, array in options.per_class_arrays().items()}
    return ShardSpec(mp_rank, None if options.logit_softcap is None else float(options.logit_softcap),
                     float(options.label_smoothing), **slices)


def is_probability_target(target) -> bool:
    """Float targets are (N, Vl) probabilities of this slice; integer ones are (N,) global class ids."""
    return target.dtype in _FLOAT_DTYPES


def num_stat_columns(label_smoothing: float) -> int:
    return 5 if label_smoothing > 0 else 4


def per_row(column, like):
    """The (N,) `column` as `like`'s (N, Vl) shape. Broadcasting is spelled out because MindSpore 2.10's CPU
    kernels for an implicitly broadcast binary op ((N, Vl) - (N, 1)) keep a workspace several times their
    output for the rest of a GRAPH-mode run, per chunk (docs/design.md); an explicit BroadcastTo is an ordinary output, freed after its last use. It is
    made after `like` (a Depend): depending on `like`'s static shape only, GRAPH mode would otherwise make
    every chunk's broadcast before the first chunk starts."""
    return ops.broadcast_to(_depend(column, like).reshape(-1, 1), like.shape)


def per_class(weight, like):
    """The (Vl,) class weights as `like`'s (N, Vl) shape (see `per_row`)."""
    return ops.broadcast_to(_depend(weight, like).reshape(1, -1), like.shape)


def tanh(u):
    """tanh in float32 to within 1.5e-7 (absolute) from expm1: MindSpore 2.10's CPU `Tanh` is off by up to
    1e-4 for |u| in [3, 9] (measured against float64), which the softcap's gradient factor 1 - tanh^2
    (about 1e-7 to 1e-2 there) cannot absorb."""
    m = _expm1(-2.0 * ops.abs(u))
    magnitude = -m / (2.0 + m)
    return _select(u < 0, -magnitude, magnitude)


def softcapped(logits, softcap):
    """The logits in float32, through `softcap * tanh(x / softcap)` when a cap is set."""
    x = _cast(logits, ms.float32)
    if softcap is None:
        return x
    return softcap * tanh(x / softcap)


def owned_target(label, vocab_start: int, local_vocab: int):
    """(owned, local index) of each row's class on this rank; the index is 0 where not owned."""
    local = label - vocab_start
    owned = ops.logical_and(local >= 0, local < local_vocab)
    return owned, _select(owned, local, _zeros_like(local))


def local_row_stats(logits, target, spec: ShardSpec):
    """This rank's (N, K) statistics (see the module docstring) from its logits slice (N, Vl).

    `target`: (N,) integer global class ids, or (N, Vl) float probabilities of this slice.
    """
    weight = spec.weight
    x = softcapped(logits, spec.logit_softcap)
    row_max = x.max(axis=-1)
    # A slice that is all -inf is legal (the row's mass lives on another rank): re-base it at 0 so that
    # its shares stay 0 instead of NaN. +inf and NaN stay as they are and surface as non-finite.
    row_max = _select(row_max == float("-inf"), _zeros_like(row_max), row_max)
    shifted = x - per_row(row_max, x)
    columns = [row_max, _exp(shifted).sum(axis=-1)]
    if not is_probability_target(target):
        owned, index = owned_target(_cast(target, ms.int32), spec.vocab_start(x.shape[-1]), x.shape[-1])
        picked = _gather_d(shifted, 1, index.reshape(-1, 1)).reshape(-1)
        mass = _ones_like(picked) if weight is None else ops.gather(weight, index, 0)
        mass = _select(owned, mass, _zeros_like(mass))
        columns += [_select(owned, mass * picked, _zeros_like(picked)), mass]
    else:
        weighted_target = _cast(target, ms.float32)
        if weight is not None:
            weighted_target = weighted_target * per_class(weight, x)
        columns += [(weighted_target * shifted).sum(axis=-1), weighted_target.sum(axis=-1)]
    if spec.label_smoothing > 0:
        columns.append((shifted if weight is None else shifted * per_class(weight, x)).sum(axis=-1))
    return _stack(columns)


def merge_row_stats(shares, weight_sums):
    """One share (N, K) of the columns above from the shares (S, N, K) of S adjacent vocabulary slices (the
    model-parallel ranks'): each re-based from its own max to the largest.
    `weight_sums` (S,) float32: each slice's sum of class weights (its width when unweighted)."""
    slice_max = shares[:, :, ROW_MAX]
    row_max = slice_max.max(axis=0)
    rebase = slice_max - row_max  # (S, N), <= 0; exact when the maxima are close
    mass = shares[:, :, TARGET_MASS]
    columns = [row_max, (shares[:, :, SUM_EXP] * _exp(rebase)).sum(axis=0),
               (shares[:, :, TARGET_DOT] + _select(mass == 0, _zeros_like(rebase), mass * rebase)).sum(axis=0),
               mass.sum(axis=0)]
    if shares.shape[-1] > SMOOTH_DOT:
        columns.append((shares[:, :, SMOOTH_DOT] + weight_sums.reshape(-1, 1) * rebase).sum(axis=0))
    return _stack(columns)


def combine_row_stats(gathered, rank_weight_sums):
    """Finish the row statistics from every rank's share, identically on every rank.

    gathered: (mp, N, K) from the exchange; rank_weight_sums: (mp,) float32, each rank's sum of class
    weights (its vocabulary size when unweighted). Returns a dict of (N,) float32 tensors: row_max,
    log_sum_exp (log of sum exp(x - row_max)), target_shifted (sum_c w_c t_c (x_c - row_max)),
    target_mass, and smooth_shifted (sum_c w_c (x_c - row_max)) with label smoothing.
    """
    merged = merge_row_stats(gathered, rank_weight_sums)
    stats = {"row_max": merged[:, ROW_MAX], "log_sum_exp": _log(merged[:, SUM_EXP]),
             "target_mass": merged[:, TARGET_MASS], "target_shifted": merged[:, TARGET_DOT]}
    if gathered.shape[-1] > SMOOTH_DOT:
        stats["smooth_shifted"] = merged[:, SMOOTH_DOT]
    return stats


def token_loss(stats, label_smoothing: float, num_classes: int, weight_total: float, z_loss_weight: float):
    """Per-token loss (N,) from combined statistics: smoothed cross entropy plus z-loss."""
    log_sum_exp = stats["log_sum_exp"]
    loss = stats["target_mass"] * log_sum_exp - stats["target_shifted"]
    if label_smoothing > 0:
        smooth = weight_total * log_sum_exp - stats["smooth_shifted"]
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / num_classes) * smooth
    if z_loss_weight > 0:
        lse = stats["row_max"] + log_sum_exp
        loss = loss + z_loss_weight * lse * lse
    return loss


def grad_coefficients(stats, dout, label_smoothing: float, num_classes: int, weight_total: float,
                      z_loss_weight: float):
    """The per-row coefficients (a, b, q) of the gradient formula in the module docstring."""
    coef = (1.0 - label_smoothing) * stats["target_mass"]
    if label_smoothing > 0:
        coef = coef + label_smoothing * weight_total / num_classes
    if z_loss_weight > 0:
        coef = coef + 2.0 * z_loss_weight * (stats["row_max"] + stats["log_sum_exp"])
    return coef * dout, dout * (label_smoothing / num_classes), dout * (1.0 - label_smoothing)


def logits_grad(logits, target, spec: ShardSpec, row_max, log_sum_exp, coefficients):
    """Gradient w.r.t. this rank's logits slice (N, Vl), in the logits' dtype (formula in the docstring);
    `coefficients` is the (a, b, q) of `grad_coefficients`."""
    a, b, q = coefficients
    weight = spec.weight
    softcap = spec.logit_softcap
    x = softcapped(logits, softcap)
    probs = _exp((x - per_row(row_max, x)) - per_row(log_sum_exp, x))
    grad = probs * per_row(a, x)
    if spec.label_smoothing > 0:
        smoothing_term = per_row(b, x)
        grad = grad - (smoothing_term if weight is None else smoothing_term * per_class(weight, x))
    if not is_probability_target(target):
        owned, index = owned_target(_cast(target, ms.int32), spec.vocab_start(x.shape[-1]), x.shape[-1])
        at_target = q if weight is None else q * ops.gather(weight, index, 0)
        at_target = _select(owned, -at_target, _zeros_like(at_target))
        grad = _scatter_add(grad, index.reshape(-1, 1), at_target.reshape(-1, 1))
    else:
        target_term = per_row(q, x) * _cast(target, ms.float32)
        grad = grad - (target_term if weight is None else target_term * per_class(weight, x))
    if softcap is not None:
        grad = grad * (1.0 - (x / softcap) * (x / softcap))
    live = ops.logical_or(ops.logical_or(a != 0, b != 0), q != 0)
    grad = _select(per_row(live, grad), grad, _zeros_like(grad))
    return _cast(grad, logits.dtype)



# ---- the fused head's steps in composed ops (the composed backend's; `mf_loss.ops.fused` has the kernels') ----
# A chunk loop (`nn.linear_vocab_parallel`) makes a chunk's logits from rows of hidden and the head weight, and
# adds the chunk's parts of both gradients to running sums. Here: MindSpore's matmuls on float32 copies of
# half-precision inputs (MindSpore's CPU matmul takes no bfloat16); the hidden parts are concatenated at the
# end, and the first weight share becomes the sum (a ZerosLike to add into would be folded into a constant by
# GRAPH mode and keep its sum from one call to the next).

_logits_of = ops.MatMul(transpose_b=True)       # (n, H) x (Vl, H)^T
_hidden_grad_of = ops.MatMul()                  # (n, Vl) x (Vl, H)
_weight_grad_of = ops.MatMul(transpose_a=True)  # (n, Vl)^T x (n, H)


def float32(tensor):
    """`tensor` in float32, without the copy a same-dtype Cast makes."""
    return tensor if tensor.dtype == ms.float32 else _cast(tensor, ms.float32)


def from_float32(tensor, dtype):
    """A float32 gradient in `dtype`, without the copy a same-dtype Cast makes. Decided on `dtype` alone: in a
    custom bprop MindSpore 2.10 does not know a Custom operator's output dtype when it parses, and a
    conditional on it fails to compile ("The func graph is empty")."""
    return tensor if dtype == ms.float32 else _cast(tensor, dtype)


def head_operands(hidden, head_weight):
    """(what the chunks of hidden are taken from, the head weight as the products take it): float32 copies."""
    return float32(hidden), float32(head_weight)


def hidden_rows(source, start: int, stop: int):
    return source[start:stop]


def chunk_logits(chunk, weight):
    return _logits_of(chunk, weight)


def first_sums(hidden, head_weight):
    """The running sums of (hidden's, head_weight's) gradient before any chunk: no part yet."""
    return (), ()


def add_chunk_grads(hidden_sum, weight_sum, grad, chunk, weight, row_offset: int):
    """The running sums with the chunk's parts added (grad: the chunk's logits gradient, rows from row_offset)."""
    share = _weight_grad_of(grad, chunk)
    return hidden_sum + (_hidden_grad_of(grad, weight),), (share,) if not weight_sum else (weight_sum[0] + share,)


def whole_hidden_grad(hidden_sum):
    return ops.concat(hidden_sum, 0)


# The composed backend's float32 chunk-sized buffers held at once (exp, probabilities, gradient, selects).
CHUNK_BUFFERS = 6


def spent(weight_sum, hidden_sum):
    """What the next chunk is sliced after: the previous chunk's share of both gradients. Its hidden part too:
    that matmul is needed only at the end, and GRAPH mode put it off to a later chunk, keeping this chunk's
    logits (the gradient written over them) alive meanwhile (two chunks' logits at once)."""
    return _depend(weight_sum[0], hidden_sum[-1])


def after(tensor, previous):
    """`tensor`, to be read only once `previous` (the last chunk's result) exists (None: at once). The Depend goes
    on what a chunk is sliced from: on the slice it would order the slice's use but let GRAPH mode make every
    chunk's slice up front (all chunks' temporaries alive at once)."""
    if previous is not None:
        tensor = _depend(tensor, previous)
    return tensor


def rows_after(tensor, start: int, stop: int, previous):
    """`tensor[start:stop]`, sliced only once `previous` exists (`after`)."""
    return after(tensor, previous)[start:stop]


def recompute_rows(rows: int, width: int, local_vocab: int, chunk_size) -> int:
    """Rows per chunk of the composed backend's recomputing design (the chunk loop's own)."""
    return chunking.chunk_rows(rows, local_vocab, chunk_size, CHUNK_BUFFERS)


def chunk_loop(steps, hidden, head_weight, target, spec: ShardSpec, bounds, chunk_stats, context):
    """The fused head's one chunk loop, with the steps of a backend (`steps`: a `backends.Backend`): for each chunk
    [start, stop) of hidden's rows in `bounds`, its logits; `chunk_stats(logits, target, start, stop, context)` ->
    (row_max, log_sum_exp, coefficients, kept), the chunk's complete row statistics and gradient coefficients
    and what the caller keeps of them; the logits gradient written over the logits; the chunk's parts of both
    gradients added to running sums. Each chunk is sliced once the previous one's parts exist (`spent`), so
    one chunk's buffers are alive at a time. Returns (hidden's float32 gradient, the weight's float32 running
    sum, [kept of each chunk]).

    The forward design makes and exchanges each chunk's statistics (`nn.linear_vocab_parallel`); the composed
    backend's recomputing design replays the loop in the backward with the statistics its forward saved and the
    per-row upstream gradient (`replayed_chunk_stats`)."""
    hidden_source, weight = steps.head_operands(hidden, head_weight)
    hidden_sum, weight_sum = steps.first_sums(hidden, head_weight)
    kept = []
    previous = None
    for start, stop in bounds:
        chunk = steps.hidden_rows(after(hidden_source, previous), start, stop)
        logits = steps.chunk_logits(chunk, weight)
        chunk_target = target[start:stop]
        row_max, log_sum_exp, coefficients, piece = chunk_stats(logits, chunk_target, start, stop, context)
        kept.append(piece)
        grad = steps.scratch_logits_grad(logits, chunk_target, spec, row_max, log_sum_exp, coefficients)
        hidden_sum, weight_sum = steps.add_chunk_grads(hidden_sum, weight_sum, grad, chunk, weight, start)
        previous = spent(weight_sum, hidden_sum)
    return steps.whole_hidden_grad(hidden_sum), weight_sum[0], kept


def replayed_chunk_stats(logits, target, start: int, stop: int, saved):
    """`chunk_loop`'s statistics of rows [start, stop) from `saved` = (row_max, log_sum_exp, (a, b, q)) of all rows."""
    row_max, log_sum_exp, (a, b, q) = saved
    return row_max[start:stop], log_sum_exp[start:stop], (a[start:stop], b[start:stop], q[start:stop]), ()
