"""Every option of the loss cells, documented and checked once, here, with messages that name the argument.

`LossOptions` holds `CrossEntropyLoss`'s options and `HeadOptions` `LinearCrossEntropyLoss`'s (both add their
own to `CommonOptions`). The cells build one from their arguments (`from_arguments`) and hand it to their
cores, which read what they need from it; the YAML loader (`mf_loss.config_loader`) checks a loss block with
the same classes. A new option is a field here, with its check in `__post_init__`; a per-class one (an array
over the whole vocabulary, sliced per model-parallel rank by `ops.shard_math.shard_spec`) is marked with
`PER_CLASS` metadata.
"""
import difflib
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np

REDUCTIONS = ("mean", "sum", "none")
EMPTY_MEANS = ("zero", "nan")
BACKENDS = ("auto", "fused", "composed")
GRAD_MODES = ("auto", "forward", "recompute")
PER_CLASS = {"per_class": True}  # field metadata of an option that is an array over the whole vocabulary


@dataclass(frozen=True)
class CommonOptions:
    """The options both loss cells take.

    check_for_nan_in_loss_and_grad: find non-finite loss/gradient rows; raise in PYNATIVE, record for
        `check_finite()` in GRAPH.
    calculate_per_token_loss: return (sum of masked token losses, denominator) instead of the mean.
    seq_split_num: MindFormers' sequence split; > 1 implies per-token loss, as in MindFormers.
    ignore_index: label value that counts for nothing (loss, denominator, gradient).
    weight: per-class weights (V,) for the whole vocabulary (kept as the checked float32 array, or None).
    reduction: "mean", "sum" or "none" (per-token, with the input's leading shape).
    label_smoothing: eps in [0, 1], PyTorch's formula over the full vocabulary.
    z_loss_weight: adds z_loss_weight * lse^2 per token.
    return_z_loss: also return the z-loss term alone (no gradient), reduced like the loss.
    logit_softcap: applies cap * tanh(x / cap) to the logits first.
    empty_mean: what "mean" returns when nothing counts: "zero" or "nan" (PyTorch).
    backend: "auto", "fused" (C++ kernel, CPU) or "composed" (MindSpore ops).
    chunk_size: rows per chunk; None chooses it from a memory budget (`mf_loss.ops.chunking`). For
        `CrossEntropyLoss` the composed path's chunks (its temporaries are chunk-sized; the fused kernels read
        each row once and take none); for `LinearCrossEntropyLoss` see `HeadOptions`.
    """

    check_for_nan_in_loss_and_grad: bool = False
    calculate_per_token_loss: bool = False
    seq_split_num: int = 1
    ignore_index: int = -100
    weight: Optional[np.ndarray] = field(default=None, compare=False, metadata=PER_CLASS)
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

    @classmethod
    def from_arguments(cls, owner: str, keywords: dict, **positional):
        """(the options of a cell built with MindFormers' positional arguments `positional` and the keyword
        arguments `keywords`, the keys of `keywords` that are no option of ours: ignored, as MindFormers passes
        model-level keys through to its losses). A key that looks like a misspelling of ours raises."""
        names = option_names(cls)
        options = cls(**positional, **{key: value for key, value in keywords.items() if key in names})
        others = {key: value for key, value in keywords.items() if key not in names}
        return options, reject_typos(others, names + ("parallel_config", "layout"), owner)

    def per_class_arrays(self) -> dict:
        """{name: (V,) array} of the per-class options that are set (fields marked `PER_CLASS`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("per_class") and getattr(self, f.name) is not None}

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
    """`CrossEntropyLoss`'s options: the common ones and

    inplace_backward: the backward writes the gradient over the logits' buffer (fused only): saves a
        logits-sized buffer, but the logits hold the gradient afterwards (see README, "In-place backward").
    """

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
    """`LinearCrossEntropyLoss`'s options: the common ones (but `inplace_backward`: the chunk logits are always
    written over by their gradient where the backend can) and its own.

    chunk_size: rows per chunk; None chooses it from a memory budget (`mf_loss.ops.chunking`). The fused
        backend's recomputing kernels go through blocks of classes instead, each holding as many float32
        values as such a chunk would (None: about 16 MiB).
    complete_hidden_grad: True (default) sums hidden's gradient over the model-parallel ranks in the
        backward, so the caller gets the whole gradient; False returns this rank's share, for models
        whose own copy-to-model-parallel op already sums it (one all-reduce either way, never two).
    grad_mode: "forward" makes the gradient in the forward, a chunk of rows at a time (3 products; one
        exchange per chunk when mp > 1; the weight gradient one float32 running sum, rounded once to the
        weight's dtype), "recompute" makes the logits again in the backward (4 products; one exchange; on the
        fused backend a vocabulary block at a time for all rows, on the composed backend the forward's chunk
        loop replayed with the per-row upstream gradient), "auto" is "recompute" for a float16 / bfloat16
        head_weight on the fused backend (the leaner and exact choice there; its extra product is the
        price) and for reduction="none", which needs it, else "forward". See `nn.linear_vocab_parallel`.
    """

    complete_hidden_grad: bool = True
    grad_mode: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        _check_bool("complete_hidden_grad", self.complete_hidden_grad)
        _check_choice("grad_mode", self.grad_mode, GRAD_MODES)
        if self.grad_mode == "forward" and self.unreduced:
            raise ValueError("grad_mode='forward' needs a scalar loss (reduction 'mean' or 'sum', or "
                             "calculate_per_token_loss); reduction='none' needs grad_mode='recompute' or 'auto'")

    @property
    def chosen_grad_mode(self) -> str:
        """`grad_mode` as the core takes it: a per-token loss has a per-row upstream gradient, which only the
        recomputing design takes."""
        return "recompute" if self.unreduced else self.grad_mode


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
