"""GRAPH mode, ms.jit and a real training step; NaN checks; every user error names what is wrong."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from cases import (CORE_CASES, Case, assert_close, assert_matches, evaluate, expected, full_inputs, loss_options,
                   to_tensors)
from mf_loss import CrossEntropyLoss, LinearCrossEntropyLoss, NonFiniteLossError, ParallelConfig
from mf_loss.options import option_names
from reference import numpy_cross_entropy

pytestmark = pytest.mark.unit

GRAPH_CASES = [c for c in CORE_CASES if c.name in
               ("ignore_and_int_mask", "per_token", "bfloat16", "probs_smoothing_weight", "zloss_softcap",
                "none_float_mask", "all_masked")]


@pytest.mark.parametrize("case", GRAPH_CASES, ids=lambda c: c.name)
def test_graph_mode_equals_pynative_and_numpy(case):
    arrays = full_inputs(case)
    options = loss_options(case)
    reference = expected(case, arrays, options)
    eager = evaluate(CrossEntropyLoss(**options), *to_tensors(case, arrays), options.get("reduction", "mean"))
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = evaluate(CrossEntropyLoss(**options), *to_tensors(case, arrays), options.get("reduction", "mean"))
    assert_matches(case, *graph, *reference, f"{case.name} in GRAPH mode")
    plain = CrossEntropyLoss(**options)(*to_tensors(case, arrays))  # the forward graph alone, as in evaluation
    plain = plain if isinstance(plain, tuple) else (plain,)
    assert len(plain) == len(reference[0])
    for out, ref in zip(plain, reference[0]):
        assert_close(out.astype(ms.float32).asnumpy(), ref, 1e-6, f"{case.name}: GRAPH forward alone")
    assert_matches(case, *eager, *reference, f"{case.name} in PYNATIVE mode")
    for a, b in zip(eager[0] + [eager[1]], graph[0] + [graph[1]]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_jit_value_and_grad_matches_reference():
    case = Case("jit")
    logits, label, mask = full_inputs(case)
    loss_fn = CrossEntropyLoss()
    def objective(x, y, m):
        return loss_fn(x, y, m)

    grad_fn = ms.value_and_grad(objective, grad_position=0)

    @ms.jit
    def step(x, y, m):
        return grad_fn(x, y, m)

    value, grad = step(*to_tensors(case, (logits, label, mask)))
    (expected,), expected_grad, _ = numpy_cross_entropy(logits, label, mask)
    np.testing.assert_allclose(value.asnumpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(grad.asnumpy(), expected_grad, rtol=1e-6, atol=1e-8)


class TinyLM(nn.Cell):
    def __init__(self, hidden, vocab):
        super().__init__()
        self.head = nn.Dense(hidden, vocab, has_bias=False)
        self.loss = CrossEntropyLoss()

    def construct(self, features, label, mask):
        return self.loss(self.head(features), label, mask)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_train_one_step_cell_descends(mode):
    ms.set_context(mode=mode)
    ms.set_seed(0)
    rng = np.random.default_rng(0)
    features = Tensor(rng.standard_normal((32, 8)).astype(np.float32))
    label = Tensor(rng.integers(0, 16, 32).astype(np.int32))
    mask = Tensor(np.ones(32, np.float32))
    net = TinyLM(8, 16)
    head = net.head.weight.asnumpy().astype(np.float64)
    # The first SGD step must move the head weight by exactly -lr * dL/dW from the NumPy reference.
    logits = features.asnumpy() @ head.T
    _, dlogits, _ = numpy_cross_entropy(logits.astype(np.float32), label.asnumpy(), mask.asnumpy())
    expected_head = head - 0.5 * dlogits.T @ features.asnumpy()
    train = nn.TrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.5))
    losses = [float(train(features, label, mask).asnumpy()) for _ in range(5)]
    assert losses[-1] < losses[0]
    net2 = TinyLM(8, 16)
    net2.head.weight.set_data(Tensor(head.astype(np.float32)))
    nn.TrainOneStepCell(net2, nn.SGD(net2.trainable_params(), learning_rate=0.5))(features, label, mask)
    np.testing.assert_allclose(net2.head.weight.asnumpy(), expected_head, rtol=1e-5, atol=1e-6)


def nan_inputs():
    case = Case("nan", mask="int")
    logits, label, mask = full_inputs(case)
    logits[1, 4] = np.nan
    logits[6, 0] = np.inf
    mask[1], mask[6] = 1, 0
    label[1], label[6] = 3, 3
    return case, (logits, label, mask)


def test_nan_check_raises_in_pynative_with_rank_and_count():
    case, arrays = nan_inputs()
    loss_fn = CrossEntropyLoss(check_for_nan_in_loss_and_grad=True)
    with pytest.raises(NonFiniteLossError, match=r"rank 0 \(dp 0, mp 0\): 2 token\(s\) \(1 of them masked out\); "
                                                 r"2 of them non-finite in this rank's own vocabulary slice"):
        loss_fn(*to_tensors(case, arrays))
    # without the check the loss is NaN (the counted row), never silently finite
    assert np.isnan(CrossEntropyLoss()(*to_tensors(case, arrays)).asnumpy())


def test_nan_check_records_in_graph_mode_for_host_side_check(graph_mode):
    case, arrays = nan_inputs()
    loss_fn = CrossEntropyLoss(check_for_nan_in_loss_and_grad=True)
    def objective(x, y, m):
        return loss_fn(x, y, m)

    grad_fn = ms.value_and_grad(objective, grad_position=0)
    clean = full_inputs(case)
    grad_fn(*to_tensors(case, clean))
    loss_fn.check_finite()  # a clean step passes
    grad_fn(*to_tensors(case, arrays))
    grad_fn(*to_tensors(case, clean))  # a later clean micro-batch must not hide the bad one
    with pytest.raises(NonFiniteLossError, match=r"rank 0 \(dp 0, mp 0\): 2 token\(s\)"):
        loss_fn.check_finite()
    loss_fn.check_finite()  # the record was consumed


def call(loss_fn, logits, label, mask=None):
    return loss_fn(Tensor(logits), Tensor(label), None if mask is None else Tensor(mask))


LOGITS = np.zeros((6, 10), np.float32)
LABEL = np.arange(6, dtype=np.int32)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
@pytest.mark.parametrize("args, error, message", [
    ((LOGITS, LABEL[:5]), ValueError, r"label must have shape \(6,\) to match logits \(6, 10\), got \(5,\)"),
    ((LOGITS, LABEL, np.ones(4, np.float32)), ValueError, r"input_mask must have shape .* got \(4,\)"),
    ((LOGITS, LABEL.astype(np.float32)), ValueError, r"float label is read as probability targets and must have "
                                                     r"the logits' shape \(6, 10\).* got \(6,\)"),
    ((LOGITS.astype(np.int32), LABEL), TypeError, r"logits must be float32, float16 or bfloat16, got Int32"),
    ((LOGITS[None, None], LABEL), ValueError, r"logits must have shape \(N, V/mp\) or \(B, S, V/mp\)"),
])
def test_bad_call_inputs_name_the_argument(mode, args, error, message):
    ms.set_context(mode=mode)
    with pytest.raises(error, match=message):
        call(CrossEntropyLoss(), *args)


def test_out_of_range_label_pynative_names_position_and_value():
    label = LABEL.copy()
    label[4] = 10
    with pytest.raises(ValueError, match=r"label\[4\] = 10 is outside \[0, 10\) and is not ignore_index=-100"):
        call(CrossEntropyLoss(), LOGITS, label)


def test_out_of_range_label_in_graph_mode_gives_nan_not_a_wrong_number(graph_mode):
    label = LABEL.copy()
    label[4] = -3
    assert np.isnan(call(CrossEntropyLoss(), LOGITS, label).asnumpy())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\], got 1.5"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (dict(logit_softcap=0.0), ValueError, r"logit_softcap must be None or a float > 0, got 0.0"),
    (dict(weight=np.array([1.0, -1.0], np.float32)), ValueError, r"weight must be finite and >= 0, got weight\[1\] = -1"),
    (dict(weight=np.ones((2, 2), np.float32)), ValueError, r"weight must have shape \(V,\) .* got shape \(2, 2\)"),
    (dict(ignore_indx=-1), TypeError, r"unknown argument 'ignore_indx'; did you mean 'ignore_index'\?"),
    (dict(calculate_per_token_los=True), TypeError, r"did you mean 'calculate_per_token_loss'\?"),
    (dict(parallel_config=ParallelConfig(data_parallel=2, model_parallel=2)), RuntimeError,
     r"data_parallel=2 x model_parallel=2 x pipeline_stage=1 = 4 ranks, but mindspore.communication is not "
     r"initialised"),
    (dict(parallel_config={"data_parallel": 0}), ValueError, r"parallel_config.data_parallel must be a positive int"),
    (dict(empty_mean="inf"), ValueError, r"empty_mean must be one of 'zero', 'nan'"),
])
def test_bad_options_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        CrossEntropyLoss(**kwargs)


def test_weight_length_must_match_vocabulary():
    with pytest.raises(ValueError, match=r"weight has 7 classes but logits of width 10 on 1 model-parallel ranks"):
        call(CrossEntropyLoss(weight=np.ones(7, np.float32)), LOGITS, LABEL)


def test_unrelated_kwargs_are_accepted_like_mindformers():
    loss_fn = CrossEntropyLoss(parallel_config={"data_parallel": 1, "model_parallel": 1, "vocab_emb_dp": True},
                               some_model_key=3)
    assert loss_fn.ignored_kwargs == ["some_model_key"]


class OpParallelConfigLike:
    data_parallel = 1
    model_parallel = 1


# a value other than the default for every option of the cells (mf_loss.options)
NON_DEFAULT_OPTIONS = dict(ignore_index=-1, weight=np.full(10, 2.0, np.float32), reduction="sum",
                           label_smoothing=0.1, z_loss_weight=1e-4, return_z_loss=True, logit_softcap=30.0,
                           empty_mean="nan", backend="composed", chunk_size=3)
CELL_OPTIONS = [(CrossEntropyLoss, dict(NON_DEFAULT_OPTIONS, backend="fused", inplace_backward=True)),
                (LinearCrossEntropyLoss, dict(NON_DEFAULT_OPTIONS, complete_hidden_grad=False, grad_mode="recompute"))]


@pytest.mark.parametrize("cell, keywords", CELL_OPTIONS, ids=["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_every_option_is_a_keyword_after_mindformers_positional_arguments(cell, keywords):
    positional = dict(check_for_nan_in_loss_and_grad=True, calculate_per_token_loss=True, seq_split_num=2)
    assert set(positional) | set(keywords) == set(option_names(cell.OPTIONS))
    loss_fn = cell(ParallelConfig(), *positional.values(), **keywords)
    for name, value in dict(positional, **keywords).items():
        if name == "weight":
            np.testing.assert_array_equal(loss_fn.options.weight, value)
        else:
            assert getattr(loss_fn.options, name) == value, name
    assert loss_fn.per_token and loss_fn.check_for_nan and loss_fn.ignore_index == -1


def test_parallel_config_accepts_mindformers_style_objects():
    assert CrossEntropyLoss(parallel_config=OpParallelConfigLike()).parallel_config == ParallelConfig()


@pytest.fixture
def semi_auto_context():
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel")
    yield
    ms.reset_auto_parallel_context()


def test_semi_auto_mode_attaches_vocab_shard_strategies(semi_auto_context):
    loss_fn = CrossEntropyLoss(parallel_config=ParallelConfig(data_parallel=2, model_parallel=4))
    core = loss_fn.core
    assert type(core).__name__ == "SemiAutoCrossEntropy"
    strategies = {name: getattr(core, name).in_strategy for name in
                  ("cast", "row_max", "shift", "exp", "row_sum", "log", "not_target", "zero_where")}
    assert strategies == {"cast": ((2, 4),), "row_max": ((2, 4),), "shift": ((2, 4), (2, 1)), "exp": ((2, 4),),
                          "row_sum": ((2, 4),), "log": ((2, 1),), "not_target": ((1, 4), (2, 1)),
                          "zero_where": ((2, 4), (2, 4), ())}
    # no float one-hot anywhere in the core
    assert not any(isinstance(p, ops.OneHot) for p in vars(core).values())


@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1, z_loss_weight=1e-3, logit_softcap=4.0),
                                     dict(calculate_per_token_loss=True, ignore_index=5)])
def test_semi_auto_core_gives_the_same_numbers_stand_alone(options):
    # Semi-auto cannot compile on CPU; built in that mode and run stand-alone, the strategies are inert and
    # the numbers must equal the vocab-parallel core's.
    case = Case("semi_auto", options=options)
    tensors = to_tensors(case, full_inputs(case))
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel")
    try:
        semi = CrossEntropyLoss(**options)
    finally:
        ms.reset_auto_parallel_context()
    expected_outputs, expected_grad = evaluate(CrossEntropyLoss(**options), *tensors)
    outputs, grad = evaluate(semi, *tensors)
    for a, b in zip(outputs + [grad], expected_outputs + [expected_grad]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    assert_matches(case, outputs, grad, *expected(case, full_inputs(case), options), "semi-auto core")


def test_semi_auto_mode_rejects_weights_and_inplace_clearly(semi_auto_context):
    with pytest.raises(ValueError, match="weight is not supported in semi_auto/auto parallel mode yet"):
        CrossEntropyLoss(weight=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="inplace_backward=True is not supported in semi_auto/auto parallel mode"):
        CrossEntropyLoss(inplace_backward=True)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
@pytest.mark.parametrize("backend", ["fused", "composed"])
def test_batch_without_rows(mode, backend):
    """N = 0 (MindSpore's CPU reductions refuse empty inputs): the loss of an empty batch, zero-size gradient."""
    ms.set_context(mode=mode)
    logits, label = Tensor(np.zeros((0, 8), np.float32)), Tensor(np.zeros(0, np.int32))
    for options, expected in [(dict(), 0.0), (dict(empty_mean="nan"), np.nan), (dict(reduction="sum"), 0.0)]:
        value, grad = ms.value_and_grad(CrossEntropyLoss(backend=backend, **options))(logits, label)
        np.testing.assert_array_equal(value.asnumpy(), expected, err_msg=str(options))
        assert grad.shape == (0, 8)
    none = CrossEntropyLoss(backend=backend, reduction="none")(Tensor(np.zeros((0, 3, 8), np.float32)),
                                                                Tensor(np.zeros((0, 3), np.int32)))
    assert none.shape == (0, 3)
    numerator, denominator = CrossEntropyLoss(backend=backend, calculate_per_token_loss=True)(logits, label)
    assert float(numerator) == 0.0 and float(denominator) == 0.0
