"""The autodiff wrapper of the fused lm head + vocab-parallel cross entropy: the (N, V/mp) logits never exist.

Rows go through in chunks (`ops.chunking`): a chunk's logits are made by a matmul, reduced to row statistics
by the backend's per-shard step, and dropped. In GRAPH mode the chunk loop is unrolled and each chunk is
sliced after the previous one is done (`vocab_parallel.rows_after`), so that one chunk's buffers are alive
at a time instead of whatever the scheduler would overlap. The weight gradient is one running (V/mp, H)
sum and the hidden gradient one (N, H) float32 buffer, both added to in place by the fused backend inside
the sgemm that makes a chunk's share (the composed backend, which has no in-place sum, adds the weight
gradient's shares and concatenates the chunks' hidden rows at the end). A half-precision head weight is
read in its own dtype by the fused kernels (no float32 copy of it).

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
# gradients made in the forward and the weight gradient's compensation buffer (empty unless half precision)
OBJECTIVE, HIDDEN_GRAD, WEIGHT_GRAD, COMPENSATION = 0, 7, 8, 9


WEIGHT_GRAD_SUMS = ("compensated", "plain")


class LinearShard(VocabShard):
    """What both gradient strategies share: chunking, the chunk logits, the chunk gradient.

    A half-precision head weight on the fused backend is read in its own dtype by the kernels that make a
    chunk's logits and add its hidden part (`product_transposed`, `accumulate_product`: blocks of the weight
    converted to float32 inside sgemm's caller), never copied to float32 (MindSpore's CPU matmul takes no
    bfloat16, and at LLM shapes a float32 copy of the weight and of its gradient were several times the chunk's
    logits); its gradient is summed in its own dtype, with a compensation buffer of that dtype by default
    (`weight_grad_sum`). The composed backend casts a half-precision weight to float32 whole."""

    def __init__(self, layout, *, chunk_size=None, complete_hidden_grad=True, weight_grad_sum="compensated",
                 **shard_options):
        super().__init__(layout, **shard_options)
        self.chunk_size = chunk_size
        self.complete_hidden_grad = bool(complete_hidden_grad)
        self.compensated = weight_grad_sum == "compensated"
        self.model_parallel_sum = ModelParallelSum(layout)

    def reads_half_weight(self, head_weight) -> bool:
        """Whether the kernels read the head weight in its own (half-precision) dtype (see the class docstring)."""
        return self.product_transposed is not None and head_weight.dtype != ms.float32

    def chunk_rows(self, rows: int, local_vocab: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # the fused steps keep one float32 chunk of logits (the gradient is written over it); the composed
        # ops hold a few chunk-sized temporaries at once (exp, probabilities, gradient, selects)
        buffers = 1 if self.backend == "fused" else 6
        return chunking.auto_chunk_rows(rows, local_vocab, buffers=buffers)

    def bounds(self, rows: int, local_vocab: int):
        return chunking.chunk_bounds(rows, self.chunk_rows(rows, local_vocab))

    def vocab_block(self, rows: int, width: int, local_vocab: int) -> int:
        """Classes per block of the recomputing kernels (`chunking.vocab_block`) for (rows, width) hidden: a
        block holds as many float32 values as a chunk of chunk_size rows would, or HEAD_BLOCK_BYTES' worth."""
        if self.chunk_size is not None:
            return chunking.vocab_block(rows, width, local_vocab, self.chunk_size * local_vocab, 1)
        return chunking.vocab_block(rows, width, local_vocab, chunking.HEAD_BLOCK_BYTES // 4,
                                    chunking.MIN_BLOCK_CLASSES)

    def operands(self, hidden, head_weight):
        """(rows, V/mp, the first class of this rank's slice, what `hidden_chunk` takes the chunks from, the head
        weight as the products take it: itself on the fused backend, whose kernels read any float dtype, a
        float32 copy of a half-precision one on the composed backend). A half-precision hidden is made
        float32 a chunk at a time where the backend can (at H = 4096 a float32 copy of the whole input is a
        tenth of the logits); otherwise copied whole (GRAPH mode on CPU slices no half-precision tensor)."""
        rows, local_vocab = hidden.shape[0], head_weight.shape[0]
        _, vocab_start = self.vocab(local_vocab)
        weight = head_weight if self.product_transposed is not None else _float32(head_weight)
        hidden_source = hidden if self.rows_float32 is not None else _float32(hidden)
        return rows, local_vocab, vocab_start, hidden_source, weight

    def hidden_chunk(self, hidden_source, start: int, stop: int, previous):
        """Rows [start, stop) of hidden in float32, taken once `previous` (the last chunk's work) exists."""
        if hidden_source.dtype == ms.float32:
            return rows_after(hidden_source, start, stop, previous)
        if previous is not None:
            hidden_source = _depend(hidden_source, previous)
        return self.rows_float32(hidden_source, start, stop)

    def first_hidden_grad(self, hidden):
        """The hidden gradient before any chunk, a tuple: one fresh float32 (N, H) buffer that each chunk's
        rows are added into in place (fused: no (N, H) concatenation beside the parts, which at H = 4096 was
        a tenth of the logits), or no part yet (composed: its parts are concatenated at the end)."""
        if self.zeros is None:
            return ()
        return (self.zeros(hidden, True),)

    def add_hidden_part(self, hidden_grad, grad, weight, row_offset: int):
        """The hidden gradient with the chunk's part `grad @ head_weight` added to its rows from `row_offset` on:
        inside sgemm, the weight read in its own dtype (fused; 54 ms against 84 ms for MindSpore's matmul alone
        at 128 x 128256 x 256), or a matmul's part kept for the concatenation (composed)."""
        if self.zeros is None:
            return hidden_grad + (_hidden_grad_of(grad, weight),)
        return (self.accumulate_product(hidden_grad[0], grad, weight, row_offset),)

    def whole_hidden_grad(self, hidden_grad):
        return hidden_grad[0] if self.zeros is not None else ops.concat(hidden_grad, 0)

    def chunk_logits(self, chunk, weight):
        """The chunk's (rows, V/mp) float32 logits: the fused kernel, which reads the weight in its own dtype
        (and ran at 62 ms against 80 ms for MindSpore's matmul at 128 x 128256 x 256 float32), or MindSpore's
        matmul on the float32 weight (composed)."""
        if self.product_transposed is not None:
            return self.product_transposed(chunk, weight)
        return _logits_of(chunk, weight)

    def chunk_stats(self, chunk, weight, target, vocab_start: int):
        """(the chunk's float32 logits, its local row statistics)."""
        logits = self.chunk_logits(chunk, weight)
        return logits, self.local_row_stats(logits, target, self.weight, self.spec(vocab_start))

    def first_weight_grad(self, head_weight):
        """The running weight-gradient sum before any chunk, a tuple. A float32 weight (or the composed backend's
        float32 copy): a fresh float32 zero buffer that each chunk's share is added into inside one sgemm
        (fused), or () (composed: the first chunk's share becomes the sum). A half-precision weight the kernels
        read: fresh zero buffers in its dtype, (total, compensation) or (total,)."""
        if not self.reads_half_weight(head_weight):
            return () if self.accumulate_transposed_product is None else (self.zeros(head_weight, True),)
        total = self.zeros(head_weight)
        if not self.compensated:
            return (total,)
        return total, self.zeros(_depend(head_weight, total))

    def add_product(self, weight_grad, grad, chunk):
        """The running weight-gradient sum with `grad^T @ chunk` added (grad: the chunk's logits gradient).
        Fused: inside the sgemm that makes it, so that the (V/mp, H) share is never written out and read back
        (at 2048 x 128256 x 256, 128-row chunks: about 0.5 GB of traffic per chunk, 1.45x the unfused step's
        time and 0.139x the logits' memory when shares were added). Composed: a matmul's share, added to the
        sum (the first one becomes the sum: a ZerosLike to add into would be folded into a constant by GRAPH
        mode and keep its sum from one call to the next)."""
        if self.accumulate_transposed_product is None:
            share = _weight_grad_of(grad, chunk)
            return (share,) if not weight_grad else (weight_grad[0] + share,)
        if len(weight_grad) == 2:
            return self.accumulate_transposed_product_compensated(weight_grad[0], weight_grad[1], grad, chunk, 0)
        return (self.accumulate_transposed_product(weight_grad[0], grad, chunk, 0),)

    def chunk_grads(self, logits, chunk, chunk_start: int, weight, target, vocab_start: int,
                    row_max, log_sum_exp, coefficients, hidden_grad, weight_grad):
        """(the hidden gradient with the chunk's rows added, the running weight-gradient sum with the chunk's
        share added) from the chunk's logits, which are consumed (the gradient is written over them), or made
        again when `logits` is None (the recomputing backward); the chunk starts at row `chunk_start`."""
        if logits is None:
            logits = self.chunk_logits(chunk, weight)
        grad = self.scratch_logits_grad(logits, target, self.weight, self.spec(vocab_start), row_max, log_sum_exp,
                                        coefficients)
        hidden_grad = self.add_hidden_part(hidden_grad, grad, weight, chunk_start)
        return hidden_grad, self.add_product(weight_grad, grad, chunk)

    def finish_weight_grad(self, weight_grad, head_weight):
        if self.reads_half_weight(head_weight):
            return weight_grad[0]  # summed in the weight's own dtype
        return _from_float32(weight_grad[0], head_weight.dtype)

    def finish_hidden_grad(self, hidden_grad, hidden):
        """The float32 hidden gradient, summed over the model-parallel ranks if asked, in hidden's dtype."""
        if self.complete_hidden_grad:
            hidden_grad = self.model_parallel_sum(hidden_grad)
        return _from_float32(hidden_grad, hidden.dtype)


