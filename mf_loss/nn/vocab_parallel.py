"""The autodiff wrapper: per-token vocab-parallel cross entropy with its own backward.

Forward: local statistics (shard math) -> one exchange (communication layer) -> per-token loss.
Backward: the gradient of the rank's own slice from the saved row statistics; no collective (autodiff
through the exchange would all-reduce gradients and multiply them by the group size).

`VocabShard` holds what both cores (this one and the fused lm head's, `linear_vocab_parallel`) know about
the rank's slice of the vocabulary: its `ShardSpec` (its place, the per-element options, its slices of the
per-class options), the backend's steps, and how to finish the exchanged statistics into token losses.
"""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..ops import backends, chunking
from ..ops import shard_math as math
from ..parallel.comm import RankLayout, RowStatsExchange
from .outputs import LOG_SUM_EXP, ROW_MAX, TARGET_MASS, TOKEN_LOSS

_select = ops.Select()
_zeros_like = ops.ZerosLike()
_cast = ops.Cast()
_isfinite = ops.IsFinite()


class VocabShard(nn.Cell):
    """This rank's slice of the vocabulary and the per-shard math on it (no collective of its own), for a loss
    with `options` (`mf_loss.options`); `inplace`: the backend's `logits_grad` writes over the logits."""

    def __init__(self, layout: RankLayout, options, inplace: bool = False):
        super().__init__()
        self.mp_size = layout.mp_size
        self.mp_rank = layout.mp_rank
        # plain attributes for construct: GRAPH mode folds them in as constants
        self.label_smoothing = float(options.label_smoothing)
        self.z_loss_weight = float(options.z_loss_weight)
        self.chunk_size = options.chunk_size
        # the backend's steps (`backends.Backend`), read as `self.steps.<step>`: one object, folded in by GRAPH mode
        self.steps = backends.select(options.backend, inplace=inplace)
        self.backend = self.steps.name
        self.inplace = self.steps.inplace
        self.device_target = backends.device_target()
        self.exchange = RowStatsExchange(layout)
        # what the per-shard steps know beyond the tensors, per-class options sliced to this rank's classes
        self.spec = math.shard_spec(options, self.mp_rank, self.mp_size)
        # (name, V) of a per-class option: it fixes the vocabulary the logits' widths must make
        self.vocab_fixed_by = next(((name, array.shape[0]) for name, array in options.per_class_arrays().items()),
                                   None)
        weight = options.weight
        self.weighted = weight is not None
        if self.weighted:
            self.rank_weight_sums = Tensor(weight.reshape(self.mp_size, -1).astype(np.float64).sum(axis=1)
                                           .astype(np.float32))
            self.weight_total = float(weight.astype(np.float64).sum())

    def vocab(self, local_vocab: int):
        """(classes in the full vocabulary, first class of this rank) for a slice `local_vocab` wide."""
        if self.vocab_fixed_by is not None and self.vocab_fixed_by[1] != local_vocab * self.mp_size:
            name, classes = self.vocab_fixed_by
            raise ValueError(f"{name} has {classes} classes but logits of width {local_vocab} "
                             f"on {self.mp_size} model-parallel ranks make a vocabulary of "
                             f"{local_vocab * self.mp_size}")
        return local_vocab * self.mp_size, local_vocab * self.mp_rank

    def weight_sums(self, local_vocab: int):
        """(each rank's sum of class weights (mp,), the full vocabulary's) for label smoothing."""
        if not self.weighted:
            return Tensor(np.full(self.mp_size, local_vocab, np.float32)), float(local_vocab * self.mp_size)
        return self.rank_weight_sums, self.weight_total

    def exchange_stats(self, local, local_vocab: int):
        """Every rank's statistics (mp, N, K) and widths (mp,) from this rank's (N, K): the ONE exchange.
        Each rank only knows its own width: it rides along as one extra row."""
        width_row = ops.concat((ops.fill(ms.float32, (1, 1), float(local_vocab)),
                                ops.fill(ms.float32, (1, local.shape[-1] - 1), 0.0)), 1)
        gathered = self.exchange(ops.concat((local, width_row), 0))
        return gathered[:, :-1, :], gathered[:, -1, 0]

    def finish(self, local, gathered, rank_widths, active, local_vocab: int):
        """Token losses from the exchanged statistics; NaN for active rows when the widths disagree."""
        num_classes, _ = self.vocab(local_vocab)
        rank_weight_sums, weight_total = self.weight_sums(local_vocab)
        stats = math.combine_row_stats(gathered, rank_weight_sums)
        loss = math.token_loss(stats, self.label_smoothing, num_classes, weight_total, self.z_loss_weight)
        widths_agree = (rank_widths == float(local_vocab)).all()
        loss = _select(ops.logical_and(active, widths_agree), loss,
                       _select(active, ops.fill(ms.float32, loss.shape, float("nan")), _zeros_like(loss)))
        local_nonfinite = _cast(ops.logical_not(_isfinite(local).all(axis=-1)), ms.float32)
        return loss, stats["row_max"], stats["log_sum_exp"], stats["target_mass"], local_nonfinite, rank_widths

    def coefficients(self, row_max, log_sum_exp, target_mass, upstream, local_vocab: int):
        """The (a, b, q) of the gradient formula (shard_math) for per-row upstream gradients."""
        num_classes, _ = self.vocab(local_vocab)
        _, weight_total = self.weight_sums(local_vocab)
        stats = {"row_max": row_max, "log_sum_exp": log_sum_exp, "target_mass": target_mass}
        return math.grad_coefficients(stats, upstream, self.label_smoothing, num_classes, weight_total,
                                      self.z_loss_weight)


