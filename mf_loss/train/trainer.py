"""The training loop of one rank: step, optimizer, exact global token mean, checkpoints, outputs.

One step on data-parallel rank d, model-parallel rank r:
  for each micro-batch: logits slice = model(tokens); (numerator, denominator) = loss(logits slice, ...);
      gradients of the numerator (the sum of token losses) are accumulated, as are both loss outputs;
  one SUM all-reduce over the data-parallel group of [all gradients, numerator, denominator];
  every gradient is divided once by the global denominator (counted tokens of all micro-batches and all
  data-parallel ranks): the exact global token mean, whatever each rank counted (Megatron's per-token loss);
  the optimizer steps. The loss curve is numerator / denominator of the whole global batch.
The trunk's gradient was already summed over the model-parallel group by CopyToModelParallel's backward,
so replicated parameters stay identical on every rank.
"""
import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..config_loader import Config, ConfigError, build_loss, check_trainable
from ..parallel.comm import RankLayout, rank_layout
from ..parallel.config import ParallelConfig
from . import plot
from .data import BatchSpec, global_batch, rank_micro_batches
from .model import HEAD, TinyCausalLM
from .tokenizer import CharTokenizer, corpus_path, read_corpus

# For tests: "rank:step" makes that rank raise at the start of that step; "rank:step:nan" puts a NaN in
# that rank's input mask at that step instead (caught by check_for_nan_in_loss_and_grad).
FAIL_ENV = "MF_LOSS_FAIL_AT"
CSV_FIELDS = ("step", "loss", "counted_tokens", "learning_rate", "grad_norm", "step_time_s", "tokens_per_s")


class InjectedFailure(RuntimeError):
    pass


# -------------------------------------------------------------------------------------------- optimizers

class AdamW(nn.Cell):
    """Adam with decoupled weight decay (matrices only), bias-corrected; state saved in checkpoints."""

    def __init__(self, params: ms.ParameterTuple, betas, eps, weight_decay):
        super().__init__(auto_prefix=False)
        self.params = params
        self.m = params.clone(prefix="adam_m", init="zeros")
        self.v = params.clone(prefix="adam_v", init="zeros")
        self.step = Parameter(Tensor(0.0, ms.float32), name="adam_step", requires_grad=False)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.decay = tuple(float(weight_decay) if len(p.shape) > 1 else 0.0 for p in params)

    def state(self):
        return list(self.m) + list(self.v) + [self.step]

    def construct(self, grads, lr):
        step = self.step + 1.0
        ops.assign(self.step, step)
        correction1 = 1.0 - ops.pow(self.beta1, step)
        correction2 = 1.0 - ops.pow(self.beta2, step)
        for i in range(len(self.params)):
            param, m, v, grad = self.params[i], self.m[i], self.v[i], grads[i]
            m_new = self.beta1 * m + (1.0 - self.beta1) * grad
            v_new = self.beta2 * v + (1.0 - self.beta2) * grad * grad
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            update = (m_new / correction1) / (ops.sqrt(v_new / correction2) + self.eps) + self.decay[i] * param
            ops.assign(param, param - lr * update)
        return step


class SGD(nn.Cell):
    """SGD with optional momentum and weight decay."""

    def __init__(self, params: ms.ParameterTuple, momentum, weight_decay):
        super().__init__(auto_prefix=False)
        self.params = params
        self.buffers = params.clone(prefix="sgd_momentum", init="zeros")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)

    def state(self):
        return list(self.buffers)

    def construct(self, grads, lr):
        for i in range(len(self.params)):
            param, buf = self.params[i], self.buffers[i]
            grad = grads[i] + self.weight_decay * param
            buf_new = self.momentum * buf + grad
            ops.assign(buf, buf_new)
            ops.assign(param, param - lr * buf_new)
        return lr


def build_optimizer(config: Config, params):
    opt = config["optimizer"]
    if opt["type"] == "AdamW":
        return AdamW(params, opt["betas"], opt["eps"], opt["weight_decay"])
    return SGD(params, opt["momentum"], opt["weight_decay"])


def learning_rate(config: Config, step: int) -> float:
    """The rate for 0-based `step`: linear warm-up, then constant or cosine down to lr_end."""
    sched = config["lr_schedule"]
    total = sched["total_steps"] if sched["total_steps"] not in (None, -1) else config["runner_config"]["train_steps"]
    warmup = sched["warmup_steps"]
    if sched["warmup_ratio"] is not None:
        warmup = int(sched["warmup_ratio"] * total)
    base = sched["learning_rate"]
    if step < warmup:
        return base * (step + 1) / warmup
    if sched["type"] == "ConstantWarmUpLR":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return sched["lr_end"] + 0.5 * (base - sched["lr_end"]) * (1.0 + math.cos(math.pi * progress))


