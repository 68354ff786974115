"""Trains MindFormers' Llama (VocabParallelLlamaForCausalLM) from a MindFormers YAML on dp x mp msrun ranks.

    python -m mf_loss.integrations.mindformers_train --config configs/mindformers_llama.yaml [--steps N]
        [--set key.path=value ...] [--resume] [--output-dir DIR] [--port P] [--timeout S]

(`bash scripts/train.sh --config configs/mindformers_llama.yaml` runs this with the MindFormers environment; a YAML
for MindFormers' own Trainer, with a `train_dataset_task` block, goes to mindformers_run instead.)
The model, the optimizer and the learning-rate schedule are built by MindFormers from the YAML (`build_network`,
`build_optim`, `build_lr`); the loss by name from the `loss` block. Each rank runs stand-alone (no MindSpore
auto-parallel): model-parallel ranks hold their rows of the output layer, data-parallel ranks their rows of the
batch. One step on each rank (`mf_loss.train.step.TrainStep`, the main job's step):
  for each micro-batch: (sum of token losses, counted tokens) = model(input_ids, labels); the gradients of the
      sum accumulate;
  one SUM all-reduce over the data-parallel group of [all gradients, loss sum, token count];
  the gradients are divided once by the global token count (the exact global token mean, whatever each rank
  counted), clipped to runner_wrapper.max_grad_norm when set, and the optimizer steps.
So a dp x mp run follows the single-process run on the same global batches (to float32 rounding, which a
long run at a high learning rate can amplify: README, "Long runs").

Data: the project's corpus (`mf_loss.train.tokenizer.read_corpus`) as UTF-8 bytes, one token per byte (ids
1..255, 0 is padding: vocab_size 256); deterministic global batches per (seed, step), some rows padded and some
label spans set to ignore_index, so the data-parallel ranks count different numbers of tokens.
Outputs in <output_dir>/<trainer.model_name>/: loss.csv, loss.png, summary.json/.txt, progress.jsonl, checkpoints/ (per
rank, latest.json), logs/ (msrun, one per rank, MindFormers' own under logs/mindformers).
"""
import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from ..config_loader import ConfigError, apply_overrides
from ..train.checkpoints import (checkpoint_dir, load_rank_checkpoint, read_latest, resume_source, save_step,
                                 training_state)
from ..train.curve import CurveWriter, resumed_curve
from ..train.run import TrainError, fresh_run_dir
from . import MINDFORMERS_MODEL_TYPES, mindformers_run
from .mindformers_run import uses_mindformers_trainer

WORKER = Path(__file__).resolve().parent / "mindformers_worker.py"
PAD_ID = 0
BYTE_VOCAB = 256
LOG_ENV = "LOCAL_DEFAULT_PATH"


# -------------------------------------------------------------------------------------------- the YAML

@dataclass
class RunConfig:
    """A MindFormers YAML, checked, with the settings this trainer reads pulled out."""
    tree: dict
    source: str
    run_name: str
    output_dir: str
    seed: int
    graph_mode: bool
    data_parallel: int
    model_parallel: int
    micro_batch_num: int
    batch_size: int          # rows per micro-batch on each data-parallel rank
    seq_length: int
    vocab_size: int
    train_steps: int
    log_interval: int
    save_checkpoint_steps: int
    keep_checkpoint_max: int
    max_grad_norm: Optional[float]
    corpus: str
    pad_probability: float
    ignore_probability: float
    ignore_index: int
    resume_training: bool
    load_checkpoint: str

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.data_parallel * self.micro_batch_num


_MISSING = object()


def _get(tree: dict, path: str, types, default=_MISSING, *, source: str, minimum=None, choices=None):
    """The value at dotted `path`, checked: of `types`, in `choices`, >= `minimum`; `default` when absent."""
    types = types if isinstance(types, tuple) else (types,)
    node = tree
    for part in path.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            break
    if node is _MISSING:
        if default is _MISSING:
            raise ConfigError(f"{source}: {path}: missing; this trainer needs it")
        return default
    if node is None and default is None:
        return None
    ok = isinstance(node, types) and not (isinstance(node, bool) and bool not in types)
    if not ok and float in types and isinstance(node, (int, str)) and not isinstance(node, bool):
        try:  # YAML 1.1 reads 1e-3 as a string; an int is a float too
            node, ok = float(node), True
        except ValueError:
            pass
    names = " or ".join(t.__name__ for t in types)
    if not ok:
        raise ConfigError(f"{source}: {path}: expected {names}, got {node!r} ({type(node).__name__})")
    if choices is not None and node not in choices:
        raise ConfigError(f"{source}: {path}: must be one of {', '.join(map(repr, choices))}, got {node!r}")
    if minimum is not None and node < minimum:
        raise ConfigError(f"{source}: {path}: must be >= {minimum}, got {node!r}")
    return node


