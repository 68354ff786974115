"""Every option of the loss cells, checked once, here, with messages that name the argument.

`LossOptions` holds `CrossEntropyLoss`'s options and `HeadOptions` `LinearCrossEntropyLoss`'s (both add their
own to `CommonOptions`); the cells build one from their arguments, and the YAML loader (`mf_loss.config_loader`) checks a loss block with
the same classes. A new option is a field here, with its check in `__post_init__`.
"""
import difflib
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np

REDUCTIONS = ("mean", "sum", "none")
EMPTY_MEANS = ("zero", "nan")
BACKENDS = ("auto", "fused", "composed")
GRAD_MODES = ("auto", "forward", "recompute")


@dataclass(frozen=True)
class CommonOptions:
    """The options both loss cells take (`CrossEntropyLoss`'s docstring says what each does). `weight` is kept as
    the checked float32 (V,) array (or None)."""

    check_for_nan_in_loss_and_grad: bool = False
    calculate_per_token_loss: bool = False
    seq_split_num: int = 1
    ignore_index: int = -100
    weight: Optional[np.ndarray] = field(default=None, compare=False)
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss_weight: float = 0.0
    return_z_loss: bool = False
    logit_softcap: Optional[float] = None
    empty_mean: str = "zero"
    backend: str = "auto"
    chunk_size: Optional[int] = None

    def __post_init__(self):
        for name in ("check_for_nan_in_loss_and_grad", "calculate_per_token_loss", "return_z_loss"):
            _check_bool(name, getattr(self, name))
        if not _is_int(self.seq_split_num) or self.seq_split_num < 1:
            raise ValueError(f"seq_split_num must be a positive int, got {self.seq_split_num!r}")
        if not _is_int(self.ignore_index):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        object.__setattr__(self, "weight", class_weight_array(self.weight))
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("empty_mean", self.empty_mean, EMPTY_MEANS)
        if not _is_number(self.label_smoothing) or not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1], got {self.label_smoothing!r}")
        if not _is_number(self.z_loss_weight) or not self.z_loss_weight >= 0.0:
            raise ValueError(f"z_loss_weight must be a float >= 0, got {self.z_loss_weight!r}")
        if self.logit_softcap is not None and (not _is_number(self.logit_softcap) or not self.logit_softcap > 0):
            raise ValueError(f"logit_softcap must be None or a float > 0, got {self.logit_softcap!r}")
        _check_choice("backend", self.backend, BACKENDS)
        if self.chunk_size is not None and (not _is_int(self.chunk_size) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive int (rows per chunk), got {self.chunk_size!r}")

    @property
    def per_token(self) -> bool:
        """MindFormers' per-token outputs (numerator, denominator): asked, or implied by a sequence split."""
        return self.calculate_per_token_loss or self.seq_split_num > 1

    @property
    def unreduced(self) -> bool:
        """A loss per token (reduction="none" without per-token outputs): its upstream gradient is per row."""
        return self.reduction == "none" and not self.per_token


@dataclass(frozen=True)
class LossOptions(CommonOptions):
    """`CrossEntropyLoss`'s options: the common ones and `inplace_backward`."""

    inplace_backward: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_bool("inplace_backward", self.inplace_backward)
        if self.inplace_backward and self.backend == "composed":
            raise ValueError("inplace_backward=True needs the fused kernels (backend='fused', or 'auto' on CPU), "
                             "got backend='composed'")

    def check_semi_auto(self) -> None:
        """The options that MindSpore's own sharded ops (semi_auto / auto parallel mode) do not support."""
        for name, unsupported in (("inplace_backward=True", self.inplace_backward),
                                  ("weight", self.weight is not None), ("chunk_size", self.chunk_size is not None)):
            if unsupported:
                raise ValueError(f"{name} is not supported in semi_auto/auto parallel mode yet (it runs MindSpore's "
                                 "own sharded ops); use the explicit vocab-parallel mode (parallel_mode="
                                 "'stand_alone' under msrun)")


@dataclass(frozen=True)
class HeadOptions(CommonOptions):
    """`LinearCrossEntropyLoss`'s options: the common ones and its own. `chunk_size` is rows per chunk (the
    recomputing kernels' blocks of classes hold as many float32 values as such a chunk's logits)."""

    complete_hidden_grad: bool = True
    grad_mode: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        _check_bool("complete_hidden_grad", self.complete_hidden_grad)
        _check_choice("grad_mode", self.grad_mode, GRAD_MODES)
        if self.grad_mode == "forward" and self.unreduced:
            raise ValueError("grad_mode='forward' needs a scalar loss (reduction 'mean' or 'sum', or "
                             "calculate_per_token_loss); reduction='none' needs grad_mode='recompute' or 'auto'")


def option_names(options_class) -> tuple:
    return tuple(f.name for f in fields(options_class))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def class_weight_array(weight) -> Optional[np.ndarray]:
    """`weight` (V,) as float32 NumPy, checked: numbers, 1-D, finite, non-negative."""
    if weight is None:
        return None
    try:
        array = (weight.asnumpy() if hasattr(weight, "asnumpy") else np.asarray(weight)).astype(np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"weight must be numbers, one per class of the vocabulary, got {weight!r}") from None
    if array.ndim != 1:
        raise ValueError(f"weight must have shape (V,) for the whole vocabulary, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        bad = int(np.flatnonzero(~np.isfinite(array) | (array < 0))[0])
        raise ValueError(f"weight must be finite and >= 0, got weight[{bad}] = {array[bad]}")
    return array


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
