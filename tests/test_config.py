"""YAML configuration: the shipped configs, the loader's error messages, build_loss, the registry, the CLI's
up-front checks (layout over nodes, capacity, port). No msrun here; everything runs in a few seconds."""
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from mf_loss import CrossEntropyLoss, get_loss_class
from mf_loss.config_loader import (ConfigError, apply_overrides, build_loss, load_config, validate,
                                   validate_world_size)
from mf_loss.train.checks import check_trainable

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
SINGLE = CONFIGS / "single.yaml"


def write_config(tmp_path, changes=None, drop=(), name="case.yaml", base=SINGLE):
    """A copy of `base` with nested `changes` merged in and dotted keys in `drop` removed."""
    tree = yaml.safe_load(base.read_text())
    for dotted in drop:
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        del node[last]

    def merge(dst, src):
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            else:
                dst[key] = value

    merge(tree, changes or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def load_error(path, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("name, world", [("single", 1), ("mp2", 2), ("dp2_mp2", 4), ("dp2_mp2_long", 4)])
def test_shipped_configs_load_and_are_trainable(name, world):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.world_size == world
    assert config["run_name"] == name
    check_trainable(config)
    assert config["loss"]["type"] == "LinearCrossEntropyLoss"  # the fused head is the default
    assert config["loss"]["calculate_per_token_loss"] is True
    assert config["model"]["model_config"]["vocab_size"] % config.parallel["model_parallel"] == 0
    assert config["model"]["arch"]["type"] == "LlamaForCausalLM"


def test_mindformers_style_config_reads_its_blocks():
    config = load_config(CONFIGS / "mindformers_tiny_lm.yaml")
    assert config["model"]["model_config"]["vocab_size"] == 8192
    p = config.parallel
    assert (p["data_parallel"], p["model_parallel"], p["pipeline_stage"], p["micro_batch_num"]) == (2, 2, 1, 2)
    assert p["vocab_emb_dp"] is False and p["use_seq_parallel"] is False
    # MindFormers' batch_size is per data-parallel rank and micro-batch
    assert config["runner_config"]["global_batch_size"] == 4 * 2 * 2
    # `mf_loss.CrossEntropyLoss` is the MindFormers registry alias; it resolves to our class
    assert config["loss"]["type"] == "CrossEntropyLoss"
    assert config["loss"]["check_for_nan_in_loss_and_grad"] is True
    assert config["optimizer"]["eps"] == pytest.approx(1e-5)
    assert set(config.ignored) == {"trainer", "parallel", "callbacks"}


# ------------------------------------------------------------------------------------- loader errors

def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("parallel_config:\n  data_parallel: 1\n  model_paralel: 2\nrunner_config:\n  global_batch_size: 8\n")
    message = load_error(path)
    assert str(path) in message
    assert f"{path}:3" in message
    assert "parallel_config.model_paralel" in message
    assert "did you mean 'model_parallel'?" in message


@pytest.mark.parametrize("changes, key, suggestion", [
    ({"runer_config": {"train_steps": 3}}, "runer_config", "runner_config"),
    ({"loss": {"label_smothing": 0.1}}, "loss.label_smothing", "label_smoothing"),
    ({"model": {"model_config": {"hidden_sise": 32}}}, "model.model_config.hidden_sise", "hidden_size"),
    ({"lr_schedule": {"learning_rat": 0.1}}, "lr_schedule.learning_rat", "learning_rate"),
])
def test_unknown_keys_everywhere_get_a_suggestion(tmp_path, changes, key, suggestion):
    message = load_error(write_config(tmp_path, changes))
    assert f"unknown key {key!r}" in message
    assert f"did you mean {suggestion!r}?" in message
    assert "case.yaml" in message


def test_unknown_key_without_a_close_name_lists_the_valid_ones(tmp_path):
    message = load_error(write_config(tmp_path, {"parallel_config": {"zzz": 1}}))
    assert "unknown key 'parallel_config.zzz'" in message
    assert "valid keys here:" in message and "model_parallel" in message


@pytest.mark.parametrize("changes, key, expected", [
    ({"parallel_config": {"data_parallel": "two"}}, "parallel_config.data_parallel", "expected an int, got 'two' (str)"),
    ({"parallel_config": {"model_parallel": True}}, "parallel_config.model_parallel", "expected an int, got True (bool)"),
    ({"parallel_config": {"model_parallel": 1.5}}, "parallel_config.model_parallel", "expected an int, got 1.5 (float)"),
    # the loss options' own messages (the loader does not check these a second time)
    ({"loss": {"calculate_per_token_loss": "yes please"}}, "loss.calculate_per_token_loss",
     "calculate_per_token_loss must be a bool, got 'yes please'"),
    ({"loss": {"ignore_index": "none"}}, "loss.ignore_index", "ignore_index must be an int, got 'none'"),
    ({"loss": {"label_smoothing": "lots"}}, "loss.label_smoothing", "label_smoothing must be a float in [0, 1], got 'lots'"),
    ({"lr_schedule": {"learning_rate": [1]}}, "lr_schedule.learning_rate", "expected a number, got [1] (list)"),
    ({"runner_config": {"train_steps": 0}}, "runner_config.train_steps", "must be >= 1, got 0"),
    ({"optimizer": {"type": "Adamw"}}, "optimizer.type", "must be one of 'AdamW', 'Adam', 'SGD', got 'Adamw'"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas", "expected 2 numbers, got [0.9]"),
    ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas", "must be in [0.0, 0.999999], got [0.9, 1.5]"),
    ({"optimizer": {"betas": [0.9, "x"]}}, "optimizer.betas", "expected a number, got 'x' (str)"),
    ({"model": {"model_config": {"vocab_size": 200}}}, "model.model_config.vocab_size", "must be >= 258, got 200"),
    ({"train_dataset": {"pad_probability": 1.5}}, "train_dataset.pad_probability", "must be in [0.0, 1.0], got 1.5"),
    ({"parallel_config": "dp2"}, "parallel_config", "must be a mapping of keys, got 'dp2' (str)"),
])
def test_wrong_types_name_the_key_and_what_was_expected(tmp_path, changes, key, expected):
    path = write_config(tmp_path, changes)
    message = load_error(path)
    assert f"{path}" in message
    assert f"{key}: " in message
    assert expected in message


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    config = load_config(write_config(tmp_path, {"lr_schedule": {"learning_rate": "3e-4"}}))
    assert config["lr_schedule"]["learning_rate"] == pytest.approx(3e-4)


def test_loss_values_are_checked_by_the_loss_options(tmp_path):
    message = load_error(write_config(tmp_path, {"loss": {"label_smoothing": 1.5}}))
    assert "loss.label_smoothing" in message and "label_smoothing must be a float in [0, 1]" in message
    message = load_error(write_config(tmp_path, {"loss": {"reduction": "average"}}))
    assert "loss.reduction" in message and "'mean', 'sum', 'none'" in message
    message = load_error(write_config(tmp_path, {"loss": {"type": "CrossEntropyLoss", "inplace_backward": "yes"}}))
    assert "loss.inplace_backward" in message and "inplace_backward must be a bool, got 'yes'" in message
    message = load_error(write_config(tmp_path, {"loss": {"type": "CrossEntropyLoss", "backend": "composed",
                                                          "inplace_backward": True}}))
    assert "loss: inplace_backward=True needs the fused kernels" in message and "got backend='composed'" in message
    config = load_config(write_config(tmp_path, {"loss": {"type": "CrossEntropyLoss", "backend": "fused",
                                                          "inplace_backward": True}}))
    assert build_loss(config).core.inplace


def test_unknown_loss_type_gets_a_suggestion(tmp_path):
    message = load_error(write_config(tmp_path, {"loss": {"type": "CrossEntropyLos"}}))
    assert "loss.type" in message and "did you mean 'CrossEntropyLoss'?" in message


def test_parallel_config_inside_the_loss_block_is_refused(tmp_path):
    message = load_error(write_config(tmp_path, {"loss": {"parallel_config": {"model_parallel": 2}}}))
    assert "loss.parallel_config" in message and "top-level parallel_config" in message


def test_vocab_not_divisible_by_model_parallel(tmp_path):
    path = write_config(tmp_path, {"parallel_config": {"model_parallel": 2}, "model": {"model_config": {"vocab_size": 8193}}})
    message = load_error(path)
    assert str(path) in message
    assert "model.model_config.vocab_size" in message
    assert "8193 is not divisible by parallel_config.model_parallel = 2" in message
    assert "pad it to 8194" in message


def test_world_size_must_match_the_layout():
    config = load_config(CONFIGS / "dp2_mp2.yaml")
    validate_world_size(config, 4)
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "dp2_mp2.yaml", world_size=2)
    message = str(info.value)
    assert "dp2_mp2.yaml" in message
    assert "data_parallel x parallel_config.model_parallel = 2 x 2 = 4 ranks" in message
    assert "world size of 2" in message


def test_global_batch_must_split_into_micro_batches(tmp_path):
    message = load_error(write_config(tmp_path, {"parallel_config": {"data_parallel": 2, "micro_batch_num": 3}}))
    assert "runner_config.global_batch_size" in message and "2 x 3" in message


def test_batch_size_and_global_batch_size_must_agree(tmp_path):
    message = load_error(write_config(tmp_path, {"runner_config": {"batch_size": 3}}))
    assert "runner_config.batch_size" in message and "disagrees with global_batch_size 16" in message


@pytest.mark.parametrize("changes, key", [
    ({"parallel_config": {"pipeline_stage": 2}}, "parallel_config.pipeline_stage"),
    ({"parallel_config": {"use_seq_parallel": True}}, "parallel_config.use_seq_parallel"),
    ({"parallel_config": {"vocab_emb_dp": True}}, "parallel_config.vocab_emb_dp"),
    ({"model": {"model_config": {"num_heads": 5}}}, "model.model_config.num_heads"),
    ({"model": {"model_config": {"num_heads": 128}}}, "model.model_config.num_heads"),  # odd head width: no RoPE
    ({"runner_config": {"gradient_accumulation_steps": 2}}, "runner_config.gradient_accumulation_steps"),
])
def test_unsupported_layouts_are_refused_with_the_key(tmp_path, changes, key):
    assert key in load_error(write_config(tmp_path, changes))


def test_training_needs_per_token_loss(tmp_path):
    config = load_config(write_config(tmp_path, {"loss": {"calculate_per_token_loss": False}}))
    with pytest.raises(ConfigError, match="loss.calculate_per_token_loss: mf-loss train needs true"):
        check_trainable(config)


def test_the_training_job_owns_the_hidden_gradient_sum(tmp_path):
    config = load_config(write_config(tmp_path, {"loss": {"type": "LinearCrossEntropyLoss",
                                                          "complete_hidden_grad": True}}))
    with pytest.raises(ConfigError, match="loss.complete_hidden_grad: the model's copy-to-model-parallel op"):
        check_trainable(config)


def test_overrides_are_validated_like_the_file():
    config = load_config(SINGLE, ["runner_config.train_steps=7", "parallel_config.model_parallel=2"])
    assert config["runner_config"]["train_steps"] == 7 and config.world_size == 2
    assert "with overrides" in config.source
    with pytest.raises(ConfigError, match="unknown key 'runner_config.train_step'; did you mean 'train_steps'"):
        load_config(SINGLE, ["runner_config.train_step=7"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_overrides({}, ["runner_config.train_steps"])


def test_unreadable_and_invalid_files(tmp_path):
    assert "cannot read configuration file" in load_error(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel_config: [1, 2\n")
    assert "not valid YAML" in load_error(bad)


# ------------------------------------------------------------------------------------- build_loss

def _numpy_token_mean(logits, labels, mask, ignore_index=-100):
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    counted = (mask != 0) & (labels != ignore_index)
    picked = np.where(counted, -logp[np.arange(len(labels)), np.where(counted, labels, 0)], 0.0)
    return float((picked * mask).sum()), float((mask * counted).sum())


def test_build_loss_builds_the_configured_loss(tmp_path):
    config = load_config(write_config(tmp_path, {"loss": {"type": "CrossEntropyLoss", "ignore_index": -1,
                                                          "label_smoothing": 0.0,
                                                          "z_loss_weight": 0.0}}))
    loss = build_loss(config)
    assert isinstance(loss, CrossEntropyLoss)
    assert loss.per_token and loss.ignore_index == -1 and loss.check_for_nan
    assert loss.parallel_config.data_parallel == 1 and loss.parallel_config.model_parallel == 1

    import mindspore as ms
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10)).astype(np.float32)
    labels = np.array([1, 2, -1, 3, 9, 0], np.int32)
    mask = np.array([1, 1, 1, 0, 1, 1], np.float32)
    num, den = loss(ms.Tensor(logits), ms.Tensor(labels), ms.Tensor(mask))
    ref_num, ref_den = _numpy_token_mean(logits, labels, mask, ignore_index=-1)
    assert float(num.asnumpy()) == pytest.approx(ref_num, rel=1e-5)
    assert float(den.asnumpy()) == ref_den == 4


def test_build_loss_from_a_bare_block_and_by_class_name():
    loss = build_loss({"type": "mf_loss.CrossEntropyLoss", "label_smoothing": 0.1, "reduction": "sum"})
    assert isinstance(loss, CrossEntropyLoss) and loss.reduction == "sum"
    assert loss.options.label_smoothing == pytest.approx(0.1)
    assert isinstance(build_loss(class_name="CrossEntropyLoss"), CrossEntropyLoss)
    loss = build_loss({"type": "CrossEntropyLoss"}, default_args={"parallel_config": {"data_parallel": 1}},
                      ignore_index=5)
    assert loss.ignore_index == 5
    with pytest.raises(ConfigError, match="unknown key 'loss.smoothing'"):
        build_loss({"type": "CrossEntropyLoss", "smoothing": 0.1})


def test_build_loss_for_a_parallel_layout_needs_the_ranks():
    # mp = 2 without msrun: the loss refuses with the layout in the message, prefixed by the file
    with pytest.raises(ConfigError) as info:
        build_loss(load_config(CONFIGS / "mp2.yaml"))
    assert "mp2.yaml: loss:" in str(info.value) and "msrun" in str(info.value)


# ------------------------------------------------------------------------------------- registries

def test_loss_is_registered_under_its_name():
    assert get_loss_class("CrossEntropyLoss") is CrossEntropyLoss
    with pytest.raises(KeyError, match="unknown loss type 'Nope'; registered: .*CrossEntropyLoss"):
        get_loss_class("Nope")


# ------------------------------------------------------------------------------------- CLI up-front checks

def run_cli(argv, capsys):
    from mf_loss.cli import main
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_too_many_ranks_for_the_machine(tmp_path, capsys):
    from mf_loss.train.run import usable_cores
    mp = 8
    dp = 4 * usable_cores()  # dp x 8 > 4 ranks per core, whatever the machine
    path = write_config(tmp_path, {"parallel_config": {"data_parallel": dp, "model_parallel": mp, "micro_batch_num": 1},
                                   "runner_config": {"global_batch_size": dp}})
    code, output = run_cli(["train", "--config", str(path), "--output-dir", str(tmp_path / "runs")], capsys)
    assert code == 1
    assert f"{dp} x {mp} = {dp * mp} ranks, {dp * mp} on this node, more than this machine can run" in output
    assert str(path) in output
    assert not (tmp_path / "runs").exists()


def test_busy_port_is_reported_before_anything_starts(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, output = run_cli(["train", "--config", str(CONFIGS / "mp2.yaml"), "--port", str(port),
                                "--output-dir", str(tmp_path / "runs")], capsys)
    assert code == 1
    assert f"--port {port} is busy or unreachable" in output and "leave --port out" in output
    assert not (tmp_path / "runs").exists()
    code, output = run_cli(["demo", "--port", "70000"], capsys)
    assert code == 1 and "--port 70000 is not a TCP port" in output


def test_config_errors_exit_2_with_the_message(tmp_path, capsys):
    path = write_config(tmp_path, {"parallel_config": {"model_paralel": 2}})
    code, output = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2
    assert "configuration error" in output and "did you mean 'model_parallel'?" in output


def test_bench_subcommand_is_imported_lazily(monkeypatch):
    import mf_loss.cli as cli
    calls = []
    fake = types.ModuleType("mf_loss.bench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "mf_loss.bench", fake)
    import mf_loss
    monkeypatch.setattr(mf_loss, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "--out", "x"]) == 0
    assert calls == [["--quick", "--out", "x"]]


def test_validate_accepts_an_in_memory_tree():
    config = validate({"runner_config": {"global_batch_size": 4}}, "inline")
    assert config["run_name"] == "inline" and config.world_size == 1


@pytest.mark.parametrize("nnodes, node_rank, expected", [
    (2, 0, 2), (2, 1, 2), (4, 3, 1),
])
def test_layout_over_nodes(nnodes, node_rank, expected):
    from mf_loss.train.run import check_layout
    one_rank_groups = ["parallel_config.data_parallel=4", "parallel_config.model_parallel=1"]
    config = load_config(CONFIGS / "dp2_mp2.yaml", one_rank_groups if expected == 1 else [])
    assert check_layout(config, nnodes, node_rank) == expected


@pytest.mark.parametrize("overrides, nnodes, node_rank, message", [
    ([], 3, 0, "4 ranks do not split evenly over --nnodes 3"),
    ([], 4, 0, "1 rank(s) per node cannot hold whole model-parallel groups of 2"),
    ([], 2, 2, "--node-rank 2 must be in [0, --nnodes 2)"),
])
def test_layouts_that_cannot_span_the_nodes_are_refused(overrides, nnodes, node_rank, message):
    from mf_loss.train.run import TrainError, check_layout
    with pytest.raises(TrainError) as info:
        check_layout(load_config(CONFIGS / "dp2_mp2.yaml", overrides), nnodes, node_rank)
    assert message in str(info.value)


def test_several_nodes_need_the_master_port(tmp_path):
    from mf_loss.train.run import TrainError, train_command
    with pytest.raises(TrainError, match="--nnodes > 1 needs --master-port"):
        train_command(str(CONFIGS / "dp2_mp2.yaml"), nnodes=2, node_rank=1, output_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_the_loader_checks_a_loss_block_with_the_class_options(tmp_path):
    """The loader has no type table of its own: each loss class's options (mf_loss.options) check its block."""
    message = load_error(write_config(tmp_path, {"loss": {"type": "LinearCrossEntropyLoss", "grad_mode": "fast"}}))
    assert "loss.grad_mode" in message and "grad_mode must be one of 'auto', 'forward', 'recompute'" in message
    message = load_error(write_config(tmp_path, {"loss": {"type": "LinearCrossEntropyLoss", "chunk_size": 0}}))
    assert "loss.chunk_size" in message and "chunk_size must be None or a positive int" in message
    message = load_error(write_config(tmp_path, {"loss": {"weight": ["heavy"]}}))
    assert "loss.weight" in message and "weight must be numbers" in message
    message = load_error(write_config(tmp_path, {"loss": {"type": "LinearCrossEntropyLoss",
                                                          "inplace_backward": True}}))
    assert "unknown key 'loss.inplace_backward'" in message
    config = load_config(write_config(tmp_path, {"loss": {"type": "LinearCrossEntropyLoss", "logit_softcap": "3e1",
                                                          "calculate_per_token_loss": True}}))
    assert config["loss"]["logit_softcap"] == 30.0
