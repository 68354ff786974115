"""YAML configuration: load, validate, and build the loss from it.

A configuration is laid out like a MindFormers model config (`parallel_config`, `model.model_config`,
`runner_config`, `optimizer`, `lr_schedule`, ...) plus a `loss` block. Every key is checked: an unknown
key is reported with the closest valid name, a wrong type or value with the key's path, always with the
file (and line) it came from. MindFormers blocks that this project does not use (`parallel`, `trainer`,
`callbacks`, ...) are accepted as they are and listed in `Config.ignored`.

    config = load_config("configs/dp2_mp2.yaml", overrides=["runner_config.train_steps=20"])
    loss = build_loss(config)            # the configured loss, for the configured parallel layout
"""
import difflib
import inspect
import re
from dataclasses import fields
from pathlib import Path
from typing import Iterable, Optional

import yaml

from .options import LossOptions
from .registry import get_loss_class, registered_losses

_MISSING = object()
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


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

class Key:
    """One leaf: allowed types, default, and optional choices / lower bound."""

    def __init__(self, types, default=_MISSING, *, choices=None, minimum=None, nullable=False, doc=""):
        self.types = types if isinstance(types, tuple) else (types,)
        self.default = default
        self.choices = choices
        self.minimum = minimum
        self.nullable = nullable or default is None
        self.doc = doc


class Section:
    def __init__(self, keys: dict, doc=""):
        self.keys = keys
        self.doc = doc


class Opaque:
    """A MindFormers block this project accepts and does not read."""


def _ints(default, minimum=1, **kw):
    return Key(int, default, minimum=minimum, **kw)


PARALLEL_CONFIG = Section({
    "data_parallel": _ints(1),
    "model_parallel": _ints(1),
    "pipeline_stage": _ints(1),
    "context_parallel": _ints(1),
    "expert_parallel": _ints(1),
    "micro_batch_num": _ints(1, doc="micro-batches per step on each data-parallel rank"),
    "seq_split_num": _ints(1),
    "vocab_emb_dp": Key(bool, False),
    "use_seq_parallel": Key(bool, False),
    "gradient_aggregation_group": _ints(4),
    "optimizer_shard": Key(bool, None),
})

MODEL = Section({
    "arch": Section({"type": Key(str, "TinyCausalLM", choices=("TinyCausalLM",))}),
    "model_config": Section({
        "type": Key(str, "TinyCausalLMConfig", choices=("TinyCausalLMConfig",)),
        "vocab_size": _ints(80, minimum=2, doc="padded vocabulary, divisible by model_parallel"),
        "hidden_size": _ints(64),
        "num_layers": _ints(1, minimum=0),
        "num_heads": _ints(4),
        "seq_length": _ints(64, minimum=2),
        "ffn_hidden_size": _ints(None),
        "init_std": Key(float, 0.02, minimum=0.0),
        "layernorm_epsilon": Key(float, 1e-5, minimum=0.0),
        "compute_dtype": Key(str, "float32", choices=("float32",)),
        "param_init_type": Key(str, "float32", choices=("float32",)),
    }),
})

OPTIMIZER = Section({
    "type": Key(str, "AdamW", choices=("AdamW", "SGD")),
    "betas": Key(list, [0.9, 0.95]),
    "eps": Key(float, 1e-8, minimum=0.0),
    "weight_decay": Key(float, 0.0, minimum=0.0),
    "momentum": Key(float, 0.0, minimum=0.0),
    "max_grad_norm": Key(float, None, minimum=0.0, doc="clip the global gradient norm to this; null: no clipping"),
})

LR_SCHEDULE = Section({
    "type": Key(str, "ConstantWarmUpLR", choices=("ConstantWarmUpLR", "CosineWithWarmUpLR")),
    "learning_rate": Key(float, 3e-3, minimum=0.0),
    "lr_end": Key(float, 0.0, minimum=0.0),
    "warmup_steps": _ints(0, minimum=0),
    "warmup_ratio": Key(float, None, minimum=0.0),
    "total_steps": Key(int, None),
})

