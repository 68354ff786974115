"""The loss options users set, validated once, with messages that name the argument."""
import difflib
from dataclasses import dataclass
from typing import Optional

import numpy as np

REDUCTIONS = ("mean", "sum", "none")
EMPTY_MEANS = ("zero", "nan")
BACKENDS = ("auto", "fused", "composed")


@dataclass(frozen=True)
class LossOptions:
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss_weight: float = 0.0
    logit_softcap: Optional[float] = None
    empty_mean: str = "zero"
    backend: str = "auto"
    inplace_backward: bool = False

    def __post_init__(self):
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("empty_mean", self.empty_mean, EMPTY_MEANS)
        if not isinstance(self.label_smoothing, (int, float)) or not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1], got {self.label_smoothing!r}")
        if not isinstance(self.z_loss_weight, (int, float)) or not self.z_loss_weight >= 0.0:
            raise ValueError(f"z_loss_weight must be a float >= 0, got {self.z_loss_weight!r}")
        if self.logit_softcap is not None and (not isinstance(self.logit_softcap, (int, float))
                                               or not self.logit_softcap > 0):
            raise ValueError(f"logit_softcap must be None or a float > 0, got {self.logit_softcap!r}")
        if not isinstance(self.inplace_backward, (bool, np.bool_)):
            raise TypeError(f"inplace_backward must be a bool, got {self.inplace_backward!r}")
        check_backend(self.backend, self.inplace_backward)


def check_backend(backend, inplace_backward=False) -> None:
    """The one check of the backend choice (used by LossOptions and by `ops.backends.select`)."""
    _check_choice("backend", backend, BACKENDS)
    if inplace_backward and backend == "composed":
        raise ValueError("inplace_backward=True needs the fused kernels (backend='fused', or 'auto' on CPU), "
                         "got backend='composed'")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def class_weight_array(weight, num_classes_hint=None) -> Optional[np.ndarray]:
    """`weight` (V,) as float32 NumPy, checked: 1-D, finite, non-negative, not all zero."""
    if weight is None:
        return None
    array = weight.asnumpy() if hasattr(weight, "asnumpy") else np.asarray(weight)
    array = array.astype(np.float32)
    if array.ndim != 1:
        raise ValueError(f"weight must have shape (V,) for the whole vocabulary, got shape {array.shape}")
    if num_classes_hint is not None and array.shape[0] != num_classes_hint:
        raise ValueError(f"weight has {array.shape[0]} entries but the vocabulary has {num_classes_hint} classes")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        bad = int(np.flatnonzero(~np.isfinite(array) | (array < 0))[0])
        raise ValueError(f"weight must be finite and >= 0, got weight[{bad}] = {array[bad]}")
    return array


def check_chunk_size(chunk_size) -> None:
    """chunk_size: None (chosen from a memory budget) or a positive int of rows per chunk."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int (rows per chunk), got {chunk_size!r}")


def reject_typos(kwargs: dict, known, owner: str = "CrossEntropyLoss") -> list:
    """Raise on keyword arguments that look like misspellings of ours; return the others (ignored, as
    MindFormers passes model-level keys through to its losses)."""
    ignored = []
    for key in kwargs:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if close:
            raise TypeError(f"{owner} got an unknown argument {key!r}; did you mean {close[0]!r}?")
        ignored.append(key)
    return ignored