def load_run_config(path, overrides=()) -> RunConfig:
    """Read a MindFormers YAML (with `key.path=value` overrides) and check what this trainer uses; errors name
    the file and the key."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the file must hold a mapping of keys at the top")
    overrides = list(overrides)
    tree = apply_overrides(tree, overrides)
    source = str(path) + (" (with overrides " + ", ".join(overrides) + ")" if overrides else "")

    def get(key, types, default=_MISSING, **kw):
        return _get(tree, key, types, default, source=source, **kw)

    arch = get("model.arch.type", str)
    if arch not in MINDFORMERS_MODEL_TYPES:
        raise ConfigError(f"{source}: model.arch.type: this trainer trains {', '.join(MINDFORMERS_MODEL_TYPES)}, "
                          f"got {arch!r}")
    dp = get("parallel_config.data_parallel", int, 1, minimum=1)
    mp = get("parallel_config.model_parallel", int, 1, minimum=1)
    for key in ("pipeline_stage", "context_parallel"):
        if get(f"parallel_config.{key}", int, 1) != 1:
            raise ConfigError(f"{source}: parallel_config.{key}: only 1 is supported (data x model parallel)")
    if get("parallel_config.vocab_emb_dp", bool, False):
        raise ConfigError(f"{source}: parallel_config.vocab_emb_dp: the output layer is split over the "
                          "model-parallel ranks; set it to false")
    vocab = get("model.model_config.vocab_size", int, minimum=2)
    if vocab < BYTE_VOCAB:
        raise ConfigError(f"{source}: model.model_config.vocab_size: the byte-level data needs {BYTE_VOCAB} ids "
                          f"(0 = padding, 1..255 bytes), got {vocab}")
    if vocab % mp:
        raise ConfigError(f"{source}: model.model_config.vocab_size: {vocab} is not divisible by "
                          f"parallel_config.model_parallel = {mp}")
    if get("model.model_config.pad_token_id", int, PAD_ID) != PAD_ID:
        raise ConfigError(f"{source}: model.model_config.pad_token_id: the byte-level data pads with {PAD_ID}")
    ignore_index = get("model.model_config.ignore_token_id", int, -100)
    loss_type = get("loss.type", str)
    if not loss_type.startswith("mf_loss."):
        raise ConfigError(f"{source}: loss.type: this trainer needs an mf_loss loss (mf_loss.CrossEntropyLoss or "
                          f"mf_loss.LinearCrossEntropyLoss), got {loss_type!r}")
    if not get("loss.calculate_per_token_loss", bool, False):
        raise ConfigError(f"{source}: loss.calculate_per_token_loss: needs true (sums of token losses and token "
                          "counts, divided once by the global count: the exact global token mean)")
    if get("loss.ignore_index", int, -100) != ignore_index:
        raise ConfigError(f"{source}: loss.ignore_index: must equal model.model_config.ignore_token_id "
                          f"({ignore_index}), the label the model and the data use for ignored tokens")
    if get("loss.return_z_loss", bool, False):
        raise ConfigError(f"{source}: loss.return_z_loss: not supported by this trainer; set it to false")
    clip = get("runner_wrapper.use_clip_grad", bool, False)
    callbacks = tree.get("callbacks") or []
    if not isinstance(callbacks, list) or not all(isinstance(c, dict) for c in callbacks):
        raise ConfigError(f"{source}: callbacks: expected a list of blocks with a type, got {callbacks!r}")
    by_type = {c.get("type"): c for c in callbacks}

    def callback(type_name, key, default):
        return _get(by_type.get(type_name, {}), key, int, default, source=f"{source}: callbacks[{type_name}]",
                    minimum=0)

    config = RunConfig(
        tree=tree, source=source,
        run_name=get("trainer.model_name", str, None) or path.stem,
        output_dir=get("output_dir", str, "runs"),
        seed=get("seed", int, 1234),
        graph_mode=get("context.mode", (int, str), 0, choices=(0, 1, "GRAPH_MODE", "PYNATIVE_MODE"))
        in (0, "GRAPH_MODE"),
        data_parallel=dp, model_parallel=mp,
        micro_batch_num=get("parallel_config.micro_batch_num", int, 1, minimum=1),
        batch_size=get("runner_config.batch_size", int, minimum=1),
        seq_length=get("model.model_config.seq_length", int, minimum=2),
        vocab_size=vocab,
        train_steps=get("runner_config.stop_step", int, minimum=1),
        log_interval=max(1, callback("MFLossMonitor", "per_print_times", 10)),
        save_checkpoint_steps=callback("CheckpointMonitor", "save_checkpoint_steps", 0),
        keep_checkpoint_max=max(1, callback("CheckpointMonitor", "keep_checkpoint_max", 2)),
        max_grad_norm=get("runner_wrapper.max_grad_norm", float, 1.0, minimum=0.0) if clip else None,
        corpus=get("train_dataset.corpus", str, "builtin"),
        pad_probability=get("train_dataset.pad_probability", float, 0.25, minimum=0.0),
        ignore_probability=get("train_dataset.ignore_probability", float, 0.15, minimum=0.0),
        ignore_index=ignore_index,
        resume_training=get("resume_training", bool, False),
        load_checkpoint=get("load_checkpoint", str, "") or "")
    for key in ("pad_probability", "ignore_probability"):
        if getattr(config, key) > 1:
            raise ConfigError(f"{source}: train_dataset.{key}: must be in [0, 1], got {getattr(config, key)}")
    get("optimizer.type", str)
    get("lr_schedule.type", str)
    return config


# -------------------------------------------------------------------------------------------- data

def corpus_ids(name: str) -> np.ndarray:
    """The corpus as byte ids (int32): whatever file the project ships, read by its own reader."""
    from ..train.tokenizer import read_corpus
    ids = np.frombuffer(read_corpus(name).encode("utf-8"), np.uint8).astype(np.int32)
    if (ids == PAD_ID).any():
        raise ValueError(f"the corpus {name!r} holds NUL bytes, which the byte-level data uses as padding")
    return ids


@dataclass
class LlamaBatch:
    input_ids: np.ndarray   # (..., S+1) int32; the model trains on [:-1] and predicts [1:]
    labels: np.ndarray      # (..., S+1) int32: input_ids, with ignore_index on padding and ignored spans


def global_batch(ids: np.ndarray, config: RunConfig, step: int) -> LlamaBatch:
    """The global batch of 0-based `step`, the same for every layout (depends on seed and step only)."""
    rows, length = config.global_batch_size, config.seq_length + 1
    if len(ids) < length + 1:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than seq_length + 2 = {length + 1}")
    rng = np.random.default_rng([config.seed, step])
    # Every draw has a fixed size, so the stream never depends on earlier outcomes.
    starts = rng.integers(0, len(ids) - length, size=rows)
    padded = rng.random(rows) < config.pad_probability
    cut_at = rng.integers(max(2, length // 4), length, size=rows)
    ignored = rng.random(rows) < config.ignore_probability
    span_start = rng.integers(1, length, size=rows)
    span_length = rng.integers(1, max(2, length // 4), size=rows)
    padded[0], cut_at[0] = True, max(2, length // 4)  # data-parallel rank 0 always counts fewer tokens
    input_ids = ids[starts[:, None] + np.arange(length)[None, :]].astype(np.int32)
    position = np.arange(length)[None, :]
    pad = padded[:, None] & (position >= cut_at[:, None])
    input_ids[pad] = PAD_ID
    labels = input_ids.copy()
    span = ignored[:, None] & (position >= span_start[:, None]) & (position < (span_start + span_length)[:, None])
    labels[pad | span] = config.ignore_index
    return LlamaBatch(input_ids, labels)


def rank_micro_batches(batch: LlamaBatch, config: RunConfig, dp_rank: int) -> LlamaBatch:
    """This data-parallel rank's rows, shaped (micro_batch_num, batch_size, S+1)."""
    rows = config.batch_size * config.micro_batch_num
    part = slice(dp_rank * rows, (dp_rank + 1) * rows)

    def shape(array):
        return np.ascontiguousarray(array[part].reshape(config.micro_batch_num, config.batch_size, -1))

    return LlamaBatch(shape(batch.input_ids), shape(batch.labels))