RUNNER_CONFIG = Section({
    "train_steps": _ints(200),
    "global_batch_size": _ints(None, doc="rows per step over all data-parallel ranks"),
    "batch_size": _ints(None, doc="MindFormers' rows per micro-batch per data-parallel rank"),
    "log_interval": _ints(10),
    "save_checkpoint_steps": _ints(50, minimum=0),
    "keep_checkpoint_max": _ints(2),
    "epochs": _ints(None),
    "sink_mode": Key(bool, None),
    "sink_size": Key(int, None),
    "gradient_accumulation_steps": _ints(1),
})

TRAIN_DATASET = Section({
    "corpus": Key(str, "builtin", doc="'builtin' (mf_loss/data/corpus.txt) or a UTF-8 text file"),
    "pad_probability": Key(float, 0.25, minimum=0.0),
    "ignore_probability": Key(float, 0.15, minimum=0.0),
})

CONTEXT = Section({
    "mode": Key((int, str), 0, choices=(0, 1, "GRAPH_MODE", "PYNATIVE_MODE")),
    "device_target": Key(str, "CPU", choices=("CPU",)),
    "device_id": Key(int, None),
    "max_call_depth": Key(int, None),
    "max_device_memory": Key(str, None),
    "save_graphs": Key((bool, int), None),
    "save_graphs_path": Key(str, None),
    "jit_config": Opaque(),
})

LOSS = "loss"  # dynamic: the keys of the registered loss class named by `type`

_MINDFORMERS_IGNORED = ("parallel", "trainer", "callbacks", "processor", "recompute_config", "moe_config",
                        "profile", "profile_start_step", "profile_stop_step", "metric", "eval_dataset",
                        "eval_dataset_task", "train_dataset_task", "runner_wrapper", "wrapper", "auto_trans_ckpt",
                        "src_strategy_path_or_dir", "only_save_strategy", "do_eval", "eval_step_interval",
                        "eval_epoch_interval", "micro_batch_interleave_num", "swap_config", "monitor_config",
                        "auto_tune", "filepath_prefix", "autotune_per_step", "layer_scale", "layer_decay",
                        "lr_scale", "lr_scale_factor", "remote_save_url", "model_name", "use_legacy")

SCHEMA = Section({
    "run_name": Key(str, None, doc="outputs go to <output_dir>/<run_name>; default: the file name"),
    "seed": Key(int, 1234),
    "output_dir": Key(str, "runs"),
    "run_mode": Key(str, "train", choices=("train",)),
    "use_parallel": Key(bool, None),
    "resume_training": Key(bool, False),
    "load_checkpoint": Key(str, None, doc="a run directory or its checkpoints/ to resume from"),
    "context": CONTEXT,
    "parallel_config": PARALLEL_CONFIG,
    "model": MODEL,
    "loss": LOSS,
    "optimizer": OPTIMIZER,
    "lr_schedule": LR_SCHEDULE,
    "runner_config": RUNNER_CONFIG,
    "train_dataset": TRAIN_DATASET,
    **{name: Opaque() for name in _MINDFORMERS_IGNORED},
})

# Loss arguments whose default (None) says nothing about their type.
_LOSS_ARG_TYPES = {"weight": (list,), "logit_softcap": (float,)}


# ---------------------------------------------------------------------------------------------- checking

