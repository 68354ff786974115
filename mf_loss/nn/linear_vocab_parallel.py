"""The autodiff wrapper of the fused lm head + vocab-parallel cross entropy: the (N, V/mp) logits never exist.

The loss cell hands the core a per-row `row_scale`: the loss it returns is `objective = sum_n row_scale_n *
token_loss_n` (mean: mask / denominator; sum and the per-token numerator: mask), known before any logit.
One core, `LinearVocabParallel`, with three ways to the gradient, all exact (collectives per call for mp > 1
in brackets):

- The chunk loop (`shard_math.chunk_loop`), gradient made in the forward (Liger's way; `grad_mode="forward"`):
  rows go through in chunks (`ops.chunking`); a chunk's logits are made by a product, reduced to row
  statistics by the backend's per-shard step, exchanged, and the chunk's share of both gradients is made right
  away, over the logits.
  3 products, as the unfused head; the backward only scales the gradients by the upstream scalar [chunks + 1:
  one exchange per chunk, plus the hidden gradient's sum]. In GRAPH mode the loop is unrolled and each chunk
  is sliced after the previous one is done (`shard_math.after`), so that one chunk's buffers are alive at
  a time. The weight gradient is ONE running float32 (V/mp, H) sum (fused: added to inside the sgemm that
  makes a chunk's share; composed: matmul shares added up), rounded once to the weight's dtype: for a
  half-precision weight its error is that of a float32 sum over the chunks (about chunks x 2^-24 relative
  to the sum of the shares' magnitudes, far below one unit of float16 / bfloat16) plus the one rounding
  (half a unit), and its memory is the float32 sum, 4 bytes per weight element beside the gradient.
- The same loop replayed in the backward (the composed backend's `grad_mode="recompute"`, what
  reduction="none" takes there; its `Backend.head_row_stats` / `head_grads`): the forward makes the statistics
  only, chunk by chunk (one exchange), the backward runs `shard_math.chunk_loop` again, each chunk's
  statistics taken from the saved ones and its coefficients from the per-row upstream gradient. 4 products [2].
- The fused backend's recomputing kernels (Cut Cross-Entropy's order; `grad_mode="recompute"`, what "auto"
  takes for a half-precision weight): the statistics and the gradients are each ONE kernel call that goes
  through the classes in blocks, a block's logits for all rows at a time (`fused.head_row_stats`,
  `fused.head_grads`), so the weight gradient's rows are complete in one product over all rows and rounded
  once, and one block of logits is alive. 4 products [2].

The last two are one design chosen with the backend (`Backend.head_row_stats` / `head_grads`): the core asks
the backend for its recomputing steps and never tests which backend it has. A PYNATIVE call that nothing
differentiates (an evaluation loop) makes the statistics only, with the backend's `head_row_stats`.

The hidden gradient's sum over the model-parallel ranks (`complete_hidden_grad`) is the lm head's own
backward all-reduce (Megatron's copy-to-tensor-parallel region), not an extra one; models whose own copy op
already sums it ask for this rank's share only.
"""
import mindspore as ms
from mindspore import ops

from ..ops import chunking, shard_math
from ..parallel.comm import ModelParallelSum
from .outputs import (HIDDEN_GRAD, LOCAL_NONFINITE, LOG_SUM_EXP, OBJECTIVE, RANK_WIDTHS, ROW_MAX, TARGET_MASS,
                      TOKEN_LOSS, WEIGHT_GRAD, in_head_output)
from .vocab_parallel import VocabShard

_select = ops.Select()
_zeros_like = ops.ZerosLike()


