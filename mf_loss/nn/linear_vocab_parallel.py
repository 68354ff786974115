"""The autodiff wrapper of the fused lm head + vocab-parallel cross entropy: the (N, V/mp) logits never exist.

Rows go through in chunks (`ops.chunking`): a chunk's logits are made by a matmul, reduced to row statistics
by the backend's per-shard step, and dropped. In GRAPH mode the chunk loop is unrolled and each chunk is
sliced after the previous one is done (`vocab_parallel.rows_after`), so that one chunk's buffers are alive
at a time instead of whatever the scheduler would overlap. The weight gradient is one running (V/mp, H)
sum, added to in place by the fused backend, a vocabulary tile of a chunk's share at a time.

The loss cell hands the core a per-row `row_scale`: the loss it returns is `objective = sum_n row_scale_n *
token_loss_n` (mean: mask / denominator; sum and the per-token numerator: mask), known before any logit.
Two ways to the gradient, both exact (collectives per call for mp > 1 in brackets):

- `GradInForward` (Liger's way): the gradient of `objective` is made chunk by chunk in the forward, right
  after the chunk's statistics, and the backward only scales it by the upstream scalar. 3 matmuls, as the
  unfused head. A chunk's statistics must be complete before its gradient, so with mp > 1 each chunk makes
  its own exchange [chunks + 1: one exchange per chunk, plus the hidden gradient's sum in the backward].
  `token_loss` is not differentiable here (the loss cell only reads it under stop_gradient).
- `GradByRecompute` (Cut Cross-Entropy's way): the forward makes the statistics of every chunk and ONE
  exchange; the backward makes each chunk's logits again. 4 matmuls [2: the exchange, and the hidden
  gradient's sum]. Needed for reduction="none" (a per-row upstream gradient).

The hidden gradient's sum over the model-parallel ranks (`complete_hidden_grad`) is the lm head's own
backward all-reduce (Megatron's copy-to-tensor-parallel region), not an extra one; models whose own copy op
already sums it ask for this rank's share only.
"""
import mindspore as ms
from mindspore import ops

from ..ops import chunking, shard_math
from ..parallel.comm import ModelParallelSum
from .vocab_parallel import (LOCAL_NONFINITE, LOG_SUM_EXP, RANK_WIDTHS, ROW_MAX, TARGET_MASS, TOKEN_LOSS,
                             VocabShard, rows_after)

_cast = ops.Cast()
_depend = ops.Depend()
_select = ops.Select()
_zeros_like = ops.ZerosLike()
_logits_of = ops.MatMul(transpose_b=True)   # (n, H) x (Vl, H)^T
_hidden_grad_of = ops.MatMul()              # (n, Vl) x (Vl, H)
_weight_grad_of = ops.MatMul(transpose_a=True)  # (n, Vl)^T x (n, H)
# positions in a core's output: the objective, the per-token tuple of vocab_parallel, then (GradInForward) the
# gradients made in the forward
OBJECTIVE, HIDDEN_GRAD, WEIGHT_GRAD = 0, 7, 8