class _Checker:
    def __init__(self, source: str, lines: dict):
        self.source = source
        self.lines = lines
        self.ignored = []

    def where(self, path: str) -> str:
        line = self.lines.get(path)
        return f"{self.source}:{line}" if line else self.source

    def fail(self, path: str, message: str):
        raise ConfigError(f"{self.where(path)}: {path}: {message}")

    def unknown(self, path: str, key: str, valid: Iterable[str]):
        valid = sorted(valid)
        full = f"{path}.{key}" if path else key
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(valid)}"
        raise ConfigError(f"{self.where(full)}: unknown key {full!r}; {hint}")

    def section(self, spec: Section, value, path: str) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping of keys, got {_show(value)}")
        for key in value:
            if not isinstance(key, str) or key not in spec.keys:
                self.unknown(path, str(key), spec.keys)
        out = {}
        for key, sub in spec.keys.items():
            full = f"{path}.{key}" if path else key
            given = value.get(key, _MISSING)
            if isinstance(sub, Opaque):
                if given is not _MISSING:
                    out[key] = given
                    self.ignored.append(full)
            elif isinstance(sub, Section):
                out[key] = self.section(sub, None if given is _MISSING else given, full)
            elif sub == LOSS:
                out[key] = self.loss(None if given is _MISSING else given, full)
            else:
                out[key] = self.leaf(sub, given, full)
        return out

    def leaf(self, spec: Key, value, path: str):
        if value is _MISSING:
            return list(spec.default) if isinstance(spec.default, list) else spec.default
        return check_value(value, spec.types, path, self.fail, nullable=spec.nullable, choices=spec.choices,
                           minimum=spec.minimum)

    def loss(self, value, path: str) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping of keys, got {_show(value)}")
        type_name = value.get("type", "CrossEntropyLoss")
        if not isinstance(type_name, str):
            self.fail(f"{path}.type", f"expected a loss class name (str), got {_show(type_name)}")
        try:
            cls = resolve_loss_class(type_name)
        except KeyError:
            close = difflib.get_close_matches(type_name, list(registered_losses()), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"registered: {', '.join(sorted(registered_losses()))}"
            self.fail(f"{path}.type", f"unknown loss type {type_name!r}; {hint}")
        params = loss_parameters(cls)
        out = {"type": cls.__name__}
        for key, given in value.items():
            full = f"{path}.{key}"
            if key == "type":
                continue
            if key == "parallel_config":
                self.fail(full, "the loss takes its layout from the top-level parallel_config block; "
                                "remove it here")
            if key not in params:
                self.unknown(path, key, ["type", *params])
            default = params[key]
            types = _LOSS_ARG_TYPES.get(key) or ((type(default),) if default is not None else (object,))
            out[key] = check_value(given, types, full, self.fail, nullable=default is None)
        given_options = {key: out[key] for key in {f.name for f in fields(LossOptions)} & set(out)}
        for key, given in given_options.items():  # one key at a time first: the error names its line
            try:
                LossOptions(**{key: given})
            except (TypeError, ValueError) as error:
                self.fail(f"{path}.{key}", str(error))
        try:  # then together: some options exclude others (inplace_backward with backend: composed)
            LossOptions(**given_options)
        except (TypeError, ValueError) as error:
            self.fail(path, str(error))
        return out


def check_value(value, types, path, fail, *, nullable=False, choices=None, minimum=None):
    """`value` checked against `types` (int is a float; YAML 1.1's '1e-3' string is a float too)."""
    if value is None:
        if nullable:
            return None
        fail(path, f"must be set, got null (expected {_type_names(types)})")
    if object in types:
        return value
    ok = False
    if float in types and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        value, ok = float(value), True
    elif isinstance(value, bool):
        ok = bool in types
    elif isinstance(value, int):
        ok = int in types or float in types
        if ok and int not in types:
            value = float(value)
    else:
        ok = isinstance(value, types)
    if not ok:
        fail(path, f"expected {_type_names(types)}, got {_show(value)}")
    if isinstance(value, list) and path.endswith("betas"):
        if len(value) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                      for b in value):
            fail(path, f"expected two floats in [0, 1), got {value!r}")
        value = [float(b) for b in value]
    if isinstance(value, list) and path.endswith("weight"):
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in value):
            fail(path, "expected a list of numbers (one weight per class)")
    if choices is not None and value not in choices:
        fail(path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if minimum is not None and not isinstance(value, str) and value < minimum:
        fail(path, f"must be >= {minimum}, got {value!r}")
    return value


def _type_names(types) -> str:
    names = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _line_map(text: str) -> dict:
    """'a.b.c' -> 1-based line of that key in the YAML text (best effort)."""
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


def loss_parameters(cls) -> dict:
    """The keyword arguments a loss class takes (name -> default), without parallel_config."""
    params = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "parallel_config") or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        params[name] = None if param.default is inspect.Parameter.empty else param.default
    return params