class LinearVocabParallel(VocabShard):
    """construct(hidden (N, H), head_weight (Vl, H), target (N,) int32, row_scale (N,), active (N,) bool)
    -> (objective, the per-token tuple of `vocab_parallel`, hidden_grad, weight_grad); the last two are the
    gradients of `objective` when the forward made them (the chunk loop's forward design), else empty.

    A half-precision head weight on the fused backend is read in its own dtype by the kernels (blocks of it
    converted to float32 inside sgemm's caller), never copied to float32 whole (MindSpore's CPU matmul takes no
    bfloat16, and at LLM shapes a float32 copy of the weight is several times a chunk's logits). The composed
    backend casts a half-precision weight to float32 whole."""

    def __init__(self, layout, options):
        super().__init__(layout, options)
        self.complete_hidden_grad = bool(options.complete_hidden_grad)
        self.grad_mode = options.chosen_grad_mode
        self.model_parallel_sum = ModelParallelSum(layout)

    def recomputes(self, weight_dtype) -> bool:
        """Whether a call with a head weight of `weight_dtype` makes its gradient in the backward: asked, or
        "auto" with a half-precision weight where the backend says so (`Backend.auto_recomputes_half_weight`)."""
        if self.grad_mode == "auto":
            return self.steps.auto_recomputes_half_weight and weight_dtype != ms.float32
        return self.grad_mode == "recompute"

    def reads_half_weight(self, head_weight) -> bool:
        """Whether the products read a half-precision head weight as it is (see the class docstring)."""
        return self.steps.head_operands(head_weight, head_weight)[1].dtype != ms.float32

    def chunk_rows(self, rows: int, local_vocab: int) -> int:
        """Rows per chunk of the forward design's loop (its steps hold `chunk_buffers` chunk-sized buffers)."""
        return chunking.chunk_rows(rows, local_vocab, self.chunk_size, self.steps.chunk_buffers)

    def bounds(self, rows: int, local_vocab: int):
        return chunking.chunk_bounds(rows, self.chunk_rows(rows, local_vocab))

    def head_block(self, rows: int, width: int, local_vocab: int) -> int:
        """The `block` of the backend's recomputing steps for (rows, width) hidden (`Backend.recompute_block`)."""
        return self.steps.recompute_block(rows, width, local_vocab, self.chunk_size)

    def exchanged_chunk_stats(self, logits, target, start: int, stop: int, weights):
        """`shard_math.chunk_loop`'s statistics of the forward design: the chunk's own, exchanged and finished into
        its per-token tuple (kept), with the gradient coefficients for `weights` = (active, the per-row weights of
        the objective) of all rows."""
        active, upstream = weights
        local_vocab = logits.shape[-1]
        local = self.steps.local_row_stats(logits, target, self.spec)
        gathered, rank_widths = self.exchange_stats(local, local_vocab)
        piece = self.finish(local, gathered, rank_widths, active[start:stop], local_vocab)
        coefficients = self.coefficients(piece[ROW_MAX], piece[LOG_SUM_EXP], piece[TARGET_MASS], upstream[start:stop],
                                         local_vocab)
        return piece[ROW_MAX], piece[LOG_SUM_EXP], coefficients, piece

    def chunk_loop(self, hidden, head_weight, target, active, upstream):
        """The forward design: the head's chunk loop (`shard_math.chunk_loop`) with each chunk's statistics made and
        exchanged, and its share of both gradients for the per-row weights of the objective (`upstream`) ->
        (the per-token tuple, hidden's float32 gradient, the weight's float32 running sum)."""
        bounds = self.bounds(hidden.shape[0], head_weight.shape[0])
        hidden_grad, weight_grad, pieces = shard_math.chunk_loop(self.steps, hidden, head_weight, target, self.spec,
                                                                 bounds, self.exchanged_chunk_stats,
                                                                 (active, upstream))
        per_token = (ops.concat([piece[TOKEN_LOSS] for piece in pieces], 0),
                     ops.concat([piece[ROW_MAX] for piece in pieces], 0),
                     ops.concat([piece[LOG_SUM_EXP] for piece in pieces], 0),
                     ops.concat([piece[TARGET_MASS] for piece in pieces], 0),
                     ops.concat([piece[LOCAL_NONFINITE] for piece in pieces], 0),
                     pieces[0][RANK_WIDTHS])
        return per_token, hidden_grad, weight_grad

    # ---- the autodiff wrapper ----

    def construct(self, hidden, head_weight, target, row_scale, active):
        if self.recomputes(head_weight.dtype):
            return self.statistics(hidden, head_weight, target, row_scale, active)
        per_token, hidden_grad, weight_grad = self.chunk_loop(hidden, head_weight, target, active, row_scale)
        return ((row_scale * per_token[TOKEN_LOSS]).sum(),) + per_token + (hidden_grad, weight_grad)

    def statistics(self, hidden, head_weight, target, row_scale, active):
        """construct's outputs without a gradient made in the forward (empty in its places): the forward of the
        recomputing designs, and what a PYNATIVE call that nothing differentiates runs (no backward follows)."""
        rows, local_vocab = hidden.shape[0], head_weight.shape[0]
        local = self.steps.head_row_stats(hidden, head_weight, target, self.spec,
                                    self.head_block(rows, hidden.shape[1], local_vocab))
        gathered, rank_widths = self.exchange_stats(local, local_vocab)
        per_token = self.finish(local, gathered, rank_widths, active, local_vocab)
        empty = ops.zeros((0,), ms.float32)
        return ((row_scale * per_token[TOKEN_LOSS]).sum(),) + per_token + (empty, empty)

    def bprop(self, hidden, head_weight, target, row_scale, active, out, dout):
        inputs_grads = (_zeros_like(target), _zeros_like(row_scale), _zeros_like(active))
        if not self.recomputes(head_weight.dtype):
            # the gradients were made for an upstream gradient of 1; scaled over their own buffers (the weight
            # gradient is (V/mp, H): a scaled copy would be a second one)
            upstream = dout[OBJECTIVE]
            hidden_grad = self.finish_hidden_grad(self.steps.scale(out[HIDDEN_GRAD], upstream), hidden)
            weight_grad = shard_math.from_float32(self.steps.scale(out[WEIGHT_GRAD], upstream), head_weight.dtype)
            return (hidden_grad, weight_grad) + inputs_grads
        saved = (out[in_head_output(ROW_MAX)], out[in_head_output(LOG_SUM_EXP)], out[in_head_output(TARGET_MASS)])
        upstream = _select(active, dout[in_head_output(TOKEN_LOSS)] + dout[OBJECTIVE] * row_scale,
                           _zeros_like(row_scale))
        rows, local_vocab = hidden.shape[0], head_weight.shape[0]
        coefficients = self.coefficients(saved[0], saved[1], saved[2], upstream, local_vocab)
        hidden_grad, weight_grad = self.steps.head_grads(hidden, head_weight, target, self.spec, saved[0], saved[1],
                                                   coefficients, self.head_block(rows, hidden.shape[1], local_vocab))
        return (self.finish_hidden_grad(hidden_grad, hidden), weight_grad) + inputs_grads

    def finish_hidden_grad(self, hidden_grad, hidden):
        """The float32 hidden gradient, summed over the model-parallel ranks if asked, in hidden's dtype."""
        if self.complete_hidden_grad:
            hidden_grad = self.model_parallel_sum(hidden_grad)
        return shard_math.from_float32(hidden_grad, hidden.dtype)
