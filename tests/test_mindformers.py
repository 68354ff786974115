"""Real MindFormers (1.9.0) with our losses: the registries from YAML, the Llama with our loss beside MindFormers'
own loss, and the checks of the MindFormers trainer. Runs in the MindFormers environment
(scripts/mindformers_env.sh); the main suite runs this file there through tests/test_mindformers_suite.py."""
import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

if importlib.util.find_spec("mindformers") is None:
    pytest.skip("needs the MindFormers environment; tests/test_mindformers_suite.py runs this file in it",
                allow_module_level=True)

import mindspore as ms  # noqa: E402

import mf_loss  # noqa: E402
from mf_loss.config_loader import ConfigError  # noqa: E402
from mf_loss.integrations import mindformers as integration  # noqa: E402
from mf_loss.integrations.mindformers_train import (BYTE_VOCAB, PAD_ID, build_model, counted_tokens,  # noqa: E402
                                                    global_batch, load_run_config, rank_micro_batches)

from mindformers.core.loss import build_loss  # noqa: E402
from mindformers.core.loss import CrossEntropyLoss as MindFormersCrossEntropyLoss  # noqa: E402
from mindformers.models.build_model import build_network  # noqa: E402
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister  # noqa: E402

import mindformers_compare as compare  # noqa: E402

pytestmark = pytest.mark.mindformers


# ------------------------------------------------------------------------------------------- registries

def test_every_mf_loss_loss_is_a_mindformers_loss():
    names = {f"mf_loss.{name}": cls for name, cls in mf_loss.registry.registered_losses().items()}
    assert "mf_loss.CrossEntropyLoss" in names
    if hasattr(mf_loss, "LinearCrossEntropyLoss"):
        assert names["mf_loss.LinearCrossEntropyLoss"] is mf_loss.LinearCrossEntropyLoss
    for name, cls in names.items():
        assert MindFormerRegister.get_cls(MindFormerModuleType.LOSS, name) is cls
    # MindFormers' own name still builds MindFormers' own loss
    assert MindFormerRegister.get_cls(MindFormerModuleType.LOSS, "CrossEntropyLoss") is MindFormersCrossEntropyLoss


def test_build_loss_by_name_from_a_yaml_block(tmp_path):
    path = tmp_path / "loss.yaml"
    path.write_text("loss:\n  type: mf_loss.CrossEntropyLoss\n  ignore_index: -1\n  label_smoothing: 0.1\n"
                    "  calculate_per_token_loss: true\n")
    loss = build_loss(MindFormerConfig(str(path)).loss)
    assert type(loss) is mf_loss.CrossEntropyLoss
    assert loss.per_token and loss.ignore_index == -1
    logits = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    labels = np.array([1, -1, 3, 7, 0, -1], np.int32)
    numerator, denominator = loss(ms.Tensor(logits), ms.Tensor(labels))
    assert float(denominator.asnumpy()) == 4.0  # the two labels equal to ignore_index = -1 do not count


def test_build_network_from_the_shipped_yaml_gives_our_llama():
    """MindFormers' own YAML reader and build_network, as its Trainer uses them, on configs/mindformers_llama.yaml
    (one rank here: the file's 2 x 2 layout needs msrun)."""
    config = MindFormerConfig(str(compare.CONFIG))
    assert config.model.arch.type == "VocabParallelLlamaForCausalLM"
    parallel = dict(config.parallel_config, data_parallel=1, model_parallel=1)
    network = build_network(config.model, default_args={"parallel_config": parallel, "loss": config.loss})
    assert type(network) is integration.VocabParallelLlamaForCausalLM
    assert type(network.loss) is mf_loss.CrossEntropyLoss and network.loss.per_token
    assert network.lm_head.weight.shape == (256, 64)
    network.set_train(True)
    input_ids = ms.Tensor(compare.corpus_batch(seq=64))
    numerator, denominator = network(input_ids)
    assert float(denominator.asnumpy()) == input_ids.shape[0] * 64
    assert np.isfinite(float(numerator.asnumpy()))


def test_a_loss_block_inside_model_config_is_used_too():
    """For MindFormers' own Trainer, which passes no loss block to build_network: model.model_config.loss."""
    config = MindFormerConfig(str(compare.CONFIG))
    config.model.model_config.loss = {"type": "mf_loss.CrossEntropyLoss", "ignore_index": -7}
    parallel = dict(config.parallel_config, data_parallel=1, model_parallel=1)
    network = build_network(config.model, default_args={"parallel_config": parallel})
    assert type(network.loss) is mf_loss.CrossEntropyLoss and network.loss.ignore_index == -7
    assert not network.loss.per_token