def parse_override(text: str):
    """'a.b.c=value' -> (['a', 'b', 'c'], YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. runner_config.train_steps=20")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
    return [part for part in key.strip().split(".") if part], value


def apply_overrides(tree: dict, overrides: Iterable[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        if not path:
            raise ConfigError(f"override {text!r} names no key")
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a block")
            node = child
        node[path[-1]] = value
    return tree


def validate(tree: dict, source: str = "<config>", lines: Optional[dict] = None,
             world_size: Optional[int] = None) -> Config:
    """Check a raw configuration tree; returns the Config with defaults filled in."""
    checker = _Checker(source, lines or {})
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the file must hold a mapping of keys at the top, got {_show(tree)}")
    config = Config(checker.section(SCHEMA, tree, ""), source, checker.ignored)
    if config["run_name"] is None:
        config["run_name"] = Path(source).stem if source not in ("<config>", "") else "run"
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
    p = config["parallel_config"]
    mc = config["model"]["model_config"]
    rc = config["runner_config"]
    dp, mp, micro = p["data_parallel"], p["model_parallel"], p["micro_batch_num"]
    for key in ("pipeline_stage", "context_parallel", "expert_parallel"):
        if p[key] != 1:
            checker.fail(f"parallel_config.{key}", f"only 1 is supported (data x model parallel only), got {p[key]}")
    if p["use_seq_parallel"]:
        checker.fail("parallel_config.use_seq_parallel", "sequence parallelism is not supported; set it to false")
    if p["vocab_emb_dp"]:
        checker.fail("parallel_config.vocab_emb_dp", "the output layer is split over the model-parallel ranks "
                                                     "(vocab_emb_dp: false); true would replicate it")
    vocab = mc["vocab_size"]
    if vocab % mp:
        checker.fail("model.model_config.vocab_size",
                     f"{vocab} is not divisible by parallel_config.model_parallel = {mp} (each model-parallel rank "
                     f"holds vocab_size / model_parallel rows of the output layer); pad it to "
                     f"{-(-vocab // mp) * mp}")
    weight = config["loss"].get("weight")
    if weight is not None and len(weight) != vocab:
        checker.fail("loss.weight", f"has {len(weight)} entries but model.model_config.vocab_size is {vocab}")
    if mc["hidden_size"] % mc["num_heads"]:
        checker.fail("model.model_config.num_heads",
                     f"hidden_size {mc['hidden_size']} is not divisible by num_heads {mc['num_heads']}")
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
    if rc["gradient_accumulation_steps"] != 1:
        checker.fail("runner_config.gradient_accumulation_steps",
                     "use parallel_config.micro_batch_num for micro-batches within a step")
    for key in ("pad_probability", "ignore_probability"):
        if config["train_dataset"][key] > 1:
            checker.fail(f"train_dataset.{key}", f"must be in [0, 1], got {config['train_dataset'][key]}")


def check_trainable(config: Config) -> None:
    """What `mf-loss train` needs beyond a valid config: the exact per-token loss, one loss output."""
    loss = config["loss"]
    source = config.source
    if loss["type"] != "CrossEntropyLoss":
        raise ConfigError(f"{source}: loss.type: mf-loss train trains with CrossEntropyLoss, got {loss['type']!r}")
    if not loss.get("calculate_per_token_loss", False):
        raise ConfigError(f"{source}: loss.calculate_per_token_loss: mf-loss train needs true (sums of token "
                          "losses and token counts, divided once by the global count: the exact global token mean)")
    if loss.get("return_z_loss", False):
        raise ConfigError(f"{source}: loss.return_z_loss: not supported by mf-loss train; set it to false")


def loss_kwargs(config) -> dict:
    """The loss block of a Config (or a bare loss block) as constructor arguments, without `type`."""
    block = config["loss"] if "loss" in config and isinstance(config.get("loss"), dict) else config
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
        if "loss" in config and isinstance(config["loss"], dict):
            return build_loss(validate(dict(config)), default_args, class_name, **kwargs)
        block, source = dict(config), "<build_loss>"
        if class_name is not None:
            block.setdefault("type", class_name)
        block = _Checker(source, {}).loss(block, "loss")
    else:
        raise ConfigError(f"build_loss takes a Config, a dict loss block or None, got {type(config).__name__}")
    arguments = loss_kwargs(block)
    arguments.update(default_args or {})
    arguments.update(kwargs)
    if parallel_config is not None:
        arguments.setdefault("parallel_config", parallel_config)
    cls = resolve_loss_class(block.get("type", "CrossEntropyLoss"))
    try:
        return cls(**arguments)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{source}: loss: {error}") from error
