"""The one-call forms (like torch.nn.functional): `cross_entropy` and `linear_cross_entropy` build the cell once
per set of options and return its named `LossOutput`."""
from .. import functional as F
from .linear_loss import LinearCrossEntropyLoss
from .loss import CrossEntropyLoss

_cells = {}


def _cached(cls, options: dict):
    """One loss cell per class and options (cells hold the per-rank weight slice and the counters)."""
    key = (cls.__name__, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _cells:
        _cells[key] = cls(**options)
    return _cells[key]


def cross_entropy(logits, label, input_mask=None, **options) -> F.LossOutput:
    """`CrossEntropyLoss(**options)` as a function returning the named `LossOutput` (loss, denominator,
    z-loss term); the cell is built once per set of options. For eager use (PYNATIVE) or a whole `ms.jit`
    step; inside a cell's construct hold a `CrossEntropyLoss` instead."""
    return _cached(CrossEntropyLoss, options).outputs(logits, label, input_mask)


def linear_cross_entropy(hidden, head_weight, label, input_mask=None, **options) -> F.LossOutput:
    """`LinearCrossEntropyLoss(**options)` as a function returning `LossOutput` (see `cross_entropy`)."""
    return _cached(LinearCrossEntropyLoss, options).outputs(hidden, head_weight, label, input_mask)
