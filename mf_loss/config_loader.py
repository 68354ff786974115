"""YAML configuration: load, validate, and build the loss from it.

A configuration is laid out like a MindFormers model config (`parallel_config`, `model.model_config`,
`runner_config`, `optimizer`, `lr_schedule`, ...) plus a `loss` block. Every key is checked: an unknown
key is reported with the closest valid name, a wrong type or value with the key's path, always with the
file and line it came from. The loss block's keys are the loss class's options; their values are checked by
the class's options (`mf_loss.options`: the loss's own validation), once. MindFormers blocks that
this project does not use (`parallel`, `trainer`, `callbacks`, ...) are accepted as they are and listed in
`Config.ignored`. The library part (`build_loss`) does not depend on the training job.

    config = load_config("configs/dp2_mp2.yaml", overrides=["runner_config.train_steps=20"])
    loss = build_loss(config)            # the configured loss, for the configured parallel layout
"""
import difflib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Optional

import yaml

from .options import option_names
from .registry import get_loss_class, registered_losses

_MISSING = object()
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # YAML 1.1 reads '1e-3' as a string
_TYPE_NAMES = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string", list: "a list"}


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


class Config(dict):
    """The validated configuration tree (defaults filled in), with where it came from."""

    def __init__(self, tree: dict, source: str, ignored=()):
        super().__init__(tree)
        self.source = source
        self.ignored = list(ignored)

    @property
    def parallel(self) -> dict:
        return self["parallel_config"]

    @property
    def world_size(self) -> int:
        p = self["parallel_config"]
        return p["data_parallel"] * p["model_parallel"] * p["pipeline_stage"]


# ----------------------------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class Key:
    """One leaf: its type (int values are accepted for float), default, and optional choices / bounds."""
    type: type
    default: object = None
    choices: tuple = None
    minimum: float = None
    maximum: float = None
    length: int = None      # for lists: the number of entries, each a number within the bounds


OPAQUE = "opaque"           # a MindFormers block accepted and not read
LOSS = "loss"               # the keys of the loss class named by `type`


def _positive(default):
    return Key(int, default, minimum=1)


def _fraction(default):
    return Key(float, default, minimum=0.0, maximum=1.0)