def test_the_model_parallel_layout_needs_msrun():
    config = compare.single_rank_config(**{"parallel_config.model_parallel": 2})
    with pytest.raises(Exception, match="msrun"):
        build_model(config)


def test_mindformers_loss_is_refused_with_a_split_vocabulary():
    with pytest.raises(ConfigError, match="needs the whole vocabulary"):
        integration.build_model_loss({"type": "CrossEntropyLoss"}, mf_loss.ParallelConfig(1, 2))


def test_unknown_loss_keys_are_named():
    with pytest.raises(ConfigError, match="label_smothing"):
        integration.build_model_loss({"type": "mf_loss.CrossEntropyLoss", "label_smothing": 0.1},
                                     mf_loss.ParallelConfig(1, 1))


# ------------------------------------------------------------------------------------- against MindFormers

def test_our_loss_equals_mindformers_loss_on_a_llama_batch_without_ignored_tokens():
    result = compare.no_ignored_tokens()
    assert result["weights_max_diff"] == 0.0   # same seed, same weights: the comparison is on one model
    assert result["grad_names"]
    assert result["loss_ours"] == pytest.approx(result["loss_theirs"], rel=1e-6)
    assert result["grads_max_diff"] <= 1e-6 * result["grads_max"]


def test_ignored_tokens_table_shows_the_documented_differences():
    rows = {case.split(",")[0] if case.startswith("loss, ") and "-100 with mask 1" in case else case: (theirs, ours)
            for case, theirs, ours in compare.ignored_token_table()}
    theirs_loss, ours_loss = rows["loss"]
    theirs_den, ours_den = rows["denominator (tokens counted)"]
    assert theirs_den > ours_den > 0
    # both add nothing for an ignored label; only the denominator differs
    assert theirs_loss * theirs_den == pytest.approx(ours_loss * ours_den, rel=1e-5)
    theirs_grad, ours_grad = rows["sum of |gradient| over the ignored rows"]
    assert ours_grad == 0.0
    # theirs: a softmax row (summing to 1) divided by N on every ignored row
    assert theirs_grad == pytest.approx((theirs_den - ours_den) / theirs_den, rel=1e-4)
    theirs_max, ours_max = rows["max |gradient| on the counted rows"]
    assert theirs_max == pytest.approx(ours_max * ours_den / theirs_den, rel=1e-5)  # 1/N instead of 1/counted
    assert rows["loss, the same labels with mask = (label != -100)"][0] == pytest.approx(
        rows["loss, the same labels with mask = (label != -100)"][1], rel=1e-6)
    assert rows["loss, every label -100"] == (0.0, 0.0)
    theirs_nan, ours_nan = rows["loss, NaN logit in a row with mask 0"]
    assert np.isnan(theirs_nan) and np.isfinite(ours_nan)


_LOSS_CELLS = {}


def _value_and_logits_grad(name, logits, labels, mask):
    if not _LOSS_CELLS:
        _LOSS_CELLS.update(ours=mf_loss.CrossEntropyLoss(), theirs=MindFormersCrossEntropyLoss())
    value, grad = ms.value_and_grad(_LOSS_CELLS[name], 0)(ms.Tensor(logits), ms.Tensor(labels), ms.Tensor(mask))
    return float(np.asarray(value.asnumpy()).reshape(())), grad.asnumpy()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(rows=st.integers(1, 24), vocab=st.sampled_from([2, 7, 64, 256]), seed=st.integers(0, 2**32 - 1),
       ignored_fraction=st.sampled_from([0.0, 0.0, 0.3, 1.0]), float_mask=st.booleans())
