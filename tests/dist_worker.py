"""The "loss" part of the suite's msrun job (tests/msrun_jobs.py), for tests/test_distributed.py: what one
rank of CrossEntropyLoss checks, returned by `run_rank` as arrays and a report.

The wiring only (the math of every mp is tests/test_vocab_parallel_math.py's and tests/test_mp_in_one_process.py's):
the cases on this rank's shard that cross the ranks through the real exchange with both backends, in PYNATIVE
and (the cases that change the compiled graph) GRAPH, and the in-place fused backward on a few of them; the NaN check with a
NaN planted in one rank's slice; a logits width that disagrees between ranks; and a compiled training step
whose IR is dumped so the test can count its collectives.
"""
import time

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from cases import CORE_CASES, Case, evaluate, full_inputs, loss_options, shard, to_tensors
from mf_loss import CrossEntropyLoss, NonFiniteLossError
from msrun_jobs import executed_graph_collectives

NAN_ROW, NAN_COLUMN = 2, 20  # a row of the last dp rank, a column owned by the last mp rank
BACKEND_OPTIONS = {"composed": dict(backend="composed"), "fused": dict(backend="fused"),
                   "fused_inplace": dict(backend="fused", inplace_backward=True)}
INPLACE_CASES = [c for c in CORE_CASES if c.name in
                 ("ignore_and_int_mask", "bfloat16", "weight_smoothing_sum", "none_float_mask",
                  "probs_smoothing_weight", "zloss_softcap")]
# What crosses the ranks: every output kind, masks and ignored rows (nothing counted on a rank included),
# class weights, smoothing, probability targets, the z-loss. (Dtypes, scales and ignore values are per-shard
# math: tests/test_mp_in_one_process.py runs every core case at every rank.)
WIRING_CASES = [c for c in CORE_CASES if c.name not in ("float16", "large_logits", "other_ignore_index",
                                                          "all_masked_per_token")]
# GRAPH compiles each case: the cases whose outputs or inputs change the compiled graph (per-token pair, a
# half-precision input, a per-row loss, probability targets with class weights, the z-loss output)
GRAPH_CASES = [c for c in CORE_CASES if c.name in
               ("per_token", "bfloat16", "none_float_mask", "probs_smoothing_weight", "zloss_softcap")]
# (mode, backend) -> cases; results are keyed "<mode>/<backend>/<case>/out<i>" and ".../grad".
SUITES = {("pynative", "composed"): WIRING_CASES, ("pynative", "fused"): WIRING_CASES,
          ("pynative", "fused_inplace"): INPLACE_CASES,
          ("graph", "composed"): GRAPH_CASES, ("graph", "fused"): GRAPH_CASES}
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}
HEAD_HIDDEN, HEAD_ROWS_PER_RANK, HEAD_TOKENS = 8, 6, 10


def run_suite(mode, backend, cases, config, dp_rank, mp_rank, results):
    started = time.perf_counter()
    ms.set_context(mode=MODES[mode])
    for case in cases:
        arrays = shard(case, full_inputs(case, dp=config.data_parallel), dp_rank, mp_rank, config.model_parallel)
        options = loss_options(case, dict(parallel_config=config, **BACKEND_OPTIONS[backend]))
        outputs, grad = evaluate(CrossEntropyLoss(**options), *to_tensors(case, arrays),
                                 options.get("reduction", "mean"))
        for i, out in enumerate(outputs):
            results[f"{mode}/{backend}/{case.name}/out{i}"] = out
        results[f"{mode}/{backend}/{case.name}/grad"] = grad
    print(f"{mode}/{backend}: {len(cases)} cases in {time.perf_counter() - started:.1f} s", flush=True)


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


def head_inputs(dp: int, mp: int):
    """The training step's data over the whole job, in NumPy: features (dp*T, H), labels, the full output
    weight (mp*rows, H), mp rank r holding rows [r*rows, (r+1)*rows) (the same on every dp rank)."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((dp * HEAD_TOKENS, HEAD_HIDDEN)).astype(np.float32)
    label = rng.integers(0, HEAD_ROWS_PER_RANK * mp, dp * HEAD_TOKENS).astype(np.int32)
    weight = np.concatenate([np.random.default_rng(100 + r).standard_normal((HEAD_ROWS_PER_RANK, HEAD_HIDDEN))
                             for r in range(mp)]).astype(np.float32)
    return features, label, weight


class VocabParallelHead(nn.Cell):
    """A model whose output layer holds this rank's rows of the output weight, trained with the loss."""

    def __init__(self, local_weight, config):
        super().__init__()
        self.weight = Parameter(Tensor(local_weight), name="w")
        self.matmul = ops.MatMul(transpose_b=True)
        self.loss = CrossEntropyLoss(parallel_config=config)

    def construct(self, features, label, mask):
        return self.loss(self.matmul(features, self.weight), label, mask)


def dump_training_step(config, dp_rank, mp_rank, ir_dir):
    """Compile value_and_grad of a whole SGD step in GRAPH mode with IR dumps on; return the loss and this
    rank's weight after the step."""
    ms.set_context(mode=ms.GRAPH_MODE)
    features, label, weight = head_inputs(config.data_parallel, config.model_parallel)
    tokens = slice(dp_rank * HEAD_TOKENS, (dp_rank + 1) * HEAD_TOKENS)
    net = VocabParallelHead(weight[mp_rank * HEAD_ROWS_PER_RANK:(mp_rank + 1) * HEAD_ROWS_PER_RANK], config)
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1)
    grad_fn = ms.value_and_grad(net, None, optimizer.parameters)

    @ms.jit
    def train_step(features, label, mask):
        loss, grads = grad_fn(features, label, mask)
        optimizer(grads)
        return loss

    ms.set_context(save_graphs=1, save_graphs_path=ir_dir)
    loss = train_step(Tensor(features[tokens]), Tensor(label[tokens]), Tensor(np.ones(HEAD_TOKENS, np.float32)))
    ms.set_context(save_graphs=0)
    return float(loss.asnumpy()), net.weight.asnumpy()


def run_rank(config, dp_rank, mp_rank, ir_dir, modes):
    """Everything this rank checks (the case suites in `modes`): (arrays, report) for tests/test_distributed.py."""
    results = {}
    for (mode, backend), cases in SUITES.items():
        if mode in modes:
            run_suite(mode, backend, cases, config, dp_rank, mp_rank, results)
    report = {
        "nan_pynative": nan_check(ms.PYNATIVE_MODE, config, dp_rank, mp_rank),
        "nan_graph": nan_check(ms.GRAPH_MODE, config, dp_rank, mp_rank),
        "width_pynative": width_check(ms.PYNATIVE_MODE, config, mp_rank),
        "width_graph": width_check(ms.GRAPH_MODE, config, mp_rank),
    }
    report["train_step_loss"], results["train_step/weight"] = dump_training_step(config, dp_rank, mp_rank,
                                                                                  str(ir_dir))
    report["final_ir"], report["collectives"] = executed_graph_collectives(ir_dir)
    return results, report
