"""`CrossEntropyLoss`: MindFormers' loss API as a thin cell over the functional core and a vocab-parallel core.

`LossCell` is what both loss cells share: the options, the rank layout, the diagnostics, the checks run
when the cell is called from Python, and the output format (MindFormers': the mean, or (numerator,
denominator) per token, plus the z-loss term when asked).
"""
import mindspore as ms
from mindspore import Tensor, nn, ops

from .. import functional as F
from ..options import LossOptions
from ..parallel.comm import RankLayout, rank_layout
from ..parallel.config import as_parallel_config, default_dpmp_config
from ..registry import register_loss
from .diagnostics import LossDiagnostics, NonFiniteLossError
from .semi_auto import SemiAutoCrossEntropy, parallel_mode_is_semi_auto
from .outputs import LOCAL_NONFINITE, LOG_SUM_EXP, RANK_WIDTHS, ROW_MAX, TARGET_MASS, TOKEN_LOSS
from .vocab_parallel import VocabParallelCrossEntropy

__all__ = ["CrossEntropyLoss", "LossCell", "NonFiniteLossError"]

_select = ops.Select()
_zeros_like = ops.ZerosLike()
_cast = ops.Cast()
_stop = ops.stop_gradient

class LossCell(nn.Cell):
    """Options, layout, diagnostics and output format shared by the loss cells (see the module docstring)."""

    def __init__(self, options, parallel_config, ignored_kwargs: list, layout=None):
        super().__init__()
        self.ignored_kwargs = ignored_kwargs
        self.parallel_config = as_parallel_config(parallel_config)
        self.options = options
        # (semi-auto mode's layout is one logical rank: MindSpore splits the vocabulary itself)
        if layout is not None and layout.mp_size != self.parallel_config.model_parallel and \
                not parallel_mode_is_semi_auto():
            raise ValueError(f"layout has mp_size={layout.mp_size} but parallel_config has model_parallel="
                             f"{self.parallel_config.model_parallel}")
        self.layout = layout if layout is not None else rank_layout(self.parallel_config)
        self.diagnostics = LossDiagnostics(self.layout)
        # plain attributes for construct: GRAPH mode folds them in as constants
        self.check_for_nan = bool(options.check_for_nan_in_loss_and_grad)
        self.per_token = bool(options.per_token)
        self.return_z_loss = bool(options.return_z_loss)
        self.ignore_index = options.ignore_index
        self.reduction = options.reduction
        self.empty_mean_nan = options.empty_mean == "nan"
        self.z_loss_weight = options.z_loss_weight

    def finish(self, token_loss, denominator, rows, counted, mask, leading_shape):
        """Records the checks and reduces: the tail of every call. `rows` is a core's per-token tuple;
        returns (loss, denominator, z_loss), the fields of `LossOutput` (a plain tuple in the graph: see
        nn.outputs' note on NamedTuples)."""
        row_max, log_sum_exp = _stop(rows[ROW_MAX]), _stop(rows[LOG_SUM_EXP])
        if self.check_for_nan:
            self.diagnostics.record_nonfinite(token_loss, row_max + log_sum_exp, counted,
                                              _stop(rows[LOCAL_NONFINITE]))
        self.diagnostics.record_widths(rows[RANK_WIDTHS])
        reduce_options = dict(reduction=self.reduction, per_token=self.per_token, empty_mean_nan=self.empty_mean_nan,
                              leading_shape=leading_shape)
        loss = F.reduce_tokens(token_loss, denominator, **reduce_options)
        z_loss = F.reduce_tokens(F.z_loss_tokens(row_max, log_sum_exp, counted, mask, self.z_loss_weight),
                                 denominator, **reduce_options)
        if self.per_token:
            loss, z_loss = loss[0], z_loss[0]
        return loss, _stop(denominator), z_loss

    def empty_result(self, leading_shape):
        """No rows at all: nothing to compute (MindSpore's CPU reductions refuse empty inputs), the loss of
        an empty batch and zero gradients (the inputs do not reach the result)."""
        zero = ops.zeros((), ms.float32)
        if self.reduction == "none" and not self.per_token:
            empty = ops.zeros(leading_shape, ms.float32)
            return empty, zero, empty
        if self.reduction == "mean" and not self.per_token:
            empty_value = ops.fill(ms.float32, (), float("nan") if self.empty_mean_nan else 0.0)
            return empty_value, zero, empty_value
        return zero, zero, zero

    def formatted(self, out):
        loss, denominator, z_loss = out
        result = (loss, denominator) if self.per_token else loss
        if self.return_z_loss:
            return result, z_loss
        return result

    def check_finite(self):
        """Host-side check of every call since the last check (call it after each step in GRAPH mode):
        raises NonFiniteLossError naming this rank and the number of non-finite tokens, and ValueError when
        the model-parallel ranks' logits widths disagree."""
        self.diagnostics.check_finite()

    @property
    def nonfinite_counts(self):
        return self.diagnostics.nonfinite_counts

    @property
    def rank_widths(self):
        return self.diagnostics.rank_widths

    def checked_call(self, call, validate, label, local_vocab, *args):
        """Runs `call(*args)` from Python with the host-side checks around it. In GRAPH mode the shapes are
        validated here first for clean messages (inside a bigger compiled graph the same function runs at
        compile time); in PYNATIVE construct validates as it runs, then labels, widths and NaNs are checked.
        `args` go on exactly as the caller gave them: PYNATIVE's autodiff matches the top cell by them."""
        eager = ms.get_context("mode") == ms.PYNATIVE_MODE
        if not eager and all(isinstance(a, Tensor) or a is None for a in args):
            validate(*args)
        result = call(*args)
        if eager:
            if isinstance(label, Tensor) and label.dtype in F.INT_DTYPES and label.size > 0:
                self.diagnostics.check_labels(label, self.ignore_index, local_vocab)
            self.diagnostics.check_rank_widths()
            if self.check_for_nan:
                self.check_finite()
        return result