def test_against_mindformers_loss_on_any_batch(rows, vocab, seed, ignored_fraction, float_mask):
    """Our loss and MindFormers' on the same logits: equal when no label is ignore_index; otherwise the same
    numerator over different denominators (theirs counts the ignored labels), and zero gradient rows for them."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    labels = rng.integers(0, vocab, rows).astype(np.int32)
    ignored = rng.random(rows) < ignored_fraction
    labels[ignored] = -100
    mask = (rng.random(rows) if float_mask else (rng.random(rows) < 0.8)).astype(np.float32)
    ours, ours_grad = _value_and_logits_grad("ours", logits, labels, mask)
    theirs, theirs_grad = _value_and_logits_grad("theirs", logits, labels, mask)
    their_denominator = float(mask.astype(np.float64).sum()) + 1e-8
    our_denominator = float((mask * ~ignored).astype(np.float64).sum())
    if our_denominator == 0:
        assert ours == 0.0 and not ours_grad.any()
        assert theirs == pytest.approx(0.0, abs=1e-6)
        return
    assert theirs * their_denominator == pytest.approx(ours * our_denominator, rel=2e-5, abs=1e-6)
    assert not ours_grad[ignored].any()
    np.testing.assert_allclose(ours_grad[~ignored] * our_denominator, theirs_grad[~ignored] * their_denominator,
                               rtol=2e-5, atol=1e-6)
    if not ignored.any():
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------ the trainer

def test_batches_are_the_same_global_batch_for_every_layout():
    single = compare.single_rank_config(**{"runner_config.batch_size": 2, "parallel_config.micro_batch_num": 4})
    split = compare.single_rank_config(**{"runner_config.batch_size": 2, "parallel_config.micro_batch_num": 2,
                                          "parallel_config.data_parallel": 2})
    ids = compare.corpus_ids("builtin")
    whole = global_batch(ids, single, 3)
    np.testing.assert_array_equal(whole.input_ids, global_batch(ids, split, 3).input_ids)
    parts = [rank_micro_batches(whole, split, d) for d in range(2)]
    np.testing.assert_array_equal(np.concatenate([p.input_ids.reshape(-1, 33) for p in parts]), whole.input_ids)
    assert counted_tokens(parts[0], -100) < counted_tokens(parts[1], -100)  # row 0 is always padded
    assert whole.input_ids.max() < BYTE_VOCAB and (whole.input_ids == PAD_ID).any()
    padded = whole.input_ids == PAD_ID
    assert (whole.labels[padded] == -100).all()


@pytest.mark.parametrize("override, message", [
    ("model.model_config.vocab_size=255", "byte-level data needs 256"),
    ("parallel_config.model_parallel=3", "not divisible by parallel_config.model_parallel = 3"),
    ("loss.calculate_per_token_loss=false", "exact global token mean"),
    ("loss.type=CrossEntropyLoss", "needs an mf_loss loss"),
    ("loss.ignore_index=-1", "must equal model.model_config.ignore_token_id"),
    ("runner_config.batch_size=two", "runner_config.batch_size: expected int"),
    ("parallel_config.vocab_emb_dp=true", "vocab_emb_dp"),
    ("model.arch.type=LlamaForCausalLM", "model.arch.type"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_run_config(compare.CONFIG, [override])
    assert "mindformers_llama.yaml" in str(error.value)


# --------------------------------------------------------------------------------------------- fused head

@pytest.mark.skipif(not hasattr(mf_loss, "LinearCrossEntropyLoss"), reason="mf_loss has no LinearCrossEntropyLoss")
def test_fused_head_llama_equals_the_logits_llama():
    """loss.type mf_loss.LinearCrossEntropyLoss: the Llama hands its hidden state and head rows to the loss (no
    logits); same loss and parameter gradients as with the logits and CrossEntropyLoss."""
    config = compare.single_rank_config()
    block = {"calculate_per_token_loss": True, "ignore_index": -100}
    fused = build_model(config, {"type": "mf_loss.LinearCrossEntropyLoss", **block})
    plain = build_model(config, {"type": "mf_loss.CrossEntropyLoss", **block})
    assert fused.fused_head and not plain.fused_head
    batch = global_batch(compare.corpus_ids("builtin"), config, 0)  # padded rows and ignored spans included
    inputs = (ms.Tensor(batch.input_ids), ms.Tensor(batch.labels))
    (num_fused, den_fused), grads_fused = _per_token_loss_and_grads(fused, inputs)
    (num_plain, den_plain), grads_plain = _per_token_loss_and_grads(plain, inputs)
    assert den_fused == den_plain == counted_tokens(batch, -100)
    assert num_fused == pytest.approx(num_plain, rel=1e-6)
    scale = max(float(np.abs(g).max()) for g in grads_plain.values())
    for name, grad in grads_plain.items():
        np.testing.assert_allclose(grads_fused[name], grad, rtol=0, atol=1e-6 * scale, err_msg=name)


def _per_token_loss_and_grads(network, inputs):
    params = network.trainable_params()
    (numerator, denominator), grads = ms.value_and_grad(network, None, params, has_aux=True)(*inputs)
    return (float(numerator.asnumpy()), float(denominator.asnumpy())), {
        p.name: g.asnumpy() for p, g in zip(params, grads)}
