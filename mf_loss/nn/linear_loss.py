"""`LinearCrossEntropyLoss`: the lm head and the loss in one cell, exactly `CrossEntropyLoss` applied to
`hidden @ head_weight.T`, without ever holding the (N, V/mp) logits or their gradient.

A thin cell over the functional core and a chunked core (`linear_vocab_parallel`): it counts the tokens,
makes each token's weight in the loss (`row_scale`) before any logit exists, and reduces.
"""
import mindspore as ms
from mindspore import Tensor, ops

from .. import functional as F
from ..ops.modes import eager_without_grad
from ..options import HeadOptions
from ..parallel.config import default_dpmp_config
from ..registry import register_loss
from .linear_vocab_parallel import LinearVocabParallel
from .outputs import OBJECTIVE, PER_TOKEN_START, PER_TOKEN_STOP, TOKEN_LOSS
from .loss import LossCell
from .semi_auto import parallel_mode_is_semi_auto

_select = ops.Select()
_zeros_like = ops.ZerosLike()
_cast = ops.Cast()
_stop = ops.stop_gradient

def _validate_linear_call(hidden, head_weight, label, input_mask=None):
    F.check_linear_call(hidden.shape, hidden.dtype, head_weight.shape, head_weight.dtype, label.shape, label.dtype,
                        None if input_mask is None else input_mask.shape)