# -------------------------------------------------------------------------------------------- train step

class TrainStep(nn.Cell):
    """construct(tokens, labels, mask (M, b, S), lr) -> (global numerator, global denominator, gradient norm).

    With `max_grad_norm`, the gradients (already divided by the global token count) are scaled down to
    that global norm when above it; the norm sums the replicated parameters once and the output layer's
    slices over the model-parallel group.
    """

    def __init__(self, model: TinyCausalLM, loss, optimizer, micro_batch_num: int, dp_group: Optional[str],
                 mp_group: Optional[str] = None, max_grad_norm: Optional[float] = None):
        super().__init__(auto_prefix=False)
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.weights = model.params
        self.micro_batch_num = micro_batch_num
        self.grad_fn = ms.value_and_grad(self.forward, None, self.weights, has_aux=True)
        self.shapes = tuple(tuple(p.shape) for p in self.weights)
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = tuple(int(o) for o in np.cumsum([0] + sizes))
        self.dp_reduce = ops.AllReduce(ops.ReduceOp.SUM, dp_group) if dp_group else None
        self.mp_reduce = ops.AllReduce(ops.ReduceOp.SUM, mp_group) if mp_group else None
        self.max_grad_norm = max_grad_norm
        self.head_start, self.head_end = self.offsets[model.i_head], self.offsets[model.i_head + 1]

    def forward(self, tokens, labels, mask):
        logits = self.model(tokens)
        numerator, denominator = self.loss(logits, labels.reshape(-1), mask.reshape(-1))
        return numerator, denominator

    def construct(self, tokens, labels, mask, lr):
        # The loss accumulates its non-finite token counts over the micro-batches until check_finite().
        (numerator, denominator), grads = self.grad_fn(tokens[0], labels[0], mask[0])
        for i in range(1, self.micro_batch_num):
            (num_i, den_i), grads_i = self.grad_fn(tokens[i], labels[i], mask[i])
            numerator = numerator + num_i
            denominator = denominator + den_i
            grads = tuple(a + b for a, b in zip(grads, grads_i))
        # One collective per step: every gradient and both loss sums in one buffer.
        flat = ops.concat([g.reshape(-1) for g in grads] + [ops.stack([numerator, denominator])])
        if self.dp_reduce is not None:
            flat = self.dp_reduce(flat)
        end = self.offsets[-1]
        numerator, denominator = flat[end], flat[end + 1]
        scale = 1.0 / ops.maximum(denominator, 1.0)
        norm = self._norm(flat) * scale
        if self.max_grad_norm is not None:
            scale = scale * ops.minimum(1.0, self.max_grad_norm / (norm + 1e-6))
        grads = tuple(flat[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i]) * scale
                      for i in range(len(self.shapes)))
        self.optimizer(grads, lr)
        return numerator, denominator, norm

    def _norm(self, flat):
        """Global L2 norm of the summed gradients in `flat` (the output layer's share over mp ranks)."""
        head = flat[self.head_start:self.head_end]
        squares = (head * head).sum().reshape(1)
        if self.mp_reduce is not None:
            squares = self.mp_reduce(squares)
        if self.head_start > 0:
            trunk = flat[:self.head_start]
            squares = squares + (trunk * trunk).sum()
        if self.head_end < self.offsets[-1]:
            rest = flat[self.head_end:self.offsets[-1]]
            squares = squares + (rest * rest).sum()
        return ops.sqrt(squares[0])


# -------------------------------------------------------------------------------------------- checkpoints