def spent(weight_grad, hidden_grad):
    """What the next chunk is sliced after: the previous chunk's share of both gradients. Its hidden part too:
    that matmul is needed only at the end, and GRAPH mode put it off to a later chunk, keeping this chunk's
    logits (the gradient written over them) alive meanwhile (measured: two chunks' logits at once)."""
    return _depend(weight_grad[0], hidden_grad[-1])


def _float32(tensor):
    """An input in float32, without the copy a same-dtype Cast makes (weight-sized buffers)."""
    return tensor if tensor.dtype == ms.float32 else _cast(tensor, ms.float32)


def _from_float32(tensor, dtype):
    """A float32 gradient in `dtype`, without the copy a same-dtype Cast makes. Decided on `dtype` alone: in a
    custom bprop MindSpore 2.10 does not know a Custom operator's output dtype when it parses, and a
    conditional on it fails to compile ("The func graph is empty")."""
    return tensor if dtype == ms.float32 else _cast(tensor, dtype)


class GradByRecompute(LinearShard):
    """construct(hidden (N, H), head_weight (Vl, H), target (N,) int32, row_scale (N,), active (N,) bool)
    -> (objective, then the per-token tuple of `vocab_parallel`); the backward makes the logits again.

    Fused backend: the statistics and the gradients are each ONE kernel call that goes through the classes in
    blocks, a block's logits for all rows at a time (`fused.head_row_stats`, `fused.head_grads`: Cut
    Cross-Entropy's order), so the weight gradient's rows are complete in one product over all rows and
    rounded once (a half-precision weight needs no compensation buffer) and one block of logits is alive.
    Composed backend: chunks of rows, each chunk's logits made by MindSpore's matmul, in the forward and again
    in the backward."""

    def construct(self, hidden, head_weight, target, row_scale, active):
        rows, local_vocab, vocab_start, hidden_source, weight = self.operands(hidden, head_weight)
        if self.head_row_stats is not None:
            local = self.head_row_stats(hidden, head_weight, target, self.weight, self.spec(vocab_start),
                                        self.vocab_block(rows, hidden.shape[1], local_vocab))
        else:
            parts = []
            previous = None
            for start, stop in self.bounds(rows, local_vocab):
                chunk = self.hidden_chunk(hidden_source, start, stop, previous)
                _, previous = self.chunk_stats(chunk, weight, target[start:stop], vocab_start)
                parts.append(previous)
            local = (ops.concat(parts, 0) if parts else
                     ops.zeros((0, shard_math.num_stat_columns(self.label_smoothing)), ms.float32))
        gathered, rank_widths = self.exchange_stats(local, local_vocab)
        rows_out = self.finish(local, gathered, rank_widths, active, local_vocab)
        return ((row_scale * rows_out[TOKEN_LOSS]).sum(),) + rows_out

    def bprop(self, hidden, head_weight, target, row_scale, active, out, dout):
        rows, local_vocab, vocab_start, hidden_source, weight = self.operands(hidden, head_weight)
        row_max, log_sum_exp, target_mass = out[1 + ROW_MAX], out[1 + LOG_SUM_EXP], out[1 + TARGET_MASS]
        upstream = _select(active, dout[1 + TOKEN_LOSS] + dout[0] * row_scale, _zeros_like(row_scale))
        a, b, q = self.coefficients(row_max, log_sum_exp, target_mass, upstream, local_vocab)
        if self.head_grads is not None:
            hidden_grad, weight_grad = self.head_grads(hidden, head_weight, target, self.weight,
                                                       self.spec(vocab_start), row_max, log_sum_exp, (a, b, q),
                                                       self.vocab_block(rows, hidden.shape[1], local_vocab))
            return (self.finish_hidden_grad(hidden_grad, hidden), weight_grad, _zeros_like(target),
                    _zeros_like(row_scale), _zeros_like(active))
        bounds = self.bounds(rows, local_vocab)
        hidden_grad = self.first_hidden_grad(hidden)
        weight_grad = self.first_weight_grad(head_weight)
        previous = None
        for start, stop in bounds:
            chunk = self.hidden_chunk(hidden_source, start, stop, previous)
            hidden_grad, weight_grad = self.chunk_grads(
                None, chunk, start, weight, target[start:stop], vocab_start, row_max[start:stop],
                log_sum_exp[start:stop], (a[start:stop], b[start:stop], q[start:stop]), hidden_grad, weight_grad)
            previous = spent(weight_grad, hidden_grad)
        if not bounds:
            return (_zeros_like(hidden), _zeros_like(head_weight), _zeros_like(target), _zeros_like(row_scale),
                    _zeros_like(active))
        hidden_grad = self.finish_hidden_grad(self.whole_hidden_grad(hidden_grad), hidden)
        return (hidden_grad, self.finish_weight_grad(weight_grad, head_weight), _zeros_like(target),
                _zeros_like(row_scale), _zeros_like(active))


