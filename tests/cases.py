"""Loss cases shared by the single-device tests and the msrun workers.

A case is constructor options plus a recipe for the inputs. `full_inputs` builds the whole batch over the
whole vocabulary from a seed; `shard` cuts out one rank's rows (its dp slice) and columns (its mp slice), so
a distributed rank and the single-device reference see the very same numbers.
"""
import itertools
from dataclasses import dataclass, field

import numpy as np

import mindspore as ms
from mindspore import Tensor

VOCAB = 24  # divisible by 1, 2 and 4 model-parallel ranks
ROWS = 12   # per dp rank


@dataclass(frozen=True)
class Case:
    name: str
    options: dict = field(default_factory=dict)
    dtype: str = "float32"
    batch_shape: tuple = (ROWS,)   # leading shape per dp rank, e.g. (3, 4) for (B, S, V)
    scale: float = 3.0
    mask: str = "int"              # none | int | bool | float | zero
    target: str = "index"          # index | probs
    ignored: int = 2               # rows with label == ignore_index


def _rows(batch_shape):
    return int(np.prod(batch_shape))


def full_inputs(case: Case, dp: int = 1, seed: int = 0):
    """NumPy inputs for all dp ranks stacked on axis 0: logits (dp*B.., V), label, mask (or None)."""
    rng = np.random.default_rng(seed)
    shape = (dp * case.batch_shape[0],) + tuple(case.batch_shape[1:])
    rows = dp * _rows(case.batch_shape)
    logits = (rng.standard_normal((rows, VOCAB)) * case.scale).astype(np.float32)
    if case.target == "probs":
        raw = rng.random((rows, VOCAB)) ** 3
        label = (raw / raw.sum(-1, keepdims=True)).astype(np.float32)
        label = label.reshape(shape + (VOCAB,))
    else:
        label = rng.integers(0, VOCAB, rows).astype(np.int32)
        ignore = case.options.get("ignore_index", -100)
        label[rng.choice(rows, size=min(case.ignored * dp, rows), replace=False)] = ignore
        label = label.reshape(shape)
    mask = None
    if case.mask != "none":
        mask = (rng.random(rows) > 0.25).astype(np.float32)
        if case.mask == "float":
            mask = mask * rng.uniform(0.5, 2.0, rows).astype(np.float32)
        elif case.mask == "zero":
            mask = np.zeros(rows, np.float32)
        mask = mask.reshape(shape)
        if case.mask == "bool":
            mask = mask.astype(bool)
        elif case.mask == "int":
            mask = mask.astype(np.int32)
    return logits.reshape(shape + (VOCAB,)), label, mask


def shard(case: Case, arrays, dp_rank: int, mp_rank: int, mp: int):
    """One rank's view: its dp rows and, for logits and probability targets, its vocabulary columns."""
    logits, label, mask = arrays
    per_dp = case.batch_shape[0]
    rows = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    width = VOCAB // mp
    cols = slice(mp_rank * width, (mp_rank + 1) * width)
    logits = logits[rows][..., cols]
    label = label[rows][..., cols] if case.target == "probs" else label[rows]
    return logits, label, None if mask is None else mask[rows]


def to_tensors(case: Case, arrays):
    logits, label, mask = arrays
    dtype = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[case.dtype]
    return (Tensor(np.ascontiguousarray(logits)).astype(dtype), Tensor(np.ascontiguousarray(label)),
            None if mask is None else Tensor(np.ascontiguousarray(mask)))


def upstream_weights(shape, seed=1):
    """Per-token upstream gradient for reduction='none', so each row's dout differs."""
    return np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(np.float32)


def evaluate(loss_fn, logits, label, mask, reduction="mean"):
    """Forward outputs and the gradient of the first output w.r.t. logits, as float64 NumPy."""
    out = loss_fn(logits, label, mask)
    outputs = [o.astype(ms.float32).asnumpy().astype(np.float64) for o in (out if isinstance(out, tuple) else (out,))]
    if reduction == "none" and not getattr(loss_fn, "per_token", False):
        dout = Tensor(upstream_weights(outputs[0].shape))

        def objective(x):
            first = loss_fn(x, label, mask)
            first = first[0] if isinstance(first, tuple) else first
            return (first * dout).sum()
    else:
        def objective(x):
            first = loss_fn(x, label, mask)
            return first[0] if isinstance(first, tuple) else first
    grad = ms.grad(objective)(logits)
    return outputs, grad.astype(ms.float32).asnumpy().astype(np.float64)


# Cases that both the single-device tests and every msrun layout run (issue 2's core list plus every option).
CORE_CASES = [
    Case("ignore_and_int_mask"),
    Case("per_token", options=dict(calculate_per_token_loss=True)),
    Case("float16", dtype="float16"),
    Case("bfloat16", dtype="bfloat16"),
    Case("bsv_bool_mask", batch_shape=(3, 4), mask="bool"),
    Case("large_logits", scale=1e4, mask="none"),
    Case("all_masked", mask="zero"),
    Case("all_masked_per_token", mask="zero", options=dict(calculate_per_token_loss=True)),
    Case("weight_smoothing_sum", options=dict(weight="random", label_smoothing=0.1, reduction="sum")),
    Case("none_float_mask", mask="float", options=dict(reduction="none")),
    Case("probs_smoothing_weight", target="probs", options=dict(label_smoothing=0.2, weight="random")),
    Case("zloss_softcap", options=dict(z_loss_weight=1e-3, logit_softcap=5.0, return_z_loss=True)),
    Case("other_ignore_index", options=dict(ignore_index=7, label_smoothing=0.05)),
]


def grid_cases():
    """Every combination of weight x reduction x label_smoothing x ignore_index x mask x target kind."""
    cases = []
    for weighted, reduction, eps, ignore, mask, target in itertools.product(
            (False, True), ("mean", "sum", "none"), (0.0, 0.1), (-100, 3), ("none", "float"), ("index", "probs")):
        if target == "probs" and ignore != -100:
            continue  # ignore_index has no meaning for probability targets
        options = dict(reduction=reduction, label_smoothing=eps, ignore_index=ignore)
        if weighted:
            options["weight"] = "random"
        name = f"w{int(weighted)}_{reduction}_eps{eps}_ig{ignore}_{mask}_{target}"
        cases.append(Case(name, options=options, mask=mask, target=target))
    return cases


def loss_options(case: Case, extra=None):
    """Constructor keyword arguments: the case's options with 'random' weights made concrete."""
    options = dict(case.options)
    if options.get("weight") == "random":
        options["weight"] = np.random.default_rng(7).uniform(0.2, 2.0, VOCAB).astype(np.float32)
    options.update(extra or {})
    return options