def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def read_latest(ckpt_dir: Path) -> Optional[dict]:
    path = Path(ckpt_dir) / "latest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def resume_source(config: Config, run_dir: Path):
    """(checkpoints directory, its latest.json) to resume from: `load_checkpoint` (a run directory or its
    checkpoints/) when set, else the run's own. Raises when there is none or its layout differs."""
    source = Path(config["load_checkpoint"]) if config["load_checkpoint"] else checkpoint_dir(run_dir)
    if (source / "checkpoints").is_dir():
        source = source / "checkpoints"
    latest = read_latest(source)
    if latest is None:
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {source} (no latest.json); train "
                                "without --resume first, or set load_checkpoint to a run directory")
    p = config.parallel
    if (latest["data_parallel"], latest["model_parallel"]) != (p["data_parallel"], p["model_parallel"]):
        raise ConfigError(f"{config.source}: --resume: the checkpoint in {source} was written by data_parallel="
                          f"{latest['data_parallel']} x model_parallel={latest['model_parallel']}, but the config "
                          f"asks for {p['data_parallel']} x {p['model_parallel']}; resume with the layout that "
                          "wrote it")
    return source, latest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_rank_checkpoint(params, directory: Path, rank: int) -> Path:
    """This rank's state -> directory/rank_<r>.ckpt, written to a temporary name and renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"rank_{rank}.ckpt"
    tmp = directory / f".rank_{rank}.partial.ckpt"
    ms.save_checkpoint([{"name": p.name, "data": p} for p in params], str(tmp))
    os.replace(tmp, final)
    return final


def load_rank_checkpoint(params, path: Path) -> None:
    loaded = ms.load_checkpoint(str(path))
    for p in params:
        if p.name not in loaded:
            raise ValueError(f"checkpoint {path} has no parameter {p.name!r}")
        value = loaded[p.name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"checkpoint {path}: {p.name} has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
        p.set_data(Tensor(value.asnumpy()))


def load_full_weights(ckpt_dir: Path, step_dir: Optional[str] = None) -> dict:
    """The model's weights at full shapes from a run's checkpoint (latest unless `step_dir`): trunk from
    rank 0, output layer concatenated over the model-parallel ranks of data-parallel rank 0."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    if latest is None and step_dir is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (latest.json missing)")
    directory = ckpt_dir / (step_dir or latest["dir"])
    mp = (latest or {}).get("model_parallel", 1)
    shards = [ms.load_checkpoint(str(directory / f"rank_{r}.ckpt")) for r in range(mp)]
    weights = {name: value.asnumpy() for name, value in shards[0].items()
               if not name.startswith(("adam_", "sgd_")) and name != HEAD}
    weights[HEAD] = np.concatenate([s[HEAD].asnumpy() for s in shards], axis=0)
    return weights


# -------------------------------------------------------------------------------------------- outputs