class LinearShard(VocabShard):
    """What both gradient strategies share: chunking, the chunk logits, the chunk gradient."""

    def __init__(self, layout, *, chunk_size=None, complete_hidden_grad=True, **shard_options):
        super().__init__(layout, **shard_options)
        self.chunk_size = chunk_size
        self.complete_hidden_grad = bool(complete_hidden_grad)
        self.model_parallel_sum = ModelParallelSum(layout)

    def chunk_rows(self, rows: int, local_vocab: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # the fused steps keep one float32 chunk of logits (the gradient is written over it); the composed
        # ops hold a few chunk-sized temporaries at once (exp, probabilities, gradient, selects)
        buffers = 1 if self.backend == "fused" else 6
        return chunking.auto_chunk_rows(rows, local_vocab, buffers=buffers)

    def bounds(self, rows: int, local_vocab: int):
        return chunking.chunk_bounds(rows, self.chunk_rows(rows, local_vocab))

    def operands(self, hidden, head_weight):
        """(rows, V/mp, this slice's ShardSpec, hidden and head_weight in float32). One float32 copy of the
        (N, H) input up front: small, and GRAPH mode on CPU slices no half-precision tensor."""
        rows, local_vocab = hidden.shape[0], head_weight.shape[0]
        _, vocab_start = self.vocab(local_vocab)
        return rows, local_vocab, self.spec(vocab_start), _float32(hidden), _float32(head_weight)

    def weight_tiles(self, local_vocab: int, hidden_size: int, chunk_rows: int):
        """Row ranges of the weight gradient that one chunk adds at a time (`chunking.weight_tile_rows`):
        the fused backend adds into its running sum in place, tile by tile, so that a chunk's (V/mp, H)
        share never exists whole (at 2048 x 128256 x 256 that share was 0.125x the logits, most of the
        head's peak); the composed one adds whole shares (it has no in-place sum)."""
        if self.backend != "fused":
            return [(0, local_vocab)]
        return chunking.chunk_bounds(local_vocab, chunking.weight_tile_rows(local_vocab, hidden_size, chunk_rows))

    def chunk_grads(self, logits, hidden_chunk, weight32, target, spec, row_max, log_sum_exp, coefficients,
                    weight_grad):
        """(d hidden chunk, running weight gradient with this chunk's share added) from the chunk's logits,
        which are consumed; `weight_grad` is None for the first chunk."""
        grad = self.scratch_logits_grad(logits, target, self.weight, spec, row_max, log_sum_exp, coefficients)
        hidden_part = _hidden_grad_of(grad, weight32)
        if weight_grad is None:
            # the first chunk's share becomes the running sum: a fresh matmul output (a ZerosLike to add into
            # would be folded into a constant by GRAPH mode and keep its sum from one call to the next)
            return hidden_part, _weight_grad_of(grad, hidden_chunk)
        tiles = self.weight_tiles(weight32.shape[0], weight32.shape[1], hidden_chunk.shape[0])
        if len(tiles) == 1:
            return hidden_part, self.accumulate(weight_grad, _weight_grad_of(grad, hidden_chunk))
        for start, stop in tiles:
            # each tile's columns are sliced after the previous tile is added: one tile share at a time
            tile = _depend(grad, weight_grad)[:, start:stop]
            weight_grad = self.accumulate(weight_grad, _weight_grad_of(tile, hidden_chunk), start)
        return hidden_part, weight_grad

    def finish_hidden_grad(self, hidden_grad, hidden):
        if self.complete_hidden_grad:
            hidden_grad = self.model_parallel_sum(hidden_grad)
        return _in_dtype(hidden_grad, hidden.dtype)


def _in_dtype(tensor, dtype):
    """`tensor` cast to `dtype`, without the copy a same-dtype Cast makes (gradient-sized buffers)."""
    return tensor if tensor.dtype == dtype else _cast(tensor, dtype)


def _float32(tensor):
    return _in_dtype(tensor, ms.float32)




class GradByRecompute(LinearShard):
    """construct(hidden (N, H), head_weight (Vl, H), target (N,) int32, row_scale (N,), active (N,) bool)
    -> (objective, then the per-token tuple of `vocab_parallel`); the backward makes the chunk logits again."""

    def construct(self, hidden, head_weight, target, row_scale, active):
        rows, local_vocab, spec, hidden32, weight32 = self.operands(hidden, head_weight)
        parts = []
        previous = None
        for start, stop in self.bounds(rows, local_vocab):
            chunk = rows_after(hidden32, start, stop, previous)
            previous = self.local_row_stats(_logits_of(chunk, weight32), target[start:stop], self.weight, spec)
            parts.append(previous)
        local = (ops.concat(parts, 0) if parts else
                 ops.zeros((0, shard_math.num_stat_columns(self.label_smoothing)), ms.float32))
        gathered, rank_widths = self.exchange_stats(local, local_vocab)
        rows_out = self.finish(local, gathered, rank_widths, active, local_vocab)
        return ((row_scale * rows_out[TOKEN_LOSS]).sum(),) + rows_out

    def bprop(self, hidden, head_weight, target, row_scale, active, out, dout):
        rows, local_vocab, spec, hidden32, weight32 = self.operands(hidden, head_weight)
        row_max, log_sum_exp, target_mass = out[1 + ROW_MAX], out[1 + LOG_SUM_EXP], out[1 + TARGET_MASS]
        upstream = _select(active, dout[1 + TOKEN_LOSS] + dout[0] * row_scale, _zeros_like(row_scale))
        a, b, q = self.coefficients(row_max, log_sum_exp, target_mass, upstream, local_vocab)
        hidden_parts = []
        weight_grad = None
        for start, stop in self.bounds(rows, local_vocab):
            chunk = rows_after(hidden32, start, stop, weight_grad)
            logits = _logits_of(chunk, weight32)
            hidden_part, weight_grad = self.chunk_grads(
                logits, chunk, weight32, target[start:stop], spec, row_max[start:stop], log_sum_exp[start:stop],
                (a[start:stop], b[start:stop], q[start:stop]), weight_grad)
            hidden_parts.append(hidden_part)
        if not hidden_parts:
            return (_zeros_like(hidden), _zeros_like(head_weight), _zeros_like(target), _zeros_like(row_scale),
                    _zeros_like(active))
        hidden_grad = self.finish_hidden_grad(ops.concat(hidden_parts, 0), hidden)
        return (hidden_grad, _in_dtype(weight_grad, head_weight.dtype), _zeros_like(target), _zeros_like(row_scale),
                _zeros_like(active))


class GradInForward(LinearShard):
    """construct(hidden, head_weight, target, row_scale, active) -> (objective, the per-token tuple of
    `vocab_parallel`, hidden_grad, weight_grad): the gradient of `objective` is made in the forward."""

    def construct(self, hidden, head_weight, target, row_scale, active):
        rows, local_vocab, spec, hidden32, weight32 = self.operands(hidden, head_weight)
        pieces = []   # the per-token tuple of each chunk
        hidden_parts = []
        weight_grad = None
        for start, stop in self.bounds(rows, local_vocab):
            chunk = rows_after(hidden32, start, stop, weight_grad)
            logits = _logits_of(chunk, weight32)
            local = self.local_row_stats(logits, target[start:stop], self.weight, spec)
            gathered, rank_widths = self.exchange_stats(local, local_vocab)
            piece = self.finish(local, gathered, rank_widths, active[start:stop], local_vocab)
            coefficients = self.coefficients(piece[ROW_MAX], piece[LOG_SUM_EXP], piece[TARGET_MASS],
                                             row_scale[start:stop], local_vocab)
            hidden_part, weight_grad = self.chunk_grads(logits, chunk, weight32, target[start:stop], spec,
                                                        piece[ROW_MAX], piece[LOG_SUM_EXP], coefficients,
                                                        weight_grad)
            pieces.append(piece)
            hidden_parts.append(hidden_part)
        if not pieces:  # no rows: nothing to exchange, every output empty or zero
            empty = ops.zeros((0,), ms.float32)
            widths = ops.fill(ms.float32, (self.mp_size,), float(local_vocab))
            return (empty.sum(), empty, empty, empty, empty, empty, widths, ops.zeros(hidden.shape, ms.float32),
                    ops.zeros(head_weight.shape, ms.float32))
        token_loss = ops.concat([piece[TOKEN_LOSS] for piece in pieces], 0)
        return ((row_scale * token_loss).sum(), token_loss,
                ops.concat([piece[ROW_MAX] for piece in pieces], 0),
                ops.concat([piece[LOG_SUM_EXP] for piece in pieces], 0),
                ops.concat([piece[TARGET_MASS] for piece in pieces], 0),
                ops.concat([piece[LOCAL_NONFINITE] for piece in pieces], 0),
                pieces[0][RANK_WIDTHS], ops.concat(hidden_parts, 0), weight_grad)

    def bprop(self, hidden, head_weight, target, row_scale, active, out, dout):
        # the gradients were made for an upstream gradient of 1; scaled over their own buffers (the weight
        # gradient is (V/mp, H): a scaled copy next to it was 0.125x the logits at 2048 x 128256 x 256)
        upstream = dout[0]
        hidden_grad = self.finish_hidden_grad(self.scale(out[HIDDEN_GRAD], upstream), hidden)
        weight_grad = _in_dtype(self.scale(out[WEIGHT_GRAD], upstream), head_weight.dtype)
        return hidden_grad, weight_grad, _zeros_like(target), _zeros_like(row_scale), _zeros_like(active)
