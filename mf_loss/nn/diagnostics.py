"""What a loss checks besides computing: non-finite rows, the ranks' logits widths, labels out of range.

Recorded on the device inside the loss's graph (GRAPH mode cannot raise there), checked on the host:
after every call in PYNATIVE, by `check_finite()` after each step in GRAPH mode. Nothing here changes a
loss value; the loss itself turns what it cannot compute into NaN, never into a wrong number.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..parallel.comm import RankLayout

_cast = ops.Cast()
_isfinite = ops.IsFinite()


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient was found by `check_for_nan_in_loss_and_grad`."""


class LossDiagnostics(nn.Cell):
    """Device-side counters of one loss cell and their host-side checks."""

    def __init__(self, layout: RankLayout):
        super().__init__()
        self.layout = layout
        # [non-finite rows, of them masked out, of them non-finite in this rank's slice]; accumulated over
        # calls until check_finite() reads them, so a step of several micro-batches is checked whole
        self.nonfinite_counts = Parameter(Tensor(np.zeros(3, np.int32)), name="nonfinite_counts",
                                          requires_grad=False)
        # every model-parallel rank's logits width, as seen in the last exchange
        self.rank_widths = Parameter(Tensor(np.zeros(layout.mp_size, np.int32)), name="rank_widths",
                                     requires_grad=False)
        # labels of the last call outside [0, V) that are not ignore_index (masked or not)
        self.bad_labels = Parameter(Tensor(np.zeros(1, np.int32)), name="bad_labels", requires_grad=False)

    # ---- inside the graph ----

    def record_widths(self, rank_widths):
        if self.layout.mp_size > 1:
            ops.assign(self.rank_widths, _cast(rank_widths, ms.int32))
        return rank_widths

    def record_labels(self, target, ignore_index: int, num_classes: int):
        outside = ops.logical_and(target != ignore_index, ops.logical_or(target < 0, target >= num_classes))
        ops.assign(self.bad_labels, _cast(_cast(outside, ms.int32).sum(), ms.int32).reshape(1))
        return outside

    def record_nonfinite(self, token_loss, lse, counted, local_nonfinite):
        # Non-finite lse makes the row's gradient non-finite; a non-finite counted loss is the loss itself.
        # Masked-out rows are counted too: a NaN under a mask is still a NaN in the model.
        bad = ops.logical_or(ops.logical_not(_isfinite(lse)),
                             ops.logical_and(counted, ops.logical_not(_isfinite(token_loss))))
        bad_i = _cast(bad, ms.int32)
        counts = ops.stack([bad_i.sum(), (bad_i * _cast(ops.logical_not(counted), ms.int32)).sum(),
                            (bad_i * _cast(local_nonfinite > 0, ms.int32)).sum()])
        ops.assign_add(self.nonfinite_counts, _cast(counts, ms.int32))
        return counts

    # ---- on the host ----

    def check_finite(self):
        """Raises NonFiniteLossError naming this rank and the number of non-finite tokens of every call since
        the last check, and ValueError when the model-parallel ranks' logits widths disagree."""
        self.check_rank_widths()
        bad, masked, local = (int(v) for v in self.nonfinite_counts.asnumpy())
        if bad:
            self.nonfinite_counts.set_data(Tensor(np.zeros(3, np.int32)))
            raise NonFiniteLossError(
                f"non-finite loss or gradient on {self.layout.describe()}: {bad} token(s) "
                f"({masked} of them masked out); {local} of them non-finite in this rank's own vocabulary "
                "slice")

    def check_rank_widths(self):
        if self.layout.mp_size == 1:
            return
        widths = self.rank_widths.asnumpy()
        mine = widths[self.layout.mp_rank]
        other = next((r for r, w in enumerate(widths) if w != mine), None)
        if other is not None:
            raise ValueError(f"logits width differs between model-parallel ranks: {self.layout.describe()} has "
                             f"{mine} columns, mp rank {other} has {widths[other]}; every rank must hold V/mp "
                             "columns of the vocabulary")

    def check_labels(self, label, ignore_index: int, local_vocab: int):
        """Raises ValueError with the first bad position and value when the last call saw labels outside
        [0, V) that are not ignore_index. Reads one counter; the labels only when something is wrong."""
        if int(self.bad_labels.asnumpy()[0]) == 0:
            return
        num_classes = local_vocab * self.layout.mp_size
        values = label.asnumpy()
        bad = (values != ignore_index) & ((values < 0) | (values >= num_classes))
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"label{list(position)} = {values[position]} is outside [0, {num_classes}) and is "
                         f"not ignore_index={ignore_index} (vocabulary of {num_classes} = "
                         f"{self.layout.mp_size} model-parallel ranks x {local_vocab} logits per rank); "
                         f"{int(bad.sum())} label(s) out of range in all")
