"""The real cells at every model-parallel rank, in one process: `CrossEntropyLoss` (its vocab shard) and
`LinearCrossEntropyLoss` built with a layout of mp ranks (`layout=`), rank r holding classes
[r V/mp, (r + 1) V/mp), each rank's cell run in turn. The layout's one collective, the SUM all-reduce
(`RankLayout.all_reduce_sum`), is `RanksInOneProcess`: it adds up what every rank handed it at the same call of
the previous sweep. A sweep runs every rank once; the first sweep only records (its exchanges are incomplete,
so its results are not read); after two more sweeps every exchange, and the hidden gradient's sum made in the
backward from the exchanged statistics, is complete. Loss and each rank's gradient (its logits slice, its head
weight rows, hidden's) against float64 NumPy over the full vocabulary, written out here. Quick: no msrun."""
from dataclasses import dataclass

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from mf_loss import CrossEntropyLoss, LinearCrossEntropyLoss, ParallelConfig
from mf_loss.parallel.comm import RankLayout

pytestmark = pytest.mark.unit
ROWS, HIDDEN, IGNORE = 7, 5, -1


class RanksInOneProcess:
    """The SUM all-reduce of mp ranks run one after the other: call k of rank r returns the sum over ranks of
    their call k in the previous sweep (this rank's own input for its own slot in the first sweep)."""

    def __init__(self, mp: int):
        self.mp = mp
        self.previous = [[] for _ in range(mp)]
        self.current = [[] for _ in range(mp)]

    def next_sweep(self):
        self.previous, self.current = self.current, [[] for _ in range(self.mp)]

    def reduce(self, rank: int, value):
        call = len(self.current[rank])
        self.current[rank].append(value.asnumpy())
        others = [self.previous[r][call] if len(self.previous[r]) > call else np.zeros(value.shape, np.float32)
                  for r in range(self.mp) if r != rank]
        return Tensor(value.asnumpy() + sum(others)).astype(value.dtype)


class SumOfRanks(nn.Cell):
    def __init__(self, ranks: RanksInOneProcess, rank: int):
        super().__init__()
        self.ranks, self.rank = ranks, rank

    def construct(self, value):
        return self.ranks.reduce(self.rank, value)


@dataclass(frozen=True)
class OneProcessLayout(RankLayout):
    ranks: RanksInOneProcess = None

    def all_reduce_sum(self):
        return SumOfRanks(self.ranks, self.mp_rank)


def layouts(mp):
    ranks = RanksInOneProcess(mp)
    return ranks, [OneProcessLayout(rank=r, dp_rank=0, mp_rank=r, mp_size=mp, group="", ranks=ranks)
                   for r in range(mp)]


def in_turns(ranks, mp, step):
    """[step(r) for every rank r] of the last of three sweeps; the first sweep's width checks see incomplete
    exchanges (the other ranks' widths are still 0) and may raise."""
    for sweep in range(3):
        results = []
        for r in range(mp):
            try:
                results.append(step(r))
            except ValueError as error:
                if sweep > 0 or "logits width differs" not in str(error):
                    raise
        ranks.next_sweep()
    return results


def reference(logits, label, mask, weight, smoothing, z):
    """Masked mean cross entropy over the full vocabulary in float64, and d loss / d logits."""
    x = logits.astype(np.float64)
    rows, vocab = x.shape
    top = x.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    p = np.exp(x - lse[:, None])
    counted = (label != IGNORE) & (mask != 0)
    target = np.zeros((rows, vocab))
    target[np.flatnonzero(counted), label[counted]] = 1.0
    soft = (1 - smoothing) * weight * target + smoothing / vocab * weight
    token = (soft * (lse[:, None] - x)).sum(axis=1) + z * lse ** 2
    denominator = (np.where(counted, weight[np.where(counted, label, 0)], 0.0) * mask).sum()
    loss = (np.where(counted, token, 0.0) * mask).sum() / denominator
    grad = p * soft.sum(axis=1, keepdims=True) - soft + 2 * z * lse[:, None] * p
    grad = np.where(counted[:, None], grad * mask[:, None], 0.0) / denominator
    return loss, grad


