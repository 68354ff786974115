"""`CrossEntropyLoss`: MindFormers' loss API over the vocab-parallel core."""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..options import LossOptions, class_weight_array, reject_typos
from ..parallel.comm import RankLayout, rank_layout
from ..parallel.config import as_parallel_config, default_dpmp_config
from ..registry import register_loss
from .semi_auto import SemiAutoCrossEntropy, parallel_mode_is_semi_auto
from .vocab_parallel import VocabParallelCrossEntropy

_select = ops.Select()
_zeros_like = ops.ZerosLike()
_cast = ops.Cast()
_isfinite = ops.IsFinite()
_stop = ops.stop_gradient

_FLOAT_DTYPES = (ms.float32, ms.float16, ms.bfloat16)
_INT_DTYPES = (ms.int32, ms.int64, ms.int16, ms.int8, ms.uint8)
_OWN_ARGS = ("parallel_config", "check_for_nan_in_loss_and_grad", "calculate_per_token_loss", "seq_split_num",
             "ignore_index", "weight", "reduction", "label_smoothing", "z_loss_weight", "return_z_loss",
             "logit_softcap", "empty_mean", "backend", "inplace_backward")


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient was found by `check_for_nan_in_loss_and_grad`."""


def check_call_shapes(logits_shape, logits_dtype, label_shape, label_dtype, mask_shape):
    """Validate one call's shapes and dtypes; returns True when `label` holds probability targets.

    Plain Python on shapes: MindSpore runs it at compile time in GRAPH mode, so it raises there too.
    """
    if logits_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits_dtype}")
    if len(logits_shape) not in (2, 3):
        raise ValueError(f"logits must have shape (N, V/mp) or (B, S, V/mp), got {logits_shape}")
    rows = 1
    for size in logits_shape[:-1]:
        rows *= size
    probability_targets = label_dtype in _FLOAT_DTYPES
    if probability_targets:
        if tuple(label_shape) != tuple(logits_shape):
            raise ValueError(f"float label is read as probability targets and must have the logits' shape "
                             f"{logits_shape} (each rank its vocabulary slice), got {label_shape}; class "
                             "ids must be an integer tensor")
    elif label_dtype not in _INT_DTYPES:
        raise TypeError(f"label must be integer class ids or float probabilities, got {label_dtype}")
    elif tuple(label_shape) not in (tuple(logits_shape[:-1]), (rows,)):
        expected = f"{tuple(logits_shape[:-1])}" if len(logits_shape) == 2 else f"{tuple(logits_shape[:-1])} or ({rows},)"
        raise ValueError(f"label must have shape {expected} to match logits {logits_shape}, got {label_shape}")
    if mask_shape is not None:
        allowed = (tuple(logits_shape[:-1]), (rows, 1)) if len(logits_shape) == 2 else \
            (tuple(logits_shape[:-1]), (rows,), (rows, 1))
        if tuple(mask_shape) not in allowed:
            raise ValueError(f"input_mask must have shape {' or '.join(map(str, allowed))} to match logits "
                             f"{logits_shape}, got {mask_shape}")
    return probability_targets


@register_loss
class CrossEntropyLoss(nn.Cell):
    """Cross entropy over a vocabulary split across model-parallel ranks, with MindFormers' API.

    Args:
        parallel_config: layout of ranks (ParallelConfig, dict, or object with data_parallel/model_parallel).
        check_for_nan_in_loss_and_grad: find non-finite loss/gradient rows; raise in PYNATIVE, record for
            `check_finite()` in GRAPH.
        calculate_per_token_loss: return (sum of masked token losses, denominator) instead of the mean.
        seq_split_num: MindFormers' sequence split; > 1 implies per-token loss, as in MindFormers.
        ignore_index: label value that counts for nothing (loss, denominator, gradient).
        weight: per-class weights (V,) for the whole vocabulary.
        reduction: "mean", "sum" or "none" (per-token, with the input's leading shape).
        label_smoothing: eps in [0, 1], PyTorch's formula over the full vocabulary.
        z_loss_weight: adds z_loss_weight * lse^2 per token.
        return_z_loss: also return the z-loss term alone (no gradient), reduced like the loss.
        logit_softcap: applies cap * tanh(x / cap) to the logits first.
        empty_mean: what "mean" returns when nothing counts: "zero" or "nan" (PyTorch).
        backend: "auto", "fused" (C++ kernel, CPU) or "composed" (MindSpore ops).
        inplace_backward: the backward writes the gradient over the logits' buffer (fused only): saves a
            logits-sized buffer, but the logits hold the gradient afterwards (see README, "In-place backward").
    Inputs:
        logits (N, V/mp) or (B, S, V/mp): this rank's vocabulary slice, float32/float16/bfloat16.
        label: (N,) or (B, S) int class ids in [0, V) or ignore_index; or float probabilities of logits' shape.
        input_mask: None, or (N,), (N, 1), (B, S) bool/int/float weights of the tokens.
    """

    def __init__(self, parallel_config=default_dpmp_config, check_for_nan_in_loss_and_grad=False,
                 calculate_per_token_loss=False, seq_split_num=1, *, ignore_index=-100, weight=None,
                 reduction="mean", label_smoothing=0.0, z_loss_weight=0.0, return_z_loss=False,
                 logit_softcap=None, empty_mean="zero", backend="auto", inplace_backward=False, **kwargs):
        super().__init__()
        self.ignored_kwargs = reject_typos(kwargs, _OWN_ARGS)
        self.parallel_config = as_parallel_config(parallel_config)
        self.options = LossOptions(ignore_index=int(ignore_index), reduction=reduction,
                                   label_smoothing=float(label_smoothing), z_loss_weight=float(z_loss_weight),
                                   logit_softcap=logit_softcap, empty_mean=empty_mean, backend=backend,
                                   inplace_backward=inplace_backward)
        if not isinstance(seq_split_num, int) or seq_split_num < 1:
            raise ValueError(f"seq_split_num must be a positive int, got {seq_split_num!r}")
        # In semi-auto/auto parallel mode the cell sees the full logical logits and MindSpore shards them.
        self.semi_auto = parallel_mode_is_semi_auto()
        self.layout = (RankLayout(rank=0, dp_rank=0, mp_rank=0, mp_size=1, group="") if self.semi_auto
                       else rank_layout(self.parallel_config))
        self.check_for_nan = bool(check_for_nan_in_loss_and_grad)
        self.per_token = bool(calculate_per_token_loss) or seq_split_num > 1
        self.return_z_loss = bool(return_z_loss)
        # plain attributes for construct: GRAPH mode folds them in as constants
        self.ignore_index = self.options.ignore_index
        self.reduction = self.options.reduction
        self.empty_mean_nan = self.options.empty_mean == "nan"
        core_args = dict(weight=class_weight_array(weight), label_smoothing=self.options.label_smoothing,
                         z_loss_weight=self.options.z_loss_weight, logit_softcap=logit_softcap, backend=backend,
                         inplace=self.options.inplace_backward)
        if self.semi_auto:
            if self.options.inplace_backward:
                raise ValueError("inplace_backward=True is not supported in semi_auto/auto parallel mode (it uses "
                                 "MindSpore's own sharded ops); use the explicit vocab-parallel mode")
            if weight is not None:
                raise ValueError("weight is not supported in semi_auto/auto parallel mode yet; use the explicit "
                                 "vocab-parallel mode (parallel_mode='stand_alone' under msrun)")
            self.class_index_core = SemiAutoCrossEntropy(
                self.parallel_config.data_parallel, self.parallel_config.model_parallel,
                label_smoothing=self.options.label_smoothing, z_loss_weight=self.options.z_loss_weight,
                logit_softcap=logit_softcap)
            self.probability_core = None
        else:
            self.class_index_core = VocabParallelCrossEntropy(self.layout, probability_targets=False, **core_args)
            self.probability_core = VocabParallelCrossEntropy(self.layout, probability_targets=True, **core_args)
        # [non-finite rows, of them masked out, of them non-finite in this rank's slice]
        self.nonfinite_counts = Parameter(Tensor(np.zeros(3, np.int32)), name="nonfinite_counts",
                                          requires_grad=False)
        # every model-parallel rank's logits width, as seen in the last exchange
        self.rank_widths = Parameter(Tensor(np.zeros(self.layout.mp_size, np.int32)), name="rank_widths",
                                     requires_grad=False)

    def construct(self, logits, label, input_mask=None):
        mask_shape = None if input_mask is None else input_mask.shape
        probability_targets = check_call_shapes(logits.shape, logits.dtype, label.shape, label.dtype, mask_shape)
        leading_shape = logits.shape[:-1]
        if len(logits.shape) != 2:
            # Only when needed: in PYNATIVE a reshape's backward copies the gradient (2x the logits at peak).
            logits = logits.reshape(-1, logits.shape[-1])
        rows = logits.shape[0]
        mask = (ops.ones((rows,), ms.float32) if input_mask is None
                else _cast(input_mask.reshape(-1), ms.float32))
        counted = mask != 0
        if probability_targets:
            if self.probability_core is None:
                raise ValueError("probability targets are not supported in semi_auto/auto parallel mode yet")
            target = label.reshape(-1, logits.shape[-1])
            loss, row_max, log_sum_exp, target_mass, local_nonfinite, rank_widths = self.probability_core(
                logits, target, counted)
            denominator_terms = mask
        else:
            target = _cast(label.reshape(-1), ms.int32)
            counted = ops.logical_and(counted, target != self.ignore_index)
            loss, row_max, log_sum_exp, target_mass, local_nonfinite, rank_widths = self.class_index_core(
                logits, target, counted)
            # A label outside [0, V) must never pass silently: its token loss becomes NaN (PYNATIVE raises
            # earlier with the position and value).
            num_classes = logits.shape[-1] * self.layout.mp_size
            out_of_range = ops.logical_and(counted, ops.logical_or(target < 0, target >= num_classes))
            loss = _select(out_of_range, ops.fill(ms.float32, loss.shape, float("nan")), loss)
            denominator_terms = _stop(target_mass) * mask
        if self.layout.mp_size > 1:
            ops.assign(self.rank_widths, _cast(rank_widths, ms.int32))
        token_loss = _select(counted, loss * mask, _zeros_like(loss))
        denominator = _select(counted, denominator_terms, _zeros_like(mask)).sum()
        row_max, log_sum_exp = _stop(row_max), _stop(log_sum_exp)
        if self.check_for_nan:
            self._record_nonfinite(token_loss, row_max + log_sum_exp, counted, _stop(local_nonfinite))
        result = self._reduce(token_loss, denominator, leading_shape)
        if self.return_z_loss:
            lse = row_max + log_sum_exp
            z_loss = _select(counted, self.options.z_loss_weight * lse * lse * mask, _zeros_like(lse))
            return result, self._reduce(z_loss, denominator, leading_shape)
        return result

    def _reduce(self, token_loss, denominator, leading_shape):
        if self.per_token:
            return token_loss.sum(), denominator
        if self.reduction == "none":
            return token_loss.reshape(leading_shape)
        total = token_loss.sum()
        if self.reduction == "sum":
            return total
        nonempty = denominator > 0
        # Guard the division itself, not only its result: the gradient of x / 0 is inf, and inf * 0 = NaN.
        safe_denominator = _select(nonempty, denominator, ops.ones_like(denominator))
        empty_value = float("nan") if self.empty_mean_nan else 0.0
        return _select(nonempty, total / safe_denominator, ops.fill(ms.float32, (), empty_value))

    def _record_nonfinite(self, token_loss, lse, counted, local_nonfinite):
        # Non-finite lse makes the row's gradient non-finite; a non-finite counted loss is the loss itself.
        # Masked-out rows are counted too: a NaN under a mask is still a NaN in the model.
        bad = ops.logical_or(ops.logical_not(_isfinite(lse)),
                             ops.logical_and(counted, ops.logical_not(_isfinite(token_loss))))
        bad_i = _cast(bad, ms.int32)
        counts = ops.stack([bad_i.sum(), (bad_i * _cast(ops.logical_not(counted), ms.int32)).sum(),
                            (bad_i * _cast(local_nonfinite > 0, ms.int32)).sum()])
        # Accumulated until check_finite() reads it: a step of several micro-batches is checked whole.
        ops.assign_add(self.nonfinite_counts, _cast(counts, ms.int32))

    def check_finite(self):
        """Host-side check of every call since the last check (call it after each step in GRAPH mode):
        raises NonFiniteLossError naming this rank and the number of non-finite tokens, and ValueError when
        the model-parallel ranks' logits widths disagree."""
        self._check_rank_widths()
        bad, masked, local = (int(v) for v in self.nonfinite_counts.asnumpy())
        if bad:
            self.nonfinite_counts.set_data(Tensor(np.zeros(3, np.int32)))
            layout = self.layout
            raise NonFiniteLossError(
                f"non-finite loss or gradient on {layout.describe()}: {bad} token(s) "
                f"({masked} of them masked out); {local} of them non-finite in this rank's own vocabulary "
                "slice")

    def _check_rank_widths(self):
        if self.layout.mp_size == 1:
            return
        widths = self.rank_widths.asnumpy()
        mine = widths[self.layout.mp_rank]
        other = next((r for r, w in enumerate(widths) if w != mine), None)
        if other is not None:
            raise ValueError(f"logits width differs between model-parallel ranks: {self.layout.describe()} has "
                             f"{mine} columns, mp rank {other} has {widths[other]}; every rank must hold V/mp "
                             "columns of the vocabulary")

    def __call__(self, *args, **kwargs):
        # Runs only when the loss is called from Python (PYNATIVE, or a top-level GRAPH call): clean
        # messages first; inside a bigger compiled graph the same checks run at compile time in construct.
        self._check_call(*args, **kwargs)
        eager = ms.get_context("mode") == ms.PYNATIVE_MODE
        if eager:
            self._check_labels_eagerly(*args, **kwargs)
        result = super().__call__(*args, **kwargs)
        if eager:
            self._check_rank_widths()
            if self.check_for_nan:
                self.check_finite()
        return result

    @staticmethod
    def _check_call(logits, label, input_mask=None):
        if isinstance(logits, Tensor) and isinstance(label, Tensor):
            check_call_shapes(logits.shape, logits.dtype, label.shape, label.dtype,
                              input_mask.shape if isinstance(input_mask, Tensor) else None)

    def _check_labels_eagerly(self, logits, label, input_mask=None):
        if not isinstance(label, Tensor) or not isinstance(logits, Tensor) or label.dtype in _FLOAT_DTYPES:
            return
        num_classes = logits.shape[-1] * self.layout.mp_size
        values = label.asnumpy()
        bad = (values != self.ignore_index) & ((values < 0) | (values >= num_classes))
        if bad.any():
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"label{list(position)} = {values[position]} is outside [0, {num_classes}) and is "
                             f"not ignore_index={self.ignore_index} (vocabulary of {num_classes} = "
                             f"{self.layout.mp_size} model-parallel ranks x {logits.shape[-1]} logits per rank); "
                             f"{int(bad.sum())} label(s) out of range in all")