class GradInForward(LinearShard):
    """construct(hidden, head_weight, target, row_scale, active) -> (objective, the per-token tuple of
    `vocab_parallel`, hidden_grad, weight_grad, compensation): the gradient of `objective` is made in the
    forward (`compensation`: the half-precision weight gradient's compensation buffer, else empty)."""

    def construct(self, hidden, head_weight, target, row_scale, active):
        rows, local_vocab, vocab_start, hidden_source, weight = self.operands(hidden, head_weight)
        bounds = self.bounds(rows, local_vocab)
        pieces = []   # the per-token tuple of each chunk
        hidden_grad = self.first_hidden_grad(hidden)
        weight_grad = self.first_weight_grad(head_weight)
        previous = None
        for start, stop in bounds:
            chunk = self.hidden_chunk(hidden_source, start, stop, previous)
            logits, local = self.chunk_stats(chunk, weight, target[start:stop], vocab_start)
            gathered, rank_widths = self.exchange_stats(local, local_vocab)
            piece = self.finish(local, gathered, rank_widths, active[start:stop], local_vocab)
            coefficients = self.coefficients(piece[ROW_MAX], piece[LOG_SUM_EXP], piece[TARGET_MASS],
                                             row_scale[start:stop], local_vocab)
            hidden_grad, weight_grad = self.chunk_grads(logits, chunk, start, weight,
                                                        target[start:stop], vocab_start, piece[ROW_MAX],
                                                        piece[LOG_SUM_EXP], coefficients, hidden_grad, weight_grad)
            pieces.append(piece)
            previous = spent(weight_grad, hidden_grad)
        if not pieces:  # no rows: nothing to exchange, every output empty or zero
            empty = ops.zeros((0,), ms.float32)
            widths = ops.fill(ms.float32, (self.mp_size,), float(local_vocab))
            return (empty.sum(), empty, empty, empty, empty, empty, widths, ops.zeros(hidden.shape, ms.float32),
                    ops.zeros(head_weight.shape, ms.float32), empty)
        token_loss = ops.concat([piece[TOKEN_LOSS] for piece in pieces], 0)
        return ((row_scale * token_loss).sum(), token_loss,
                ops.concat([piece[ROW_MAX] for piece in pieces], 0),
                ops.concat([piece[LOG_SUM_EXP] for piece in pieces], 0),
                ops.concat([piece[TARGET_MASS] for piece in pieces], 0),
                ops.concat([piece[LOCAL_NONFINITE] for piece in pieces], 0),
                pieces[0][RANK_WIDTHS], self.whole_hidden_grad(hidden_grad), weight_grad[0],
                weight_grad[1] if len(weight_grad) == 2 else ops.zeros((0,), ms.float32))

    def bprop(self, hidden, head_weight, target, row_scale, active, out, dout):
        # the gradients were made for an upstream gradient of 1; scaled over their own buffers (the weight
        # gradient is (V/mp, H): a scaled copy next to it was 0.125x the logits at 2048 x 128256 x 256)
        upstream = dout[0]
        hidden_grad = self.finish_hidden_grad(self.scale(out[HIDDEN_GRAD], upstream), hidden)
        if not self.reads_half_weight(head_weight):
            weight_grad = _from_float32(self.scale(out[WEIGHT_GRAD], upstream), head_weight.dtype)
        elif self.compensated:  # summed in the weight's own dtype
            weight_grad = self.scale_compensated(out[WEIGHT_GRAD], out[COMPENSATION], upstream)
        else:
            weight_grad = self.scale(out[WEIGHT_GRAD], upstream)
        return hidden_grad, weight_grad, _zeros_like(target), _zeros_like(row_scale), _zeros_like(active)
