"""One msrun rank of the distributed test battery; results go to OUT/rank<r>.npz and OUT/rank<r>.json.

Runs every case in PYNATIVE and GRAPH on this rank's shard, the NaN check with a NaN planted in one rank's
slice, and a compiled training step whose IR is dumped so the test can count its collectives.
"""
import argparse
import glob
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor, nn, ops  # noqa: E402
from mindspore.communication import get_rank, init  # noqa: E402

from cases import CORE_CASES, Case, evaluate, full_inputs, grid_cases, loss_options, shard, to_tensors  # noqa: E402
from mf_loss import CrossEntropyLoss, NonFiniteLossError, ParallelConfig  # noqa: E402

NAN_ROW, NAN_COLUMN = 2, 20  # a row of the last dp rank, a column owned by the last mp rank
BACKEND_OPTIONS = {"composed": dict(backend="composed"), "fused": dict(backend="fused"),
                   "fused_inplace": dict(backend="fused", inplace_backward=True)}


def run_cases(cases, mode, config, dp_rank, mp_rank, results, backend):
    ms.set_context(mode=mode)
    tag = "graph" if mode == ms.GRAPH_MODE else "pynative"
    for case in cases:
        arrays = shard(case, full_inputs(case, dp=config.data_parallel), dp_rank, mp_rank, config.model_parallel)
        options = loss_options(case, dict(parallel_config=config, **BACKEND_OPTIONS[backend]))
        outputs, grad = evaluate(CrossEntropyLoss(**options), *to_tensors(case, arrays),
                                 options.get("reduction", "mean"))
        for i, out in enumerate(outputs):
            results[f"{tag}/{backend}/{case.name}/out{i}"] = out
        results[f"{tag}/{backend}/{case.name}/grad"] = grad


def nan_check(mode, config, dp_rank, mp_rank):
    """The message this rank raises (PYNATIVE) or reports from check_finite (GRAPH), or None."""
    ms.set_context(mode=mode)
    case = Case("nan")
    logits, label, mask = full_inputs(case, dp=config.data_parallel)
    row = (config.data_parallel - 1) * case.batch_shape[0] + NAN_ROW
    logits[row, NAN_COLUMN] = np.nan
    mask[row], label[row] = 1, 0  # a counted token, so the expected message is fixed
    arrays = shard(case, (logits, label, mask), dp_rank, mp_rank, config.model_parallel)
    loss_fn = CrossEntropyLoss(parallel_config=config, check_for_nan_in_loss_and_grad=True)
    try:
        loss_fn(*to_tensors(case, arrays))
        loss_fn.check_finite()
    except NonFiniteLossError as error:
        return str(error)
    return None


def width_check(mode, config, mp_rank):
    """The last mp rank holds one column too many: every mp rank must say so (PYNATIVE raises, GRAPH gives a
    NaN loss and check_finite raises)."""
    ms.set_context(mode=mode)
    width = 6 + (mp_rank == config.model_parallel - 1)
    rng = np.random.default_rng(0)
    logits = Tensor(rng.standard_normal((5, width)).astype(np.float32))
    label = Tensor(np.arange(5, dtype=np.int32))
    loss_fn = CrossEntropyLoss(parallel_config=config)
    try:
        value = loss_fn(logits, label)
        loss_fn.check_finite()
    except ValueError as error:
        return str(error), None
    return None, float(value.asnumpy())


class VocabParallelHead(nn.Cell):
    """A model whose output layer holds this rank's rows of the output weight, trained with the loss."""

    def __init__(self, hidden, local_vocab, config):
        super().__init__()
        rng = np.random.default_rng(get_rank())
        self.weight = Parameter(Tensor(rng.standard_normal((local_vocab, hidden)).astype(np.float32)), name="w")
        self.matmul = ops.MatMul(transpose_b=True)
        self.loss = CrossEntropyLoss(parallel_config=config)

    def construct(self, features, label, mask):
        return self.loss(self.matmul(features, self.weight), label, mask)


def dump_training_step(config, ir_dir):
    """Compile value_and_grad of a whole training step in GRAPH mode with IR dumps on; return the dir."""
    ms.set_context(mode=ms.GRAPH_MODE)
    net = VocabParallelHead(8, 6, config)
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1)
    grad_fn = ms.value_and_grad(net, None, optimizer.parameters)

    @ms.jit
    def train_step(features, label, mask):
        loss, grads = grad_fn(features, label, mask)
        optimizer(grads)
        return loss

    rng = np.random.default_rng(0)
    features = Tensor(rng.standard_normal((10, 8)).astype(np.float32))
    label = Tensor(rng.integers(0, 6 * config.model_parallel, 10).astype(np.int32))
    ms.set_context(save_graphs=1, save_graphs_path=ir_dir)
    loss = train_step(features, label, Tensor(np.ones(10, np.float32)))
    ms.set_context(save_graphs=0)
    return float(loss.asnumpy())


def final_graph_collectives(ir_dir):
    """(file, collective count) of the last IR the compiler wrote: the executed graph, backprop included."""
    numbered = {}
    for path in glob.glob(os.path.join(ir_dir, "**", "*.ir"), recursive=True):
        match = re.search(r"_(\d{4})\.ir$", path)
        if match:
            numbered[int(match.group(1))] = path
    last = numbered[max(numbered)]
    text = open(last).read()
    counts = {name: text.count(f"{name}(") for name in ("AllReduce", "AllGather", "Broadcast", "ReduceScatter")}
    return os.path.basename(last), counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp", type=int, required=True)
    parser.add_argument("--mp", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--grid", action="store_true", help="also run the option grid (PYNATIVE)")
    parser.add_argument("--backends", default="composed", help=f"comma separated, of {', '.join(BACKEND_OPTIONS)}")
    args = parser.parse_args()
    init()
    rank = get_rank()
    config = ParallelConfig(data_parallel=args.dp, model_parallel=args.mp)
    dp_rank, mp_rank = rank // args.mp, rank % args.mp
    results = {}
    for backend in args.backends.split(","):
        run_cases(CORE_CASES, ms.PYNATIVE_MODE, config, dp_rank, mp_rank, results, backend)
        if args.grid and backend != "fused_inplace":  # the in-place backward: the core cases are enough
            run_cases(grid_cases(), ms.PYNATIVE_MODE, config, dp_rank, mp_rank, results, backend)
    run_cases(CORE_CASES, ms.GRAPH_MODE, config, dp_rank, mp_rank, results, args.backends.split(",")[0])
    report = {
        "rank": rank, "dp_rank": dp_rank, "mp_rank": mp_rank,
        "nan_pynative": nan_check(ms.PYNATIVE_MODE, config, dp_rank, mp_rank),
        "nan_graph": nan_check(ms.GRAPH_MODE, config, dp_rank, mp_rank),
        "width_pynative": width_check(ms.PYNATIVE_MODE, config, mp_rank),
        "width_graph": width_check(ms.GRAPH_MODE, config, mp_rank),
    }
    ir_dir = os.path.join(args.out, f"ir_rank{rank}")
    report["train_step_loss"] = dump_training_step(config, ir_dir)
    report["final_ir"], report["collectives"] = final_graph_collectives(ir_dir)
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), **results)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"rank {rank}: done, {len(results)} arrays", flush=True)


if __name__ == "__main__":
    main()