SCHEMA = {
    "run_name": Key(str),   # outputs go to <output_dir>/<run_name>; default: the file's name
    "seed": Key(int, 1234),
    "output_dir": Key(str, "runs"),
    "run_mode": Key(str, "train", choices=("train",)),
    "use_parallel": Key(bool),
    "resume_training": Key(bool, False),
    "load_checkpoint": Key(str),  # a run directory or its checkpoints/ to resume from
    "context": {
        "mode": Key(object, 0, choices=(0, 1, "GRAPH_MODE", "PYNATIVE_MODE")),
        "device_target": Key(str, "CPU", choices=("CPU",)),
        "device_id": Key(int), "max_call_depth": Key(int), "max_device_memory": Key(str),
        "save_graphs": Key(object), "save_graphs_path": Key(str), "jit_config": OPAQUE,
    },
    "parallel_config": {
        "data_parallel": _positive(1), "model_parallel": _positive(1),
        "pipeline_stage": Key(int, 1, choices=(1,)), "context_parallel": Key(int, 1, choices=(1,)),
        "expert_parallel": Key(int, 1, choices=(1,)),
        "micro_batch_num": _positive(1),        # micro-batches per step on each data-parallel rank
        "seq_split_num": _positive(1),
        "vocab_emb_dp": Key(bool, False, choices=(False,)),   # the output layer is split over mp ranks
        "use_seq_parallel": Key(bool, False, choices=(False,)),
        "gradient_aggregation_group": _positive(4), "optimizer_shard": Key(bool),
    },
    "model": {
        "arch": {"type": Key(str, "LlamaForCausalLM", choices=("LlamaForCausalLM", "TinyCausalLM"))},
        "model_config": {
            "type": Key(str, "LlamaConfig", choices=("LlamaConfig", "TinyCausalLMConfig")),
            "vocab_size": Key(int, 8192, minimum=258),  # byte-level BPE: 256 bytes + <pad> + merges
            "hidden_size": _positive(128), "num_layers": Key(int, 2, minimum=0), "num_heads": _positive(4),
            "seq_length": Key(int, 64, minimum=2), "ffn_hidden_size": Key(int, minimum=1),
            "init_std": Key(float, 0.02, minimum=0.0), "rms_norm_eps": Key(float, 1e-5, minimum=0.0),
            "rope_theta": Key(float, 10000.0, minimum=1.0),
            "compute_dtype": Key(str, "float32", choices=("float32",)),
            "param_init_type": Key(str, "float32", choices=("float32",)),
        },
    },
    "loss": LOSS,
    "optimizer": {  # MindSpore's nn.AdamWeightDecay, nn.Adam, nn.SGD
        "type": Key(str, "AdamW", choices=("AdamW", "Adam", "SGD")),
        "betas": Key(list, [0.9, 0.95], minimum=0.0, maximum=0.999999, length=2),
        "eps": Key(float, 1e-8, minimum=0.0), "weight_decay": Key(float, 0.0, minimum=0.0),
        "momentum": Key(float, 0.0, minimum=0.0),
        "max_grad_norm": Key(float, minimum=0.0),   # clip the global gradient norm to this; null: no clipping
    },
    "lr_schedule": {
        "type": Key(str, "ConstantWarmUpLR", choices=("ConstantWarmUpLR", "CosineWithWarmUpLR")),
        "learning_rate": Key(float, 3e-3, minimum=0.0), "lr_end": Key(float, 0.0, minimum=0.0),
        "warmup_steps": Key(int, 0, minimum=0), "warmup_ratio": _fraction(None),
        "total_steps": Key(int),                    # -1 or null: runner_config.train_steps
    },
    "runner_config": {
        "train_steps": _positive(200),
        "global_batch_size": _positive(None),       # rows per step over all data-parallel ranks
        "batch_size": _positive(None),              # MindFormers' rows per micro-batch per data-parallel rank
        "log_interval": _positive(10), "save_checkpoint_steps": Key(int, 50, minimum=0),
        "keep_checkpoint_max": _positive(2), "epochs": _positive(None), "sink_mode": Key(bool),
        "sink_size": Key(int),
        "gradient_accumulation_steps": Key(int, 1, choices=(1,)),  # use parallel_config.micro_batch_num
        "measure_loss_time": Key(bool, True),  # time the output layer + loss alone after training (one compile)
    },
    "train_dataset": {
        "corpus": Key(str, "builtin"),              # 'builtin' (mf_loss/data, King James Bible) or a text file
        "pad_probability": _fraction(0.25), "ignore_probability": _fraction(0.15),
    },
    **{name: OPAQUE for name in (
        "parallel", "trainer", "callbacks", "processor", "recompute_config", "moe_config", "profile",
        "profile_start_step", "profile_stop_step", "metric", "eval_dataset", "eval_dataset_task",
        "train_dataset_task", "runner_wrapper", "wrapper", "auto_trans_ckpt", "src_strategy_path_or_dir",
        "only_save_strategy", "do_eval", "eval_step_interval", "eval_epoch_interval", "micro_batch_interleave_num",
        "swap_config", "monitor_config", "auto_tune", "filepath_prefix", "autotune_per_step", "layer_scale",
        "layer_decay", "lr_scale", "lr_scale_factor", "remote_save_url", "model_name", "use_legacy")},
}

# ---------------------------------------------------------------------------------------------- checking

