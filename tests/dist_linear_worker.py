"""The "linear" part of the suite's msrun job (tests/msrun_jobs.py), for tests/test_linear_distributed.py:
what one rank of LinearCrossEntropyLoss under vocabulary parallelism checks, returned by `run_rank` as arrays
and a report.

Every rank holds its rows of one full head weight W (V, H) (mp rank r: classes [r V/mp, (r+1) V/mp)) and
the hidden states of its dp group (the same on its mp ranks), all drawn from fixed seeds (`job_inputs`), so
the test can rebuild the full-vocabulary float64 reference. The rank runs the cases in PYNATIVE and GRAPH
over the designs (backend x grad_mode x complete_hidden_grad; `RUNS`), the NaN check with a NaN planted in one
rank's hidden row or head-weight row, and a compiled ms.jit(value_and_grad) + SGD step per grad mode whose
IR is dumped so that the test can count its collectives.
"""
import time

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from cases import MS_DTYPES, class_weights, linear_inputs, rounded, upstream_weights
from mf_loss import LinearCrossEntropyLoss, NonFiniteLossError
from msrun_jobs import executed_graph_collectives
from test_linear_cross_entropy import run_loss

VOCAB, HIDDEN, ROWS = 24, 8, 10   # ROWS per dp rank; V divisible by mp = 2
CHUNK = 4                         # 10 rows: chunks of 4, 4, 2
# name -> (options, mask kind, leading shape per dp rank, dtype)
CASES = {
    "plain": (dict(), "int", (ROWS,), "float32"),
    "weight_smoothing_sum": (dict(weight="random", label_smoothing=0.1, reduction="sum"), "float", (ROWS,),
                             "float32"),
    "per_token_zloss_softcap": (dict(calculate_per_token_loss=True, z_loss_weight=1e-3, return_z_loss=True,
                                     logit_softcap=3.0), "bool", (2, 5), "float32"),
    "none_float_mask": (dict(reduction="none", label_smoothing=0.05), "float", (ROWS,), "float32"),
    "bfloat16_ignore3": (dict(ignore_index=3), "int", (2, 5), "bfloat16"),
    # the bfloat16 weight read as it is by the fused kernels (`/half_weight_read`), with class weights, smoothing
    # and z-loss
    "bfloat16_weight_smoothing": (dict(weight="random", label_smoothing=0.1, z_loss_weight=1e-3), "int", (ROWS,),
                                  "bfloat16"),
}
# (backend, grad_mode, complete_hidden_grad): each value of each option with each of the others' values once
DESIGNS = [("fused", "forward", True), ("fused", "recompute", False), ("composed", "forward", False),
           ("composed", "recompute", True)]
# mode -> [(design, case)]: PYNATIVE runs every design on the cases whose outputs cross the ranks differently
# (reduction='none' has no forward-gradient design); GRAPH, where each run compiles, runs every design on the
# cases that change the compiled graph's wiring (class weights, per-row upstream gradient, a bfloat16
# weight). The options' math at every rank is tests/test_mp_in_one_process.py's.
PYNATIVE_CASES = ("plain", "per_token_zloss_softcap", "none_float_mask", "bfloat16_ignore3")
RUNS = {
    "pynative": [(design, name) for design in DESIGNS for name in PYNATIVE_CASES
                 if not (design[1] == "forward" and CASES[name][0].get("reduction") == "none")],
    "graph": [(DESIGNS[0], "weight_smoothing_sum"), (DESIGNS[1], "none_float_mask"),
              (DESIGNS[1], "bfloat16_weight_smoothing"), (DESIGNS[2], "bfloat16_weight_smoothing"),
              (DESIGNS[3], "none_float_mask"), (DESIGNS[3], "weight_smoothing_sum")],
}
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}
NAN_HIDDEN_ROW = 2          # a row of the last dp rank's hidden states
TRAIN_FEATURES = 6


def job_inputs(case_name: str, dp: int):
    """The whole job's NumPy inputs of a case: hidden (dp * leading..., H), W (V, H), label, mask, and the
    options with concrete class weights (seeded by the case, the same on every rank)."""
    options, mask, leading, dtype = CASES[case_name]
    rng = np.random.default_rng(sorted(CASES).index(case_name))
    full_leading = (dp * leading[0],) + tuple(leading[1:])
    h, w, y, m = linear_inputs(rng, full_leading, HIDDEN, VOCAB, scale=3.0, mask=mask, ignored=2 * dp,
                             ignore_index=options.get("ignore_index", -100))
    if options.get("weight") == "random":
        options = dict(options, weight=class_weights(VOCAB))
    if dtype != "float32":
        h, w = rounded(h, dtype), rounded(w, dtype)
    return h, w, y, m, options


def rank_view(arrays, config, dp_rank: int, mp_rank: int):
    """This rank's rows of hidden/label/mask (its dp slice of axis 0) and of W (its vocabulary slice)."""
    h, w, y, m = arrays
    per_dp = h.shape[0] // config.data_parallel
    rows = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    width = w.shape[0] // config.model_parallel
    return (h[rows], w[mp_rank * width:(mp_rank + 1) * width], y[rows], None if m is None else m[rows])