def case(mp, seed):
    rng = np.random.default_rng(seed)
    vocab = 4 * mp
    hidden = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    head = (rng.standard_normal((vocab, HIDDEN)) / 2).astype(np.float32)
    label = rng.integers(0, vocab, ROWS).astype(np.int32)
    label[1] = IGNORE
    label[2] = vocab - 1  # a class of the last rank
    mask = (rng.random(ROWS) > 0.2).astype(np.float32)
    mask[2] = 1.0
    weight = rng.uniform(0.5, 2.0, vocab).astype(np.float32)
    return hidden, head, label, mask, weight


OPTIONS = [dict(), dict(label_smoothing=0.1, z_loss_weight=1e-3), dict(weight=True, label_smoothing=0.2)]


@pytest.mark.parametrize("mp", [2, 3])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smoothing_zloss", "class_weights"])
def test_cross_entropy_loss_at_every_rank(mp, options):
    hidden, head, label, mask, weight = case(mp, mp)
    logits = hidden @ head.T
    width = logits.shape[1] // mp
    options = dict(options, ignore_index=IGNORE)
    class_weights = weight if options.pop("weight", False) else np.ones(logits.shape[1], np.float32)
    if not np.all(class_weights == 1):
        options["weight"] = class_weights
    ranks, rank_layouts = layouts(mp)
    cells = [CrossEntropyLoss(ParallelConfig(model_parallel=mp), layout=rank_layouts[r], **options)
             for r in range(mp)]

    def step(r):
        part = Tensor(np.ascontiguousarray(logits[:, r * width:(r + 1) * width]))
        value, grad = ms.value_and_grad(cells[r])(part, Tensor(label), Tensor(mask))
        return value.asnumpy(), grad.asnumpy()

    results = in_turns(ranks, mp, step)
    loss, grad = reference(logits, label, mask, class_weights, options.get("label_smoothing", 0.0),
                           options.get("z_loss_weight", 0.0))
    for r, (value, part_grad) in enumerate(results):
        np.testing.assert_allclose(value, loss, rtol=2e-6, err_msg=f"mp {mp} rank {r}: loss")
        np.testing.assert_allclose(part_grad, grad[:, r * width:(r + 1) * width], rtol=1e-5, atol=1e-7,
                                   err_msg=f"mp {mp} rank {r}: logits gradient")


@pytest.mark.parametrize("mp", [2, 3])
@pytest.mark.parametrize("design", [dict(grad_mode="forward", chunk_size=3), dict(grad_mode="recompute"),
                                    dict(backend="composed", grad_mode="recompute", chunk_size=4)],
                         ids=["forward", "recompute", "composed_replay"])
def test_linear_cross_entropy_loss_at_every_rank(mp, design):
    hidden, head, label, mask, weight = case(mp, 10 + mp)
    width = head.shape[0] // mp
    options = dict(design, ignore_index=IGNORE, weight=weight, label_smoothing=0.1, z_loss_weight=1e-3)
    ranks, rank_layouts = layouts(mp)
    cells = [LinearCrossEntropyLoss(ParallelConfig(model_parallel=mp), layout=rank_layouts[r], **options)
             for r in range(mp)]

    def step(r):
        rows = Tensor(np.ascontiguousarray(head[r * width:(r + 1) * width]))
        value, (hidden_grad, head_grad) = ms.value_and_grad(cells[r], grad_position=(0, 1))(
            Tensor(hidden), rows, Tensor(label), Tensor(mask))
        return value.asnumpy(), hidden_grad.asnumpy(), head_grad.asnumpy()

    results = in_turns(ranks, mp, step)
    loss, grad = reference(hidden @ head.T, label, mask, weight, 0.1, 1e-3)
    for r, (value, hidden_grad, head_grad) in enumerate(results):
        what = f"mp {mp} rank {r}"
        np.testing.assert_allclose(value, loss, rtol=2e-6, err_msg=f"{what}: loss")
        # hidden's gradient summed over the ranks in the backward (complete_hidden_grad)
        np.testing.assert_allclose(hidden_grad, grad @ head.astype(np.float64), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}: hidden gradient")
        np.testing.assert_allclose(head_grad, (grad.T @ hidden.astype(np.float64))[r * width:(r + 1) * width],
                                   rtol=1e-5, atol=1e-6, err_msg=f"{what}: head weight gradient")