def _validate_logits_call(logits, label, input_mask=None):
    F.check_logits_call(logits.shape, logits.dtype, label.shape, label.dtype,
                        None if input_mask is None else input_mask.shape)


@register_loss
class CrossEntropyLoss(LossCell):
    """Cross entropy over a vocabulary split across model-parallel ranks, with MindFormers' API.

    Args:
        parallel_config: layout of ranks (ParallelConfig, dict, or object with data_parallel/model_parallel).
        check_for_nan_in_loss_and_grad, calculate_per_token_loss, seq_split_num: MindFormers' positional
            arguments, and the keyword options ignore_index, weight, reduction, label_smoothing, z_loss_weight,
            return_z_loss, logit_softcap, empty_mean, backend, chunk_size, inplace_backward: each is
            documented and checked in `mf_loss.options.LossOptions` (and its base `CommonOptions`). Other keyword
            arguments are ignored (MindFormers passes model-level keys through to its losses), but one that
            looks like a misspelling of an option raises TypeError.
        layout: where this process sits (`mf_loss.parallel.comm.RankLayout`); None (the default) finds it from
            parallel_config and mindspore.communication. Tests give a layout that runs every model-parallel
            rank in one process (its `all_reduce_sum` adds up what each rank hands it).
    Inputs:
        logits (N, V/mp) or (B, S, V/mp): this rank's vocabulary slice, float32/float16/bfloat16.
        label: (N,) or (B, S) int class ids in [0, V) or ignore_index; or float probabilities of logits' shape.
        input_mask: None, or (N,), (N, 1), (B, S) bool/int/float weights of the tokens.
    """

    OPTIONS = LossOptions  # what the YAML loader checks a loss block of this class with

    def __init__(self, parallel_config=default_dpmp_config, check_for_nan_in_loss_and_grad=False,
                 calculate_per_token_loss=False, seq_split_num=1, *, layout=None, **kwargs):
        options, ignored = LossOptions.from_arguments(
            type(self).__name__, kwargs, check_for_nan_in_loss_and_grad=check_for_nan_in_loss_and_grad,
            calculate_per_token_loss=calculate_per_token_loss, seq_split_num=seq_split_num)
        # In semi-auto/auto parallel mode the cell sees the full logical logits and MindSpore shards them.
        semi_auto = parallel_mode_is_semi_auto()
        if semi_auto:
            options.check_semi_auto()
            layout = RankLayout(rank=0, dp_rank=0, mp_rank=0, mp_size=1, group="")
        super().__init__(options, parallel_config, ignored, layout)
        self.semi_auto = semi_auto
        if semi_auto:
            self.core = SemiAutoCrossEntropy(self.parallel_config.data_parallel,
                                             self.parallel_config.model_parallel, options)
        else:
            self.core = VocabParallelCrossEntropy(self.layout, options)

    def compute(self, logits, label, input_mask=None):
        probability_targets = F.check_logits_call(logits.shape, logits.dtype, label.shape, label.dtype,
                                                  None if input_mask is None else input_mask.shape)
        leading_shape = logits.shape[:-1]
        if len(logits.shape) != 2:
            # Only when needed: in PYNATIVE a reshape's backward copies the gradient (a second logits-sized buffer).
            logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[0] == 0:
            return self.empty_result(leading_shape)
        mask, counted = F.count_tokens(input_mask, logits.shape[0])
        if probability_targets:
            if self.semi_auto:
                raise ValueError("probability targets are not supported in semi_auto/auto parallel mode yet")
            rows = self.core(logits, label.reshape(-1, logits.shape[-1]), counted)
            loss = rows[TOKEN_LOSS]
            denominator_terms = mask
        else:
            target = _cast(label.reshape(-1), ms.int32)
            counted = ops.logical_and(counted, target != self.ignore_index)
            rows = self.core(logits, target, counted)
            outside = self.diagnostics.record_labels(target, self.ignore_index, logits.shape[-1] * self.layout.mp_size)
            loss = F.out_of_range_nan(rows[TOKEN_LOSS], ops.logical_and(counted, outside))
            denominator_terms = _stop(rows[TARGET_MASS]) * mask
        token_loss = _select(counted, loss * mask, _zeros_like(loss))
        denominator = _select(counted, denominator_terms, _zeros_like(mask)).sum()
        return self.finish(token_loss, denominator, rows, counted, mask, leading_shape)

    def construct(self, logits, label, input_mask=None):
        return self.formatted(self.compute(logits, label, input_mask))

    def __call__(self, logits, label, *mask):
        local_vocab = logits.shape[-1] if isinstance(logits, Tensor) else 0
        return self.checked_call(super().__call__, _validate_logits_call, label, local_vocab, logits, label, *mask)

    def outputs(self, logits, label, input_mask=None) -> F.LossOutput:
        """The named `LossOutput` of one call (what `mf_loss.functional.cross_entropy` returns)."""
        local_vocab = logits.shape[-1]
        return F.LossOutput(*self.checked_call(self.compute, _validate_logits_call, label, local_vocab, logits, label,
                                               input_mask))