def run_cases(mode, config, dp_rank, mp_rank, results):
    started = time.perf_counter()
    ms.set_context(mode=MODES[mode])
    for (backend, grad_mode, complete), name in RUNS[mode]:
        options, _, leading, dtype = CASES[name]
        none = options.get("reduction") == "none"
        *arrays, options = job_inputs(name, config.data_parallel)
        h, w, y, m = rank_view(arrays, config, dp_rank, mp_rank)
        loss_fn = LinearCrossEntropyLoss(parallel_config=config, backend=backend, grad_mode=grad_mode,
                                         complete_hidden_grad=complete, chunk_size=CHUNK, **options)
        key = f"{mode}/{backend}/{grad_mode}/{complete}/{name}"
        outputs, d_hidden, d_weight = run_loss(loss_fn, h, w, y, m, dtype=dtype,
                                               dout=upstream_weights(leading) if none else None)
        results[f"{key}/half_weight_read"] = np.array(
            loss_fn.core.reads_half_weight(Tensor(w).astype(MS_DTYPES[dtype])))
        for i, out in enumerate(outputs):
            results[f"{key}/out{i}"] = out
        results[f"{key}/d_hidden"], results[f"{key}/d_weight"] = d_hidden, d_weight
    print(f"{mode}: {len(RUNS[mode])} runs in {time.perf_counter() - started:.1f} s", flush=True)


def nan_arrays(config, where: str):
    """The job's inputs with a NaN in the last dp rank's hidden row NAN_HIDDEN_ROW (counted), or in the first
    head-weight row of the last mp rank (every token's logit of that class)."""
    h, w, y, m, _ = job_inputs("plain", config.data_parallel)
    row = (config.data_parallel - 1) * ROWS + NAN_HIDDEN_ROW
    y[row], m[row] = 1, 1
    if where == "hidden":
        h[row, 0] = np.nan
    else:
        w[(config.model_parallel - 1) * (VOCAB // config.model_parallel), 0] = np.nan
    return h, w, y, m


def nan_check(mode, where, config, dp_rank, mp_rank):
    """The message this rank raises (PYNATIVE) or check_finite reports after the call (GRAPH), or None."""
    ms.set_context(mode=MODES[mode])
    h, w, y, m = rank_view(nan_arrays(config, where), config, dp_rank, mp_rank)
    loss_fn = LinearCrossEntropyLoss(parallel_config=config, check_for_nan_in_loss_and_grad=True, chunk_size=CHUNK)
    try:
        loss_fn(Tensor(h), Tensor(w), Tensor(y), Tensor(m))
        loss_fn.check_finite()
    except NonFiniteLossError as error:
        return str(error)
    return None


def train_inputs(dp: int):
    """A training step's data: features (dp*ROWS, F), labels, the projection A (F, H), the full head W (V, H)."""
    rng = np.random.default_rng(50)
    features = rng.standard_normal((dp * ROWS, TRAIN_FEATURES)).astype(np.float32)
    label = rng.integers(0, VOCAB, dp * ROWS).astype(np.int32)
    projection = (rng.standard_normal((TRAIN_FEATURES, HIDDEN)) * 0.5).astype(np.float32)
    head = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
    return features, label, projection, head


class FusedHeadModel(nn.Cell):
    """features -> tanh(x @ A) -> the fused vocab-parallel head (this rank's rows of W) and loss."""

    def __init__(self, projection, head_rows, loss_fn):
        super().__init__()
        self.projection = Parameter(Tensor(projection), name="projection")
        self.head = Parameter(Tensor(head_rows), name="head")
        self.loss = loss_fn

    def construct(self, features, label):
        return self.loss(ops.tanh(ops.matmul(features, self.projection)), self.head, label)


def training_step(config, dp_rank, mp_rank, grad_mode, ir_dir):
    """Compile value_and_grad + SGD of one step in GRAPH mode with IR dumps on; returns the step's loss, the
    parameters after it, the IR's collective counts and the loss's own collectives_per_call."""
    ms.set_context(mode=ms.GRAPH_MODE)
    features, label, projection, head = train_inputs(config.data_parallel)
    width = VOCAB // config.model_parallel
    loss_fn = LinearCrossEntropyLoss(parallel_config=config, grad_mode=grad_mode, chunk_size=CHUNK)
    net = FusedHeadModel(projection, head[mp_rank * width:(mp_rank + 1) * width], loss_fn)
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1)
    grad_fn = ms.value_and_grad(net, None, optimizer.parameters)

    @ms.jit
    def train_step(features, label):
        loss, grads = grad_fn(features, label)
        optimizer(grads)
        return loss

    tokens = slice(dp_rank * ROWS, (dp_rank + 1) * ROWS)
    ms.set_context(save_graphs=1, save_graphs_path=ir_dir)
    loss = train_step(Tensor(features[tokens]), Tensor(label[tokens]))
    ms.set_context(save_graphs=0)
    final_ir, counts = executed_graph_collectives(ir_dir)
    return dict(loss=float(loss.asnumpy()), final_ir=final_ir, collectives=counts,
                declared=loss_fn.collectives_per_call(ROWS, width)), net.projection.asnumpy(), net.head.asnumpy()


def run_rank(config, dp_rank, mp_rank, ir_dir, modes):
    """Everything this rank checks (the cases in `modes`): (arrays, report) for tests/test_linear_distributed.py."""
    results, report = {}, {}
    for mode in modes:
        run_cases(mode, config, dp_rank, mp_rank, results)
    for mode in MODES:
        for where in ("hidden", "head_weight"):
            report[f"nan/{mode}/{where}"] = nan_check(mode, where, config, dp_rank, mp_rank)
    for grad_mode in ("forward", "recompute"):
        step, results[f"train/{grad_mode}/projection"], results[f"train/{grad_mode}/head"] = training_step(
            config, dp_rank, mp_rank, grad_mode, f"{ir_dir}_{grad_mode}")
        report[f"train/{grad_mode}"] = step
    return results, report