def counted_tokens(batch: LlamaBatch, ignore_index: int) -> int:
    """Tokens the loss counts: labels [1:] not ignored, on non-padding input positions [:-1]."""
    return int(((batch.input_ids[..., :-1] != PAD_ID) & (batch.labels[..., 1:] != ignore_index)).sum())


# -------------------------------------------------------------------------------------------- one rank

def build_model(config: RunConfig, loss: Optional[dict] = None):
    """MindFormers' build_network on the YAML's model block, with its parallel_config and loss block (or
    `loss`), from the config's seed: every rank and every layout draws the same initial weights."""
    import mindspore as ms

    from .mindformers import REGISTERED_LOSSES  # noqa: F401  (first: it keeps MindFormers' logs out of the cwd)
    from mindformers.models.build_model import build_network
    from mindformers.tools.register import MindFormerConfig

    ms.set_seed(config.seed)
    network = build_network(MindFormerConfig(**{"model": config.tree["model"]}).model, default_args={
        "parallel_config": dict(config.tree.get("parallel_config") or {}),
        "loss": dict(loss if loss is not None else config.tree["loss"]), "batch_size": config.batch_size})
    network.set_train(True)
    return network


def build_training(config: RunConfig):
    """(network, optimizer, learning-rate schedule) built by MindFormers from the YAML."""
    from mindformers.core.lr import build_lr
    from mindformers.core.optim import build_optim
    from mindformers.tools.register import MindFormerConfig

    network = build_model(config)
    schedule = dict(config.tree["lr_schedule"])
    if schedule.get("total_steps") in (None, -1):
        schedule["total_steps"] = config.train_steps
    lr_schedule = build_lr(MindFormerConfig(**schedule))
    optimizer = build_optim(MindFormerConfig(**config.tree["optimizer"]),
                            default_args={"params": network.trainable_params(), "learning_rate": lr_schedule})
    return network, optimizer, lr_schedule


