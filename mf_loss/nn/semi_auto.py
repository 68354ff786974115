"""The per-token core for MindSpore's semi-auto / auto parallel mode (MindFormers' graph models).

There the cell sees the full logical logits (N, V); shard strategies `(dp, mp)` on its primitives let
MindSpore split the vocabulary and insert the reductions (max, sums) and their backward itself. Same
shifted statistics as `ops.shard_math`, but the target logit is picked with a boolean class match instead of
MindFormers' dense float one-hot, and ignored labels match no class.
"""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops



def parallel_mode_is_semi_auto() -> bool:
    return ms.get_auto_parallel_context("parallel_mode") in ("semi_auto_parallel", "auto_parallel")


class SemiAutoCrossEntropy(nn.Cell):
    """construct(logits (N, V), label (N,) int32, active (N,) bool) -> the per-token tuple of
    `VocabParallelCrossEntropy` (RANK_WIDTHS: the (1,) logits width of one logical slice), for a loss with
    `options` (`mf_loss.options`; `LossOptions.check_semi_auto` says which it cannot take)."""

    def __init__(self, data_parallel: int, model_parallel: int, options):
        super().__init__()
        dp, mp = data_parallel, model_parallel
        # plain attributes for construct: GRAPH mode folds them in as constants
        self.label_smoothing = float(options.label_smoothing)
        self.z_loss_weight = float(options.z_loss_weight)
        self.logit_softcap = None if options.logit_softcap is None else float(options.logit_softcap)
        self.cast = ops.Cast().shard(((dp, mp),))
        self.tanh = ops.Tanh().shard(((dp, mp),))
        self.scale = ops.Mul().shard(((dp, mp), ()))
        self.row_max = ops.ReduceMax(keep_dims=True).shard(((dp, mp),))
        self.shift = ops.Sub().shard(((dp, mp), (dp, 1)))
        self.exp = ops.Exp().shard(((dp, mp),))
        self.row_sum = ops.ReduceSum(keep_dims=True).shard(((dp, mp),))
        self.log = ops.Log().shard(((dp, 1),))
        # (1, V) class ids against (N, 1) labels: a bool (N, V) match, 1 byte per entry, never a float one-hot
        self.not_target = ops.NotEqual().shard(((1, mp), (dp, 1)))
        self.zero_where = ops.MaskedFill().shard(((dp, mp), (dp, mp), ()))
        self.select = ops.Select()

    def construct(self, logits, label, active):
        num_classes = logits.shape[-1]
        x = self.cast(logits, ms.float32)
        if self.logit_softcap is not None:
            x = self.scale(self.tanh(self.scale(x, 1.0 / self.logit_softcap)), self.logit_softcap)
        row_max = ops.stop_gradient(self.row_max(x, -1))
        shifted = self.shift(x, row_max)
        log_sum_exp = self.log(self.row_sum(self.exp(shifted), -1))
        class_ids = Tensor(np.arange(num_classes, dtype=np.int32).reshape(1, -1))
        target_shifted = self.row_sum(self.zero_where(shifted, self.not_target(class_ids, label.reshape(-1, 1)),
                                                      Tensor(0.0, ms.float32)), -1)
        loss = log_sum_exp - target_shifted
        if self.label_smoothing > 0:
            smooth = num_classes * log_sum_exp - self.row_sum(shifted, -1)
            loss = (1.0 - self.label_smoothing) * loss + (self.label_smoothing / num_classes) * smooth
        if self.z_loss_weight > 0:
            lse = row_max + log_sum_exp
            loss = loss + self.z_loss_weight * lse * lse
        loss = loss.reshape(-1)
        loss = self.select(active, loss, ops.zeros_like(loss))
        target_mass = ops.ones_like(loss)
        return (loss, row_max.reshape(-1), ops.stop_gradient(log_sum_exp.reshape(-1)), target_mass,
                ops.zeros_like(loss), ops.fill(ms.float32, (1,), float(num_classes)))