class _Checker:
    def __init__(self, source: str, lines: dict):
        self.source, self.lines, self.ignored = source, lines, []

    def fail(self, path: str, message: str):
        line = self.lines.get(path)
        raise ConfigError(f"{self.source}:{line}: {path}: {message}" if line else f"{self.source}: {path}: {message}")

    def known(self, path: str, given: dict, valid) -> None:
        for key in given:
            if key not in valid:
                full = f"{path}.{key}" if path else str(key)
                close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(sorted(valid))}"
                line = self.lines.get(full)
                raise ConfigError(f"{self.source}{f':{line}' if line else ''}: unknown key {full!r}; {hint}")

    def mapping(self, value, path: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping of keys, got {_show(value)}")
        return value

    def section(self, spec: dict, value, path: str) -> dict:
        value = self.mapping(value, path)
        self.known(path, value, spec)
        out = {}
        for key, sub in spec.items():
            full, given = f"{path}.{key}" if path else key, value.get(key, _MISSING)
            if sub is OPAQUE:
                if given is not _MISSING:
                    out[key] = given
                    self.ignored.append(full)
            elif sub is LOSS:
                out[key] = self.loss(None if given is _MISSING else given, full)
            elif isinstance(sub, dict):
                out[key] = self.section(sub, None if given is _MISSING else given, full)
            elif given is _MISSING:
                out[key] = list(sub.default) if isinstance(sub.default, list) else sub.default
            else:
                out[key] = self.leaf(sub, given, full)
        return out

    def leaf(self, spec: Key, value, path: str):
        if value is None:
            return None
        value = self.typed(value, spec.type, path)
        if spec.choices is not None and value not in spec.choices:
            self.fail(path, f"must be one of {', '.join(map(repr, spec.choices))}, got {value!r}")
        numbers = [self.typed(v, float, path) for v in value] if isinstance(value, list) else [value]
        if spec.length is not None and len(value) != spec.length:
            self.fail(path, f"expected {spec.length} numbers, got {value!r}")
        for number in numbers if spec.type in (int, float, list) else ():
            if (spec.minimum is not None and number < spec.minimum) or (spec.maximum is not None
                                                                         and number > spec.maximum):
                bounds = (f"in [{spec.minimum}, {spec.maximum}]" if spec.maximum is not None
                          else f">= {spec.minimum}")
                self.fail(path, f"must be {bounds}, got {value!r}")
        return numbers if isinstance(value, list) and spec.type is list and spec.length else value

    def typed(self, value, expected: type, path: str):
        converted = _as_type(value, expected)
        if converted is _MISSING:
            self.fail(path, f"expected {_TYPE_NAMES.get(expected, expected.__name__)}, got {_show(value)}")
        return converted

    def loss(self, value, path: str) -> dict:
        value = dict(self.mapping(value, path))
        type_name = value.pop("type", "CrossEntropyLoss")
        if not isinstance(type_name, str):
            self.fail(f"{path}.type", f"expected a loss class name (a string), got {_show(type_name)}")
        try:
            cls = resolve_loss_class(type_name)
        except KeyError:
            close = difflib.get_close_matches(type_name, list(registered_losses()), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"registered: {', '.join(sorted(registered_losses()))}"
            self.fail(f"{path}.type", f"unknown loss type {type_name!r}; {hint}")
        if "parallel_config" in value:
            self.fail(f"{path}.parallel_config", "the loss takes its layout from the top-level parallel_config "
                                                 "block; remove it here")
        options_class = cls.OPTIONS
        self.known(path, value, ["type", *option_names(options_class)])
        float_fields = {f.name for f in fields(options_class) if f.type in (float, Optional[float])}
        out = {"type": cls.__name__}
        for key, given in value.items():  # YAML 1.1 reads '1e-3' as a string
            out[key] = _as_type(given, float) if key in float_fields and isinstance(given, str) and \
                _FLOAT_TEXT.match(given.strip()) else given
        given_options = {key: out[key] for key in out if key != "type"}
        for key, given in given_options.items():  # one key at a time first: the error names its line
            self.loss_options(f"{path}.{key}", options_class, {key: given})
        self.loss_options(path, options_class, given_options)    # then together: some options exclude others
        return out

    def loss_options(self, path: str, options_class, options: dict) -> None:
        try:
            options_class(**options)
        except (TypeError, ValueError) as error:
            self.fail(path, str(error))


def _as_type(value, expected: type):
    """`value` as `expected` (an int is a number; YAML 1.1's '1e-3' string is a number too), or _MISSING."""
    if expected is object:
        return value
    if expected is float and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool):
        return value
    return _MISSING


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _line_map(text: str) -> dict:
    """'a.b.c' -> 1-based line of that key in the YAML text."""
    lines = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    walk(root, "")
    return lines


# ------------------------------------------------------------------------------------------- public API

def resolve_loss_class(name: str):
    """A registered loss class by name; MindFormers' alias `mf_loss.<Name>` works too."""
    return get_loss_class(name[len("mf_loss."):] if name.startswith("mf_loss.") else name)


def apply_overrides(tree: dict, overrides: Iterable[str]) -> dict:
    """Apply 'a.b.c=value' strings (the value read as YAML) to `tree`."""
    for text in overrides:
        key, sep, raw = text.partition("=")
        path = [part for part in key.strip().split(".") if part]
        if not sep or not path:
            raise ConfigError(f"override {text!r} must look like key.path=value, e.g. runner_config.train_steps=20")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
        node = tree
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a block")
        node[path[-1]] = value
    return tree


def validate(tree: dict, source: str = "<config>", lines: Optional[dict] = None,
             world_size: Optional[int] = None) -> Config:
    """Check a raw configuration tree; returns the Config with defaults filled in."""
    checker = _Checker(source, lines or {})
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"{source}: the file must hold a mapping of keys at the top, got {_show(tree)}")
    config = Config(checker.section(SCHEMA, tree, ""), source, checker.ignored)
    if config["run_name"] is None:
        config["run_name"] = Path(source.split(" (")[0]).stem if source not in ("<config>", "") else "run"
    _check_layout(config, checker)
    if world_size is not None:
        validate_world_size(config, world_size)
    return config