def make_step_cell(network, optimizer, config: RunConfig, parallel, layout, head_names):
    """The training step of one rank (see the module's doc): `mf_loss.train.step.TrainStep` over the network's
    (sum of token losses, counted tokens), the optimizer's parameters, the output layer (`head_names`) split
    over the model-parallel ranks."""
    from ..parallel.comm import data_parallel_group
    from ..train.step import TrainStep
    return TrainStep(network, optimizer.parameters, optimizer, config.micro_batch_num,
                     data_parallel_group(parallel, layout.mp_rank), layout.group if config.model_parallel > 1 else None,
                     split=head_names, max_grad_norm=config.max_grad_norm)


def train_rank(config: RunConfig, run_dir, *, resume: bool = False) -> list:
    """Train on this rank (msrun has started it and initialised communication when there are more ranks);
    returns the loss curve (rows of loss.csv)."""
    import mindspore as ms
    from mindspore import Tensor

    from ..parallel.comm import rank_layout
    from ..parallel.config import ParallelConfig
    from ..train.plot import loss_chart
    from ..train.progress import EventLog
    from ..train.step import StepRunner, barrier, set_rank_context

    started = time.perf_counter()
    run_dir = Path(run_dir)
    set_rank_context(config.graph_mode, config.world_size)
    parallel = ParallelConfig(config.data_parallel, config.model_parallel)
    layout = rank_layout(parallel)
    is_main = layout.rank == 0
    ids = corpus_ids(config.corpus)
    network, optimizer, lr_schedule = build_training(config)
    head_names = network.head_parameter_names()
    step_cell = make_step_cell(network, optimizer, config, parallel, layout, head_names)
    state = training_state(network.trainable_params(), optimizer)

    ckpt_dir = checkpoint_dir(run_dir)
    curve_path = run_dir / "loss.csv"
    start_step, resumed_from = 0, None
    if resume:
        step_dir, latest = resume_source(config.load_checkpoint, run_dir, config.data_parallel,
                                         config.model_parallel, config.source)
        load_rank_checkpoint(state, step_dir / f"rank_{layout.rank}.ckpt")
        start_step, resumed_from = latest["step"], str(step_dir)
    curve = resumed_curve(curve_path, start_step, resumed_from) if resume else []

    events = curve_writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        curve_writer = CurveWriter(curve_path, curve)
        events = EventLog(run_dir / "progress.jsonl")
        events.message(
            f"training {config.run_name}: MindFormers {type(network).__name__} on {config.data_parallel} x "
            f"{config.model_parallel} ranks (data x model parallel, stand-alone mode per rank), {config.train_steps} "
            f"steps of {config.global_batch_size} x {config.seq_length} tokens, {config.micro_batch_num} "
            f"micro-batch(es) per rank, loss {network.loss_type}, vocabulary {config.vocab_size} "
            f"({config.vocab_size // config.model_parallel} per rank)"
            + (f"; resumed at step {start_step} from {resumed_from}" if resume else ""))

    loop_start = time.perf_counter()
    runner = StepRunner(step_cell, network.loss, layout.describe())
    for step in range(start_step, config.train_steps):
        batch = rank_micro_batches(global_batch(ids, config, step), config, layout.dp_rank)
        row = runner(step, batch.input_ids, batch.labels)
        row["learning_rate"] = float(lr_schedule(Tensor(step, ms.int32)).asnumpy())
        done = row["step"]
        curve.append(row)
        if is_main:
            curve_writer.append(row)
            events.step(done, config.train_steps, row["loss"], row["tokens_per_s"])
        interval = config.save_checkpoint_steps
        if done == config.train_steps or (interval and done % interval == 0):
            save_step(state, ckpt_dir, done, layout.rank, config.world_size, dict(
                data_parallel=config.data_parallel, model_parallel=config.model_parallel,
                model_parameters=[p.name for p in network.trainable_params()], split_parameters=list(head_names)),
                keep=config.keep_checkpoint_max, writes_index=is_main)

    if is_main:
        curve_writer.close()
        summary = _summarize(config, run_dir, curve, dict(
            model=type(network).__name__, loss=network.loss_type, resumed_from=resumed_from, start_step=start_step,
            compile_step_s=runner.compile_time, steady_tokens_per_s=runner.steady_tokens_per_s,
            train_time_s=time.perf_counter() - loop_start, total_time_s=time.perf_counter() - started))
        if curve:
            loss_chart(run_dir / "loss.png", [r["step"] for r in curve], [r["loss"] for r in curve],
                       title=f"{config.run_name}: MindFormers Llama, {summary['layout']} (dp x mp)",
                       label=network.loss_type)
        events.message("\n" + (run_dir / "summary.txt").read_text().rstrip())
        events.close()
    barrier(config.world_size)  # the main rank's outputs are written before any rank starts to exit
    return curve


