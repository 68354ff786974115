"""The autodiff wrapper: per-token vocab-parallel cross entropy with its own backward.

Forward: local statistics (shard math) -> one exchange (communication layer) -> per-token loss.
Backward: the gradient of the rank's own slice from the saved row statistics; no collective (autodiff
through the exchange would all-reduce gradients and multiply them by the group size).
"""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..ops import backends
from ..ops import shard_math as math
from ..parallel.comm import RankLayout, RowStatsExchange

_select = ops.Select()
_zeros_like = ops.ZerosLike()
_cast = ops.Cast()
_isfinite = ops.IsFinite()


class VocabParallelCrossEntropy(nn.Cell):
    """construct(logits (N, Vl), target, active (N,) bool) ->
    (token_loss, row_max, log_sum_exp, target_mass, local_nonfinite), each (N,) float32, and
    rank_widths (mp,): every model-parallel rank's logits width (token_loss is NaN if they differ).

    `target` is (N,) int32 class ids over the full vocabulary, or (N, Vl) probabilities of this slice.
    `token_loss` is 0 where `active` is False. Only `token_loss` is differentiable; the other outputs are
    statistics for reductions and checks (callers stop their gradients).
    """

    def __init__(self, layout: RankLayout, *, probability_targets: bool, weight: np.ndarray = None,
                 label_smoothing: float = 0.0, z_loss_weight: float = 0.0, logit_softcap=None,
                 backend: str = "auto", inplace: bool = False):
        super().__init__()
        self.mp_size = layout.mp_size
        self.mp_rank = layout.mp_rank
        self.probability_targets = probability_targets
        self.label_smoothing = float(label_smoothing)
        self.z_loss_weight = float(z_loss_weight)
        self.logit_softcap = None if logit_softcap is None else float(logit_softcap)
        kernels = backends.select(backend, inplace=inplace)
        self.backend = kernels.name
        self.inplace = kernels.inplace
        self.local_row_stats = kernels.local_row_stats
        self.logits_grad = kernels.logits_grad
        self.exchange = RowStatsExchange(layout)
        self.full_weight = weight
        self.weight = None
        if weight is not None:
            if weight.shape[0] % self.mp_size:
                raise ValueError(f"weight has {weight.shape[0]} classes, not divisible by "
                                 f"model_parallel={self.mp_size}")
            per_rank = weight.reshape(self.mp_size, -1)
            self.weight = Tensor(per_rank[self.mp_rank].copy())
            self.rank_weight_sums = Tensor(per_rank.astype(np.float64).sum(axis=1).astype(np.float32))
            self.weight_total = float(weight.astype(np.float64).sum())

    def _vocab(self, logits):
        local_vocab = logits.shape[-1]
        if self.full_weight is not None and self.full_weight.shape[0] != local_vocab * self.mp_size:
            raise ValueError(f"weight has {self.full_weight.shape[0]} classes but logits of width {local_vocab} "
                             f"on {self.mp_size} model-parallel ranks make a vocabulary of "
                             f"{local_vocab * self.mp_size}")
        return local_vocab * self.mp_size, local_vocab * self.mp_rank

    def _spec(self, vocab_start):
        return math.ShardSpec(vocab_start, self.logit_softcap, self.label_smoothing)

    def _weight_sums(self, local_vocab):
        if self.full_weight is None:
            return Tensor(np.full(self.mp_size, local_vocab, np.float32)), float(local_vocab * self.mp_size)
        return self.rank_weight_sums, self.weight_total

    def construct(self, logits, target, active):
        num_classes, vocab_start = self._vocab(logits)
        rank_weight_sums, weight_total = self._weight_sums(logits.shape[-1])
        local_vocab = logits.shape[-1]
        local = self.local_row_stats(logits, target, self.weight, self._spec(vocab_start))
        # Each rank only knows its own width: it rides along in the exchange as one extra row.
        width_row = ops.concat((ops.fill(ms.float32, (1, 1), float(local_vocab)),
                                ops.fill(ms.float32, (1, local.shape[-1] - 1), 0.0)), 1)
        gathered = self.exchange(ops.concat((local, width_row), 0))
        rank_widths = gathered[:, -1, 0]
        stats = math.combine_row_stats(gathered[:, :-1, :], rank_weight_sums)
        loss = math.token_loss(stats, self.label_smoothing, num_classes, weight_total, self.z_loss_weight)
        widths_agree = (rank_widths == float(local_vocab)).all()
        loss = _select(ops.logical_and(active, widths_agree), loss,
                       _select(active, ops.fill(ms.float32, loss.shape, float("nan")), _zeros_like(loss)))
        local_nonfinite = _cast(ops.logical_not(_isfinite(local).all(axis=-1)), ms.float32)
        return loss, stats["row_max"], stats["log_sum_exp"], stats["target_mass"], local_nonfinite, rank_widths

    def bprop(self, logits, target, active, out, dout):
        num_classes, vocab_start = self._vocab(logits)
        _, weight_total = self._weight_sums(logits.shape[-1])
        _, row_max, log_sum_exp, target_mass, _, _ = out
        upstream = _select(active, dout[0], _zeros_like(dout[0]))
        stats = {"row_max": row_max, "log_sum_exp": log_sum_exp, "target_mass": target_mass}
        a, b, q = math.grad_coefficients(stats, upstream, self.label_smoothing, num_classes, weight_total,
                                         self.z_loss_weight)
        grad = self.logits_grad(logits, target, self.weight, self._spec(vocab_start), row_max, log_sum_exp,
                                (a, b, q))
        return grad, _zeros_like(target), _zeros_like(active)