def load_config(path, overrides: Iterable[str] = (), world_size: Optional[int] = None) -> Config:
    """Read, override (`key.path=value` strings) and validate a YAML file.

    `world_size`: the number of ranks the job was launched with, checked against the layout.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    overrides = list(overrides)
    if overrides:
        tree = apply_overrides(tree if isinstance(tree, dict) else {}, overrides)
    source = str(path) + (" (with overrides " + ", ".join(overrides) + ")" if overrides else "")
    return validate(tree, source, _line_map(text), world_size)


def validate_world_size(config: Config, world_size: int) -> None:
    p = config["parallel_config"]
    if config.world_size != world_size:
        raise ConfigError(
            f"{config.source}: parallel_config.data_parallel x parallel_config.model_parallel = "
            f"{p['data_parallel']} x {p['model_parallel']} = {config.world_size} ranks, but the job was "
            f"launched with a world size of {world_size}; launch {config.world_size} ranks (mf-loss train does "
            "this itself) or change the layout")


def _check_layout(config: Config, checker: _Checker) -> None:
    """Rules between keys (each key alone was checked by the schema)."""
    p, mc, rc = config["parallel_config"], config["model"]["model_config"], config["runner_config"]
    dp, mp, micro = p["data_parallel"], p["model_parallel"], p["micro_batch_num"]
    vocab = mc["vocab_size"]
    if vocab % mp:
        checker.fail("model.model_config.vocab_size",
                     f"{vocab} is not divisible by parallel_config.model_parallel = {mp} (each model-parallel rank "
                     f"holds vocab_size / model_parallel rows of the output layer); pad it to "
                     f"{-(-vocab // mp) * mp}")
    weight = config["loss"].get("weight")
    if weight is not None and len(weight) != vocab:
        checker.fail("loss.weight", f"has {len(weight)} entries but model.model_config.vocab_size is {vocab}")
    if mc["hidden_size"] % mc["num_heads"] or (mc["hidden_size"] // mc["num_heads"]) % 2:
        checker.fail("model.model_config.num_heads",
                     f"hidden_size {mc['hidden_size']} / num_heads {mc['num_heads']} must be an even integer "
                     "(the head width, split in halves by the rotary embedding)")
    if rc["global_batch_size"] is None and rc["batch_size"] is None:
        checker.fail("runner_config.global_batch_size", "set global_batch_size (rows per step over all ranks)")
    if rc["batch_size"] is not None:
        implied = rc["batch_size"] * dp * micro
        if rc["global_batch_size"] not in (None, implied):
            checker.fail("runner_config.batch_size",
                         f"batch_size x data_parallel x micro_batch_num = {rc['batch_size']} x {dp} x {micro} = "
                         f"{implied} disagrees with global_batch_size {rc['global_batch_size']}; set one of them")
        rc["global_batch_size"] = implied
    if rc["global_batch_size"] % (dp * micro):
        checker.fail("runner_config.global_batch_size",
                     f"{rc['global_batch_size']} rows do not split into data_parallel x micro_batch_num = "
                     f"{dp} x {micro} equal micro-batches")


def loss_kwargs(config) -> dict:
    """The loss block of a Config (or a bare loss block) as constructor arguments, without `type`."""
    block = config["loss"] if isinstance(config.get("loss"), dict) else config
    return {k: v for k, v in block.items() if k != "type"}


def build_loss(config=None, default_args: Optional[dict] = None, class_name: Optional[str] = None, **kwargs):
    """Build a loss cell, like MindFormers' `build_loss(config, default_args, class_name, **kwargs)`.

    `config` is a loaded Config (its `loss` block, with the top-level `parallel_config`), or a bare loss
    block `{"type": "CrossEntropyLoss", ...}` (validated the same way), or None with `class_name`.
    `default_args` and `kwargs` add constructor arguments (e.g. `parallel_config`).
    """
    parallel_config = None
    if isinstance(config, Config):
        block, parallel_config, source = config["loss"], config["parallel_config"], config.source
    elif config is None:
        if class_name is None:
            raise ConfigError("build_loss needs a config block or a class_name")
        block, source = {"type": class_name}, "<build_loss>"
    elif isinstance(config, dict):
        if isinstance(config.get("loss"), dict):
            return build_loss(validate(dict(config)), default_args, class_name, **kwargs)
        block, source = dict(config), "<build_loss>"
        if class_name is not None:
            block.setdefault("type", class_name)
        block = _Checker(source, {}).loss(block, "loss")
    else:
        raise ConfigError(f"build_loss takes a Config, a dict loss block or None, got {type(config).__name__}")
    arguments = {**loss_kwargs(block), **(default_args or {}), **kwargs}
    if parallel_config is not None:
        arguments.setdefault("parallel_config", parallel_config)
    cls = resolve_loss_class(block.get("type", "CrossEntropyLoss"))
    try:
        return cls(**arguments)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{source}: loss: {error}") from error