def _summarize(config: RunConfig, run_dir: Path, curve: list, extra: dict) -> dict:
    losses = [row["loss"] for row in curve]
    summary = {"run_name": config.run_name, "config": config.source,
               "layout": f"{config.data_parallel} x {config.model_parallel}", "world_size": config.world_size,
               "steps": len(curve), "first_loss": losses[0] if losses else None,
               "final_loss": losses[-1] if losses else None, "min_loss": min(losses) if losses else None,
               "counted_tokens": int(sum(row["counted_tokens"] for row in curve)),
               "checkpoint": str(checkpoint_dir(run_dir) / "latest.json"),
               "loss_csv": str(run_dir / "loss.csv"), "loss_png": str(run_dir / "loss.png"), **extra}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    tps = summary["steady_tokens_per_s"]
    lines = [
        f"run {config.run_name} ({config.source})",
        f"model: MindFormers {extra['model']}, loss {extra['loss']}",
        f"layout: data_parallel x model_parallel = {summary['layout']} ({config.world_size} rank(s), "
        "stand-alone mode per rank)",
        f"steps: {len(curve)}" + (f" (resumed at step {extra['start_step']})" if extra["resumed_from"] else ""),
        f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} (min {min(losses):.4f})" if losses else "loss: no steps",
        f"counted tokens: {summary['counted_tokens']:,}",
        f"throughput: {tps:,.0f} counted tokens/s after the first step (first step with compilation "
        f"{extra['compile_step_s']:.1f} s)" if tps else "throughput: n/a",
        f"time: {extra['train_time_s']:.1f} s training, {extra['total_time_s']:.1f} s in this process",
        f"outputs: {run_dir}/loss.csv, loss.png, summary.json, checkpoints/",
    ]
    (run_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    return summary


# -------------------------------------------------------------------------------------------- the parent

def run_dir_for(config: RunConfig, output_dir: Optional[str] = None) -> Path:
    return (Path(output_dir or config.output_dir) / config.run_name).resolve()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def train_command(config_path: str, overrides=(), *, resume: bool = False, output_dir: Optional[str] = None,
                  port: Optional[int] = None, timeout: float = 900.0, out=sys.stdout) -> Path:
    """Check the YAML, then train on its dp x mp ranks (msrun when more than one); returns the run directory."""
    from ..train.progress import ProgressView
    from ..train.run import _Follower, check_port, worker_env

    config = load_run_config(config_path, overrides)
    if port is not None:
        check_port(port)
    run_dir = run_dir_for(config, output_dir)
    resume = resume or config.resume_training
    if resume:
        # fails here, before any rank starts, when there is nothing to resume
        resume_source(config.load_checkpoint, run_dir, config.data_parallel, config.model_parallel, config.source)
    else:
        fresh_run_dir(run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    os.environ[LOG_ENV] = str(run_dir / "logs" / "mindformers")  # MindFormers' own logs, here and in the ranks
    from . import mindformers  # noqa: F401  (without MindFormers: an ImportError saying what to run, before msrun)
    view = ProgressView(out, config.log_interval)
    follower = _Follower(run_dir / "progress.jsonl", view)
    follower.start()
    try:
        if config.world_size == 1:
            try:
                train_rank(config, run_dir, resume=resume)
            except (ConfigError, FileNotFoundError):
                raise
            except Exception as error:
                raise TrainError(f"training failed on rank 0: {type(error).__name__}: {error}") from error
            return run_dir
        from ..launch import launch
        args = ["--config", str(Path(config_path).resolve()), "--run-dir", str(run_dir)]
        for override in overrides:
            args += ["--set", override]
        if resume:
            args.append("--resume")
        print(f"starting {config.world_size} ranks with msrun (start-up takes ~30-60 s); logs in "
              f"{run_dir / 'logs'}", file=out, flush=True)
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            result = launch(str(WORKER), args, workers=config.world_size, log_dir=str(run_dir / "logs"),
                            timeout=timeout, env=worker_env(), port=port, quiet=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if not result.ok:
            latest = read_latest(checkpoint_dir(run_dir))
            note = (f"The last complete checkpoint is step {latest['step']}; continue with --resume."
                    if latest else "No checkpoint was written before the failure.")
            raise TrainError(f"{result.message}\n{note}")
        if result.message:  # a rank that crashed in MindSpore's teardown after the work was done
            print(result.message, file=out, flush=True)
        return run_dir
    finally:
        follower.stop()
        view.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mf_loss.integrations.mindformers_train",
                                     description="Train MindFormers' Llama with mf_loss on dp x mp msrun ranks.")
    parser.add_argument("--config", required=True, help="a MindFormers YAML, e.g. configs/mindformers_llama.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, help="shortcut for --set runner_config.stop_step=N")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--output-dir", help="parent of the run directory (default: the config's output_dir)")
    parser.add_argument("--port", type=int, help="msrun scheduler port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the whole job is stopped")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"runner_config.stop_step={args.steps}"] if args.steps else [])
    try:
        if uses_mindformers_trainer(args.config):  # MindFormers' own Trainer: mindformers_run
            if args.resume:
                raise ConfigError(f"{args.config}: --resume: not supported with MindFormers' own Trainer; set its "
                                  "resume_training and load_checkpoint keys")
            mindformers_run.train_command(args.config, args.overrides, steps=args.steps, output_dir=args.output_dir,
                                          port=args.port, timeout=args.timeout)
            return 0
        train_command(args.config, overrides, resume=args.resume, output_dir=args.output_dir, port=args.port,
                      timeout=args.timeout)
    except ConfigError as error:
        print(f"mindformers_train: configuration error: {error}", file=sys.stderr)
        return 2
    except (TrainError, FileNotFoundError, ImportError) as error:
        print(f"mindformers_train: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
