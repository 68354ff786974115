"""The training step both trainers use (`mf-loss train`'s Llama-style model and MindFormers' Llama), and the
rank-level helpers around it (MindSpore's context, the data-parallel group, a barrier).

One step on data-parallel rank d, model-parallel rank r:
  for each micro-batch: (numerator, denominator) = forward(micro-batch), the per-token loss's sum of token losses
      and counted tokens; the gradients of the numerator accumulate;
  one SUM all-reduce over the data-parallel group of [all gradients, numerator, denominator] in one buffer;
  every gradient is divided once by the global denominator (the counted tokens of all micro-batches and all
  data-parallel ranks): the exact global token mean, whatever each rank counted;
  with max_grad_norm, the gradients are scaled down to that global L2 norm when above it; the norm counts each
  replicated parameter once and sums the squares of the model-parallel-split ones over the model-parallel group;
  the optimizer steps.
Every rank computes the same numbers in the same order, run after run: MindSpore's CPU sum of a whole long
vector (200000 elements or more) adds partial sums of blocks whose split it tunes by timing and in the order
the threads finish, so the norm sums rows of a fixed width (one thread per row) and then the short vector of
row sums (`_squares`).
Replicated parameters get the same gradient on every model-parallel rank (the model sums the hidden state's
gradient over that group), so they stay identical everywhere.
"""
import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import psutil

import mindspore as ms
from mindspore import Tensor, nn, ops


class TrainStep(nn.Cell):
    """construct(*inputs) -> (global numerator, global denominator, gradient norm after the token mean).

    `forward(*micro_batch_inputs) -> (numerator, denominator)`; each of `inputs` has the micro-batch axis first
    (micro_batch_num, ...). `weights`: the trained parameters in the optimizer's order. `split`: names of the
    weights split over the model-parallel ranks (each rank holds other rows). `dp_group`/`mp_group`: the groups
    to all-reduce over, None for a group of one rank.
    """

    def __init__(self, forward: Callable, weights: Sequence, optimizer: nn.Optimizer, micro_batch_num: int,
                 dp_group: Optional[str] = None, mp_group: Optional[str] = None, split: Sequence[str] = (),
                 max_grad_norm: Optional[float] = None):
        super().__init__(auto_prefix=False)
        if micro_batch_num < 1:
            raise ValueError(f"micro_batch_num must be >= 1, got {micro_batch_num}")
        self.forward = forward
        self.optimizer = optimizer
        self.weights = ms.ParameterTuple(list(weights))
        names = [p.name for p in self.weights]
        unknown = sorted(set(split) - set(names))
        if unknown:
            raise ValueError(f"split names {unknown} are not among the weights ({', '.join(names)})")
        self.micro_batch_num = micro_batch_num
        self.grad_fn = ms.value_and_grad(self.forward, None, self.weights, has_aux=True)
        self.shapes = tuple(tuple(p.shape) for p in self.weights)
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = tuple(int(o) for o in np.cumsum([0] + sizes))
        split_runs, replicated_runs = _runs(self.offsets, [n in split for n in names])
        # (start, stop, paddings): each run's slice of the flat buffer and how _squares sums it
        self.split_ranges = tuple((a, b, _row_paddings(b - a)) for a, b in split_runs)
        self.replicated_ranges = tuple((a, b, _row_paddings(b - a)) for a, b in replicated_runs)
        self.dp_reduce = ops.AllReduce(ops.ReduceOp.SUM, dp_group) if dp_group else None
        self.mp_reduce = ops.AllReduce(ops.ReduceOp.SUM, mp_group) if mp_group and self.split_ranges else None
        self.max_grad_norm = max_grad_norm

    def _micro_batch(self, inputs, i):
        return tuple([x[i] for x in inputs])

    def construct(self, *inputs):
        (numerator, denominator), grads = self.grad_fn(*self._micro_batch(inputs, 0))
        for i in range(1, self.micro_batch_num):
            (num_i, den_i), grads_i = self.grad_fn(*self._micro_batch(inputs, i))
            numerator = numerator + num_i
            denominator = denominator + den_i
            grads = tuple(a + b for a, b in zip(grads, grads_i))
        # One collective per step: every gradient and both loss sums in one buffer.
        flat = ops.concat([g.reshape(-1) for g in grads] + [ops.stack([numerator, denominator]).reshape(-1)])
        if self.dp_reduce is not None:
            flat = self.dp_reduce(flat)
        end = self.offsets[-1]
        numerator, denominator = flat[end], flat[end + 1]
        scale = 1.0 / ops.maximum(denominator, 1.0)
        norm = self._norm(flat) * scale
        if self.max_grad_norm is not None:
            scale = scale * ops.minimum(1.0, self.max_grad_norm / (norm + 1e-6))
        grads = tuple(flat[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i]) * scale
                      for i in range(len(self.shapes)))
        self.optimizer(grads)
        return numerator, denominator, norm

    def _norm(self, flat):
        """Global L2 norm of the summed gradients in `flat`: the split parameters' squares over the mp group."""
        squares = ops.zeros((1,), ms.float32)
        for start, stop, paddings in self.split_ranges:
            squares = squares + _squares(flat, start, stop, paddings)
        if self.mp_reduce is not None:
            squares = self.mp_reduce(squares)
        for start, stop, paddings in self.replicated_ranges:
            squares = squares + _squares(flat, start, stop, paddings)
        return ops.sqrt(squares[0])