class VocabParallelCrossEntropy(VocabShard):
    """construct(logits (N, Vl), target, active (N,) bool) -> the per-token tuple (TOKEN_LOSS, ...).

    `target` is (N,) int32 class ids over the full vocabulary, or (N, Vl) probabilities of this slice.
    The composed backend goes through the rows in chunks (`ops.chunking`, each ordered after the previous
    one), so that its float32 temporaries (exp, probabilities, selects) are chunk-sized, not logits-sized;
    the fused kernels read each row once and need no chunks.
    """

    def __init__(self, layout, options):
        super().__init__(layout, options, inplace=options.inplace_backward)

    def bounds(self, logits):
        rows, local_vocab = logits.shape
        # the fused kernels need no chunks; half-precision logits on CPU are not chunked either, as MindSpore's
        # CPU slicing has no half-precision kernel in GRAPH mode (Ascend's has)
        if not self.steps.chunks_logits or (logits.dtype != ms.float32 and self.device_target == "CPU"):
            return [(0, rows)]
        # the composed steps hold about CHUNK_BUFFERS float32 chunk-sized temporaries at once
        return chunking.chunk_bounds(rows, chunking.chunk_rows(rows, local_vocab, self.chunk_size, math.CHUNK_BUFFERS))

    def construct(self, logits, target, active):
        local_vocab = logits.shape[-1]
        self.vocab(local_vocab)  # the per-class options' length against the vocabulary, before any step reads them
        spec = self.spec
        bounds = self.bounds(logits)
        if len(bounds) == 1:
            local = self.steps.local_row_stats(logits, target, spec)
        else:
            parts = []
            previous = None
            for start, stop in bounds:
                previous = self.steps.local_row_stats(math.rows_after(logits, start, stop, previous),
                                                      target[start:stop], spec)
                parts.append(previous)
            local = ops.concat(parts, 0)
        gathered, rank_widths = self.exchange_stats(local, local_vocab)
        return self.finish(local, gathered, rank_widths, active, local_vocab)

    def bprop(self, logits, target, active, out, dout):
        local_vocab = logits.shape[-1]
        spec = self.spec
        upstream = _select(active, dout[TOKEN_LOSS], _zeros_like(dout[TOKEN_LOSS]))
        a, b, q = self.coefficients(out[ROW_MAX], out[LOG_SUM_EXP], out[TARGET_MASS], upstream, local_vocab)
        bounds = self.bounds(logits)
        if len(bounds) == 1:
            grad = self.steps.logits_grad(logits, target, spec, out[ROW_MAX], out[LOG_SUM_EXP], (a, b, q))
        else:
            # the chunks' gradients and their concatenation make the peak: MindSpore has no op that writes a chunk
            # into a preallocated buffer without a copy in GRAPH mode (docs/design.md)
            parts = []
            previous = None
            for start, stop in bounds:
                previous = self.steps.logits_grad(math.rows_after(logits, start, stop, previous), target[start:stop],
                                                  spec, out[ROW_MAX][start:stop], out[LOG_SUM_EXP][start:stop],
                                                  (a[start:stop], b[start:stop], q[start:stop]))
                parts.append(previous)
            grad = ops.concat(parts, 0)
        return grad, _zeros_like(target), _zeros_like(active)