class Progress:
    """A plain-text progress bar; rank 0 writes it to progress.log (and stdout when `echo`)."""

    def __init__(self, path: Optional[Path], total: int, echo: bool):
        self.path, self.total, self.echo = path, total, echo
        self.file = open(path, "a") if path is not None else None

    def line(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()
        if self.echo:
            print(text, flush=True)

    def step(self, step: int, loss: float, tokens_per_s: float, elapsed: float, seconds_per_step: float) -> None:
        width = 24
        done = int(width * step / self.total)
        eta = "--" if seconds_per_step is None else f"{seconds_per_step * (self.total - step):.0f}s"
        self.line(f"step {step:>{len(str(self.total))}}/{self.total} [{'#' * done}{'.' * (width - done)}] "
                  f"loss {loss:.4f}  tok/s {tokens_per_s:,.0f}  elapsed {elapsed:.0f}s  eta {eta}")

    def close(self):
        if self.file is not None:
            self.file.close()


def read_curve(path: Path) -> list:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("step", "counted_tokens") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def _csv_row(row: dict) -> dict:
    return {k: (f"{row[k]:.9g}" if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS}


def write_curve(path: Path, rows: list) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(_csv_row(row) for row in rows)
    os.replace(tmp, path)


class CurveWriter:
    """Appends one row per step to loss.csv (flushed: a crash keeps every completed step)."""

    def __init__(self, path: Path, rows: list):
        write_curve(path, rows)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)

    def append(self, row: dict) -> None:
        self.writer.writerow(_csv_row(row))
        self.file.flush()

    def close(self):
        self.file.close()


# -------------------------------------------------------------------------------------------- the run

@dataclass
class RunResult:
    run_dir: Path
    curve: list
    summary: dict = field(default_factory=dict)


def _set_context(config: Config) -> None:
    mode = config["context"]["mode"]
    graph = mode in (0, "GRAPH_MODE")
    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE, device_target="CPU")
    if config.world_size > 1:
        # Ranks share the machine's cores: one kernel thread each unless there are cores to spare
        # (measured on 2 cores, 4 ranks: fewer context switches, steadier steps).
        threads = max(1, len(os.sched_getaffinity(0)) // config.world_size)
        ms.set_context(runtime_num_threads=threads, inter_op_parallel_num=threads)


def _dp_group(layout: RankLayout, parallel: ParallelConfig) -> Optional[str]:
    """The group of ranks holding the same vocabulary slice (same mp rank), created once, or None."""
    dp, mp = parallel.data_parallel, parallel.model_parallel
    if dp == 1:
        return None
    if mp == 1:
        from mindspore.communication import GlobalComm
        return GlobalComm.WORLD_COMM_GROUP
    from mindspore.communication import create_group
    name = f"mf_train_dp{dp}_mp{layout.mp_rank}"
    create_group(name, [d * mp + layout.mp_rank for d in range(dp)])
    return name


def _barrier(world_size: int) -> None:
    if world_size > 1:
        ops.AllReduce()(Tensor(np.ones(1, np.float32))).asnumpy()


def _injected_failure():
    """(rank, step, kind) from FAIL_ENV, or None."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return None
    rank, step, *kind = spec.split(":")
    return int(rank), int(step), (kind[0] if kind else "raise")


def train(config: Config, run_dir, *, resume: bool = False, echo: bool = True) -> RunResult:
    """Train on this rank; more than one rank needs mindspore.communication initialised (msrun)."""
    check_trainable(config)
    _set_context(config)
    started = time.perf_counter()
    run_dir = Path(run_dir)
    parallel = ParallelConfig(config.parallel["data_parallel"], config.parallel["model_parallel"])
    layout = rank_layout(parallel)
    rank, is_main = layout.rank, layout.rank == 0
    mc, rc, ds = config["model"]["model_config"], config["runner_config"], config["train_dataset"]
    dp, mp, micro = parallel.data_parallel, parallel.model_parallel, config.parallel["micro_batch_num"]
    total_steps = rc["train_steps"]

    text = read_corpus(ds["corpus"])
    tokenizer = CharTokenizer.from_text(text)
    if len(tokenizer) > mc["vocab_size"]:
        raise ConfigError(f"{config.source}: model.model_config.vocab_size: the corpus {corpus_path(ds['corpus'])} "
                          f"needs {len(tokenizer)} token ids (characters + <pad>, <unk>), more than vocab_size "
                          f"{mc['vocab_size']}")
    corpus_ids = tokenizer.encode(text)
    ignore_index = config["loss"].get("ignore_index", -100)
    spec = BatchSpec(rc["global_batch_size"], mc["seq_length"], ds["pad_probability"], ds["ignore_probability"],
                     ignore_index, tokenizer.pad_id)

    model = TinyCausalLM(mc, layout, config["seed"])
    loss = build_loss(config)
    optimizer = build_optimizer(config, model.params)
    step_cell = TrainStep(model, loss, optimizer, micro, _dp_group(layout, parallel),
                          layout.group if mp > 1 else None, config["optimizer"]["max_grad_norm"])
    state = list(model.params) + optimizer.state()

    ckpt_dir = checkpoint_dir(run_dir)
    curve_path = run_dir / "loss.csv"
    start_step, resumed_from = 0, None
    if resume:
        source_dir, latest = resume_source(config, run_dir)
        load_rank_checkpoint(state, source_dir / latest["dir"] / f"rank_{rank}.ckpt")
        start_step, resumed_from = latest["step"], str(source_dir / latest["dir"])
    curve = [row for row in read_curve(curve_path) if row["step"] <= start_step] if resume else []

    progress = Progress(run_dir / "progress.log" if is_main else None, total_steps, echo and is_main)
    curve_writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        curve_writer = CurveWriter(curve_path, curve)
        progress.line(f"training {config['run_name']}: {dp} x {mp} ranks (data x model parallel), "
                      f"{total_steps} steps of {rc['global_batch_size']} x {mc['seq_length']} tokens, "
                      f"{micro} micro-batch(es) per rank, vocabulary {mc['vocab_size']} "
                      f"({mc['vocab_size'] // mp} per rank)"
                      + (f"; resumed at step {start_step} from {resumed_from}" if resume else ""))

    failure = _injected_failure()
    window_tokens, window_time, compile_time = 0, 0.0, None
    steady_tokens, steady_time = 0, 0.0
    loop_start = time.perf_counter()
    for step in range(start_step, total_steps):
        batch = rank_micro_batches(global_batch(corpus_ids, spec, config["seed"], step), dp, layout.dp_rank, micro)
        if failure is not None and failure[:2] == (rank, step + 1):
            if failure[2] != "nan":
                raise InjectedFailure(f"injected failure on rank {rank} at step {step + 1} "
                                      f"({FAIL_ENV}={os.environ[FAIL_ENV]})")
            batch.mask[0, 0, 0] = np.nan
        lr = learning_rate(config, step)
        tick = time.perf_counter()
        numerator, denominator, grad_norm = step_cell(Tensor(batch.tokens), Tensor(batch.labels),
                                                      Tensor(batch.mask), Tensor(lr, ms.float32))
        numerator, denominator = float(numerator.asnumpy()), float(denominator.asnumpy())
        seconds = time.perf_counter() - tick
        if loss.check_for_nan:
            loss.check_finite()
        value = numerator / max(denominator, 1.0)
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} on {layout.describe()} at step {step + 1}")
        if compile_time is None:
            compile_time = seconds
        else:
            steady_tokens += denominator
            steady_time += seconds
        window_tokens += denominator
        window_time += seconds
        done = step + 1
        curve.append({"step": done, "loss": value, "counted_tokens": int(denominator), "learning_rate": lr,
                      "grad_norm": float(grad_norm.asnumpy()), "step_time_s": seconds,
                      "tokens_per_s": denominator / seconds})
        if curve_writer is not None:
            curve_writer.append(curve[-1])
        if is_main and (done % rc["log_interval"] == 0 or done == total_steps or done == start_step + 1):
            per_step = steady_time / (done - start_step - 1) if done > start_step + 1 else None  # 1st: compiling
            progress.step(done, value, window_tokens / max(window_time, 1e-9), time.perf_counter() - loop_start,
                          per_step)
            window_tokens, window_time = 0, 0.0
        interval = rc["save_checkpoint_steps"]
        if done == total_steps or (interval and done % interval == 0):
            _save(state, ckpt_dir, done, rank, parallel, rc["keep_checkpoint_max"], is_main)

    result = RunResult(run_dir, curve)
    if is_main:
        curve_writer.close()
        result.summary = _summarize(config, run_dir, curve, dict(
            layout=f"{dp} x {mp}", world_size=dp * mp, resumed_from=resumed_from, start_step=start_step,
            compile_step_s=compile_time, steady_tokens_per_s=steady_tokens / steady_time if steady_time else None,
            train_time_s=time.perf_counter() - loop_start, total_time_s=time.perf_counter() - started,
            vocabulary=len(tokenizer), ignored_config_keys=config.ignored))
        progress.line("")
        progress.line((run_dir / "summary.txt").read_text().rstrip())
    progress.close()
    _barrier(parallel.world_size)  # the main rank's outputs are written before any rank starts to exit
    return result


def _save(state, ckpt_dir, step, rank, parallel, keep, is_main):
    name = f"step_{step:06d}"
    save_rank_checkpoint(state, ckpt_dir / name, rank)
    _barrier(parallel.world_size)  # every rank's file is complete before latest.json points at them
    if is_main:
        _write_atomic(ckpt_dir / "latest.json", json.dumps({
            "step": step, "dir": name, "data_parallel": parallel.data_parallel,
            "model_parallel": parallel.model_parallel, "world_size": parallel.world_size}, indent=1))
        steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in steps[:-keep] if keep else []:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def _summarize(config, run_dir, curve, extra) -> dict:
    losses = [row["loss"] for row in curve]
    summary = {
        "run_name": config["run_name"], "config": config.source, "steps": len(curve),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "counted_tokens": int(sum(row["counted_tokens"] for row in curve)),
        "checkpoint": str(checkpoint_dir(run_dir) / "latest.json"),
        "loss_csv": str(run_dir / "loss.csv"), "loss_png": str(run_dir / "loss.png"), **extra}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    tps = summary["steady_tokens_per_s"]
    lines = [
        f"run {summary['run_name']} ({summary['config']})",
        f"layout: data_parallel x model_parallel = {summary['layout']} ({summary['world_size']} rank(s))",
        f"steps: {summary['steps']}" + (f" (resumed at step {extra['start_step']})" if extra["resumed_from"] else ""),
        f"loss: {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} (min {summary['min_loss']:.4f})"
        if losses else "loss: no steps",
        f"counted tokens: {summary['counted_tokens']:,}",
        f"throughput: {tps:,.0f} counted tokens/s after the first step "
        f"(first step with compilation {extra['compile_step_s']:.1f} s)" if tps else "throughput: n/a",
        f"time: {extra['train_time_s']:.1f} s training, {extra['total_time_s']:.1f} s in this process",
        f"outputs: {run_dir}/loss.csv, loss.png, summary.json, checkpoints/",
    ]
    if config.ignored:
        lines.append("MindFormers keys accepted and not used: " + ", ".join(config.ignored))
    (run_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    if losses:
        plot.line_chart_png(run_dir / "loss.png", [row["step"] for row in curve], losses,
                            title=f"{config['run_name']}: loss per step ({summary['layout']})")
    return summary