SUM_ROW = 1024  # the width of the rows _squares sums; fixed, so the order of every addition is fixed too


def _row_paddings(length: int) -> tuple:
    """The zeros _squares appends at each level after the first to sum the row sums of `length` values in rows of
    SUM_ROW, down to one row."""
    length = -(-length // SUM_ROW)
    paddings = []
    while length > SUM_ROW:
        paddings.append(-length % SUM_ROW)
        length = (length + paddings[-1]) // SUM_ROW
    return tuple(paddings)


def _squares(flat, start: int, stop: int, paddings: tuple):
    """The sum of squares of flat[start:stop] in an order independent of threads and timing: each row of SUM_ROW
    values (and the shorter rest) is summed by one thread; the vector of row sums is summed the same way (padded
    with zeros, which add exactly) until at most SUM_ROW values are left, which are summed in sequence.
    (MindSpore's CPU sum of a whole vector is sequential below 200000 values; at or above, it adds partial sums of
    blocks whose split it tunes by timing, in the order its threads finish.)"""
    full = start + (stop - start) // SUM_ROW * SUM_ROW
    if full == stop:
        sums = _row_squares(flat, start, stop)
    elif full == start:
        sums = _rest_squares(flat, start, stop)
    else:
        sums = ops.concat([_row_squares(flat, start, full), _rest_squares(flat, full, stop)])
    for padding in paddings:
        if padding:
            sums = ops.concat([sums, ops.zeros((padding,), sums.dtype)])
        sums = sums.reshape(-1, SUM_ROW).sum(axis=1)
    return sums.sum()


def _row_squares(flat, start: int, stop: int):
    rows = flat[start:stop].reshape(-1, SUM_ROW)
    return (rows * rows).sum(axis=1)


def _rest_squares(flat, start: int, stop: int):
    rest = flat[start:stop]
    return (rest * rest).sum().reshape(1)


def _runs(offsets, is_split) -> tuple:
    """((start, stop) of each run of adjacent split weights, the same of replicated ones) in the flat buffer."""
    runs, previous = ([], []), None
    for i, split in enumerate(is_split):
        group = runs[0] if split else runs[1]
        if split == previous:
            group[-1] = (group[-1][0], offsets[i + 1])
        else:
            group.append((offsets[i], offsets[i + 1]))
        previous = split
    return tuple(runs[0]), tuple(runs[1])


def barrier(world_size: int) -> None:
    """Returns once every rank has called it (a SUM all-reduce of one number over the world)."""
    if world_size > 1:
        ops.AllReduce()(Tensor(np.ones(1, np.float32))).asnumpy()


def set_rank_context(graph_mode: bool, world_size: int) -> None:
    """MindSpore's context for one training rank on CPU."""
    ms.set_context(mode=ms.GRAPH_MODE if graph_mode else ms.PYNATIVE_MODE, device_target="CPU")
    if not graph_mode:
        # PYNATIVE runs kernels on a worker thread while this one busy-waits at every sync, taking a core from
        # the other ranks; run them on this thread instead (same results)
        ms.runtime.launch_blocking()
    if world_size > 1:
        # Ranks share the machine's cores: one kernel thread each unless there are cores to spare
        # (measured on 2 cores, 4 ranks: fewer context switches, steadier steps).
        threads = max(1, len(psutil.Process().cpu_affinity()) // world_size)
        ms.set_context(runtime_num_threads=threads, inter_op_parallel_num=threads)


class StepRunner:
    """Runs a TrainStep once per training step: times it, checks the loss (the loss's NaN check and a finite
    curve value) and keeps the throughput figures (the first step, with compilation, apart)."""

    def __init__(self, step_cell: TrainStep, loss, where: str):
        self.step_cell, self.loss, self.where = step_cell, loss, where
        self.compile_time: Optional[float] = None
        self.steady_tokens, self.steady_time = 0.0, 0.0

    def __call__(self, step: int, *inputs) -> dict:
        """The curve row of 0-based `step` (without its learning rate)."""
        tick = time.perf_counter()
        numerator, denominator, grad_norm = self.step_cell(*[Tensor(x) for x in inputs])
        numerator, denominator = float(numerator.asnumpy()), float(denominator.asnumpy())
        seconds = time.perf_counter() - tick
        if self.loss.check_for_nan:
            self.loss.check_finite()
        value = numerator / max(denominator, 1.0)
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} on {self.where} at step {step + 1}")
        if self.compile_time is None:
            self.compile_time = seconds
        else:
            self.steady_tokens += denominator
            self.steady_time += seconds
        return {"step": step + 1, "loss": value, "counted_tokens": int(denominator),
                "grad_norm": float(grad_norm.asnumpy()), "step_time_s": seconds, "tokens_per_s": denominator / seconds}

    @property
    def steady_tokens_per_s(self) -> Optional[float]:
        return self.steady_tokens / self.steady_time if self.steady_time else None