@register_loss
class LinearCrossEntropyLoss(LossCell):
    """The fused lm head + vocab-parallel cross entropy, with `CrossEntropyLoss`'s options and outputs.

    Args: every argument of `CrossEntropyLoss` (`layout` included) but `inplace_backward`, and the keyword
    options chunk_size (rows per chunk here), complete_hidden_grad and grad_mode: each is documented and checked
    in `mf_loss.options.HeadOptions` (and its base `CommonOptions`).
    Inputs:
        hidden (N, H) or (B, S, H): the lm head's input, the same on every model-parallel rank.
        head_weight (V/mp, H): this rank's rows of the output weight (classes [mp_rank*V/mp, (mp_rank+1)*V/mp)).
        label (N,) or (B, S): integer class ids in [0, V) or ignore_index (probability targets are refused:
            they are (N, V) themselves).
        input_mask: None, or (N,), (N, 1), (B, S) bool/int/float weights of the tokens.
    hidden and head_weight are float32, float16 or bfloat16; the maths runs in float32 and the gradients come
    back in their dtypes.
    """

    OPTIONS = HeadOptions  # what the YAML loader checks a loss block of this class with

    def __init__(self, parallel_config=default_dpmp_config, check_for_nan_in_loss_and_grad=False,
                 calculate_per_token_loss=False, seq_split_num=1, *, layout=None, **kwargs):
        if parallel_mode_is_semi_auto():
            raise ValueError("LinearCrossEntropyLoss runs in the explicit vocab-parallel mode (parallel_mode="
                             "'stand_alone' under msrun), not in semi_auto/auto parallel mode")
        options, ignored = HeadOptions.from_arguments(
            type(self).__name__, kwargs, check_for_nan_in_loss_and_grad=check_for_nan_in_loss_and_grad,
            calculate_per_token_loss=calculate_per_token_loss, seq_split_num=seq_split_num)
        super().__init__(options, parallel_config, ignored, layout)
        # every rank looks up the weight of any class for the denominator, which needs no logits
        self.class_weight = None if options.weight is None else Tensor(options.weight)
        self.core = LinearVocabParallel(self.layout, options)

    @property
    def backend(self):
        return self.core.backend

    def recomputes(self, weight_dtype) -> bool:
        """Whether a call with a head weight of `weight_dtype` makes its gradient in the backward (grad_mode)."""
        return self.core.recomputes(weight_dtype)

    def collectives_per_call(self, rows: int, local_vocab: int, weight_dtype=ms.float32) -> dict:
        """All-reduces one forward and backward issue on this layout (none when mp = 1), for the README and
        the benchmark: {"forward": n, "backward": n}."""
        if self.layout.mp_size == 1:
            return {"forward": 0, "backward": 0}
        forward = 1 if self.recomputes(weight_dtype) else max(len(self.core.bounds(rows, local_vocab)), 1)
        return {"forward": forward, "backward": 1 if self.core.complete_hidden_grad else 0}

    def compute(self, hidden, head_weight, label, input_mask=None):
        F.check_linear_call(hidden.shape, hidden.dtype, head_weight.shape, head_weight.dtype, label.shape,
                            label.dtype, None if input_mask is None else input_mask.shape)
        leading_shape = hidden.shape[:-1]
        num_classes, _ = self.core.vocab(head_weight.shape[0])  # also checks weight's length against V
        if len(hidden.shape) != 2:
            if hidden.dtype != ms.float32:
                hidden = _cast(hidden, ms.float32)  # MindSpore's CPU Reshape has no half kernel in GRAPH mode
            hidden = hidden.reshape(-1, hidden.shape[-1])
        rows = hidden.shape[0]
        if rows == 0:
            return self.empty_result(leading_shape)
        mask, counted = F.count_tokens(input_mask, rows)
        target = _cast(label.reshape(-1), ms.int32)
        counted = ops.logical_and(counted, target != self.ignore_index)
        outside = self.diagnostics.record_labels(target, self.ignore_index, num_classes)
        # each counted token's share of the denominator, w[y] * mask: known from the labels alone
        valid = ops.logical_and(target >= 0, target < num_classes)
        if self.class_weight is None:
            class_mass = _cast(valid, ms.float32)
        else:
            class_mass = _select(valid, ops.gather(self.class_weight, _select(valid, target, _zeros_like(target)), 0),
                                 ops.zeros((rows,), ms.float32))
        denominator = _select(counted, class_mass * mask, _zeros_like(mask)).sum()
        if self.reduction == "mean" and not self.per_token:
            _, divisor = F.safe_denominator(denominator)
            row_scale = mask / divisor
        else:
            row_scale = mask
        # a counted label outside [0, V) makes the loss NaN, never a silently wrong number
        row_scale = F.out_of_range_nan(_select(counted, row_scale, _zeros_like(row_scale)),
                                       ops.logical_and(counted, outside))
        evaluation = eager_without_grad()
        gradient_in_forward = not self.recomputes(head_weight.dtype) and not evaluation
        if evaluation:
            out = self.core.statistics(hidden, head_weight, target, row_scale, counted)
        else:
            out = self.core(hidden, head_weight, target, row_scale, counted)
        rows_out = out[PER_TOKEN_START:PER_TOKEN_STOP]
        loss = F.out_of_range_nan(rows_out[TOKEN_LOSS], ops.logical_and(counted, outside))
        token_loss = _select(counted, loss * mask, _zeros_like(loss))
        loss, denominator, z_loss = self.finish(token_loss, denominator, rows_out, counted, mask, leading_shape)
        if gradient_in_forward:
            # the core's objective carries the gradient: the same value, reduced as asked
            objective = out[OBJECTIVE]
            if self.reduction == "mean" and not self.per_token:
                nonempty, _ = F.safe_denominator(denominator)
                loss = _select(nonempty, objective, loss)
            else:
                loss = objective
        return loss, denominator, z_loss

    def construct(self, hidden, head_weight, label, input_mask=None):
        return self.formatted(self.compute(hidden, head_weight, label, input_mask))

    def __call__(self, hidden, head_weight, label, *mask):
        local_vocab = head_weight.shape[0] if isinstance(head_weight, Tensor) else 0
        return self.checked_call(super().__call__, _validate_linear_call, label, local_vocab, hidden, head_weight,
                                 label, *mask)

    def outputs(self, hidden, head_weight, label, input_mask=None) -> F.LossOutput:
        """The named `LossOutput` of one call (what `mf_loss.functional.linear_cross_entropy` returns)."""
        return F.LossOutput(*self.checked_call(self.compute, _validate_linear_call, label, head_weight.shape[0],
                                               hidden, head_weight, label, input_mask))
