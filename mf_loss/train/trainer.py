"""The training loop of one rank of `mf-loss train`: model, loss, MindSpore's optimizer and schedule, the step
(`step.TrainStep`: micro-batches, one data-parallel all-reduce, the exact global token mean, clipping),
checkpoints, outputs.

Each micro-batch's final hidden state goes to the loss, either as this rank's logits slice (unfused head:
hidden @ head_slice.T, then CrossEntropyLoss) or as it is, with this rank's head rows (fused head:
LinearCrossEntropyLoss, which never makes the logits); the loss returns the per-token (numerator, denominator).
The loss curve is numerator / denominator of the whole global batch. The trunk's gradient was already summed
over the model-parallel group by CopyToModelParallel's backward, so replicated parameters stay identical on
every rank.
"""
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import psutil

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config_loader import Config, build_loss
from ..parallel.comm import data_parallel_group, rank_layout
from ..parallel.config import ParallelConfig
from . import plot
from .checkpoints import (checkpoint_dir, load_rank_checkpoint, resume_source, save_step, training_state,
                          write_atomic)
from .checks import check_trainable, fused_head
from .curve import CurveWriter, resumed_curve
from .data import BatchSpec, global_batch, rank_micro_batches
from .model import HEAD, LlamaLM
from .progress import EventLog, ProgressView
from .step import StepRunner, TrainStep, barrier, set_rank_context
from .tokenizer import TokenizerSettings, prepare_corpus

# For tests: "rank:step" makes that rank raise at the start of that step; "rank:step:nan" puts a NaN in
# that rank's input mask at that step instead (caught by check_for_nan_in_loss_and_grad).
FAIL_ENV = "MF_LOSS_FAIL_AT"


class InjectedFailure(RuntimeError):
    pass


# -------------------------------------------------------------------------------------------- optimizer

def learning_rates(config: Config) -> list:
    """The rate of every step (0-based), from MindSpore's schedules: linear warm-up, then constant or cosine
    decay to lr_end."""
    sched = config["lr_schedule"]
    total = config["runner_config"]["train_steps"]
    if sched["total_steps"] not in (None, -1):
        total = max(total, sched["total_steps"])
    warmup = int(sched["warmup_ratio"] * total) if sched["warmup_ratio"] is not None else sched["warmup_steps"]
    warmup = min(warmup, total)
    base = float(sched["learning_rate"])
    # nn.warmup_lr's step 0 has rate 0 (a wasted step); drop it: the warm-up is base * (i + 1) / warmup.
    rates = nn.warmup_lr(base, warmup + 1, 1, warmup)[1:] if warmup else []
    rest = total - warmup
    if rest:
        if sched["type"] == "ConstantWarmUpLR" or sched["lr_end"] >= base:
            rates += [base] * rest
        else:
            rates += nn.cosine_decay_lr(float(sched["lr_end"]), base, rest, 1, rest)
    return rates


def build_optimizer(config: Config, params, rates: list) -> nn.Optimizer:
    """MindSpore's optimizer for the configured type; weight decay on matrices only (not on norm gains)."""
    opt = config["optimizer"]
    decay = [p for p in params if len(p.shape) > 1]
    groups = [{"params": decay, "weight_decay": float(opt["weight_decay"])},
              {"params": [p for p in params if len(p.shape) <= 1], "weight_decay": 0.0}]
    # order_params: the optimizer takes the gradients in the model's parameter order, not the groups'.
    groups = [g for g in groups if g["params"]] + [{"order_params": list(params)}]
    if opt["type"] == "AdamW":
        beta1, beta2 = opt["betas"]
        return nn.AdamWeightDecay(groups, learning_rate=rates, beta1=beta1, beta2=beta2, eps=opt["eps"])
    if opt["type"] == "Adam":
        beta1, beta2 = opt["betas"]
        return nn.Adam(groups, learning_rate=rates, beta1=beta1, beta2=beta2, eps=opt["eps"])
    return nn.SGD(groups, learning_rate=rates, momentum=opt["momentum"])


# -------------------------------------------------------------------------------------------- train step

class LossForward(nn.Cell):
    """construct(tokens, labels, mask) of one micro-batch -> the loss's per-token (numerator, denominator), with
    the fused head (final hidden state and this rank's head rows to LinearCrossEntropyLoss) or the unfused one
    (this rank's logits slice to CrossEntropyLoss)."""

    def __init__(self, model: LlamaLM, loss, fused_head: bool):
        super().__init__(auto_prefix=False)
        self.model, self.loss, self.fused_head = model, loss, fused_head

    def construct(self, tokens, labels, mask):
        if self.fused_head:
            return self.loss(self.model.hidden(tokens), self.model.head_weight(), labels.reshape(-1),
                             mask.reshape(-1))
        return self.loss(self.model(tokens), labels.reshape(-1), mask.reshape(-1))


def train_step(model: LlamaLM, loss, optimizer, micro_batch_num: int, dp_group: Optional[str],
               mp_group: Optional[str] = None, max_grad_norm: Optional[float] = None,
               fused_head: bool = False) -> TrainStep:
    """The step cell of this model: construct(tokens, labels, mask (M, b, S)) -> (global numerator, global
    denominator, gradient norm); the output layer is the parameter split over the model-parallel ranks."""
    return TrainStep(LossForward(model, loss, fused_head), model.params, optimizer, micro_batch_num, dp_group,
                     mp_group, split=(HEAD,), max_grad_norm=max_grad_norm)


class HeadAndLoss(nn.Cell):
    """The output layer and the loss alone, forward and backward (to hidden and head weight): what the loss's
    share of a step is measured on."""

    def __init__(self, loss, fused_head: bool):
        super().__init__(auto_prefix=False)
        self.loss, self.fused_head = loss, fused_head
        self.head_matmul = ops.MatMul(transpose_b=True)
        self.grad_fn = ms.value_and_grad(self.forward, (0, 1), None, has_aux=True)

    def forward(self, hidden, head, labels, mask):
        if self.fused_head:
            return self.loss(hidden, head, labels, mask)
        return self.loss(self.head_matmul(hidden, head), labels, mask)

    def construct(self, hidden, head, labels, mask):
        (numerator, _), (d_hidden, d_head) = self.grad_fn(hidden, head, labels, mask)
        return numerator, d_hidden.sum() + d_head.sum()


def time_head_and_loss(loss, fused_head: bool, model: LlamaLM, batch, repeats: int = 5) -> float:
    """Median seconds of one micro-batch's output layer + loss, forward and backward, on this batch's shapes
    (every rank runs it: the loss exchanges statistics)."""
    rows = batch.tokens[0].size
    hidden = Tensor(np.random.default_rng(0).standard_normal((rows, model.hidden_size)).astype(np.float32))
    labels, mask = Tensor(batch.labels[0].reshape(-1)), Tensor(batch.mask[0].reshape(-1))
    cell = HeadAndLoss(loss, fused_head)
    head = Tensor(model.head_weight().asnumpy())
    seconds = []
    for _ in range(repeats + 1):  # the first call compiles
        tick = time.perf_counter()
        numerator, _ = cell(hidden, head, labels, mask)
        numerator.asnumpy()
        seconds.append(time.perf_counter() - tick)
    return float(np.median(seconds[1:]))


# -------------------------------------------------------------------------------------------- outputs

class MemoryProbe:
    """Resident memory of every rank: this rank's now (psutil) and its peak, gathered on all ranks by one SUM
    all-reduce in which each rank fills its own slot. The peak is the kernel's high-water mark
    (getrusage's ru_maxrss): a step's logits and their gradient live only inside the step, where no
    sample taken between steps would see them."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.process = psutil.Process()
        self.gather = ops.AllReduce() if world_size > 1 else None

    def _all_ranks(self, value_mib: float) -> list:
        slots = np.zeros(self.world_size, np.float32)
        slots[self.rank] = value_mib
        if self.gather is not None:
            slots = self.gather(Tensor(slots)).asnumpy()
        return [round(float(v), 1) for v in slots]

    def resident_mib(self) -> list:
        return self._all_ranks(self.process.memory_info().rss / 2**20)

    def peak_mib(self) -> list:
        return self._all_ranks(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# -------------------------------------------------------------------------------------------- the run

@dataclass
class RunResult:
    run_dir: Path
    curve: list
    summary: dict = field(default_factory=dict)


def _injected_failure():
    """(rank, step, kind) from FAIL_ENV, or None."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return None
    rank, step, *kind = spec.split(":")
    return int(rank), int(step), (kind[0] if kind else "raise")


def tokenizer_settings(config: Config) -> TokenizerSettings:
    return TokenizerSettings(vocab_size=config["model"]["model_config"]["vocab_size"])


def build_training_loss(config: Config):
    if not fused_head(config):
        return build_loss(config)
    # The model's CopyToModelParallel already all-reduces d(loss)/d(hidden) over the model-parallel group
    # in its backward; the loss completing that sum too would count every rank's share mp times.
    return build_loss(config, complete_hidden_grad=False)


def train(config: Config, run_dir, *, resume: bool = False, echo: bool = True, nnodes: int = 1) -> RunResult:
    """Train on this rank; more than one rank needs mindspore.communication initialised (msrun).

    The main rank (rank 0, on node 0) writes the curve, charts and summary; the first rank of every node
    writes that node's latest.json beside its ranks' checkpoints, so that each node can resume."""
    check_trainable(config)
    set_rank_context(config["context"]["mode"] in (0, "GRAPH_MODE"), config.world_size)
    started = time.perf_counter()
    run_dir = Path(run_dir)
    parallel = ParallelConfig(config.parallel["data_parallel"], config.parallel["model_parallel"])
    layout = rank_layout(parallel)
    rank, is_main = layout.rank, layout.rank == 0
    node_main = rank % (parallel.world_size // nnodes) == 0
    mc, rc, ds = config["model"]["model_config"], config["runner_config"], config["train_dataset"]
    dp, mp, micro = parallel.data_parallel, parallel.model_parallel, config.parallel["micro_batch_num"]
    total_steps = rc["train_steps"]
    fused = fused_head(config)

    corpus = prepare_corpus(ds["corpus"], tokenizer_settings(config))
    spec = BatchSpec(rc["global_batch_size"], mc["seq_length"], ds["pad_probability"], ds["ignore_probability"],
                     config["loss"].get("ignore_index", -100), corpus.pad_id)

    model = LlamaLM(mc, layout, config["seed"])
    loss = build_training_loss(config)
    rates = learning_rates(config)
    optimizer = build_optimizer(config, list(model.params), rates)
    step_cell = train_step(model, loss, optimizer, micro, data_parallel_group(parallel, layout.mp_rank),
                           layout.group if mp > 1 else None, config["optimizer"]["max_grad_norm"], fused)
    state = training_state(model.params, optimizer)
    memory = MemoryProbe(rank, parallel.world_size)

    ckpt_dir = checkpoint_dir(run_dir)
    curve_path, memory_path = run_dir / "loss.csv", run_dir / "memory.json"
    start_step, resumed_from = 0, None
    if resume:
        step_dir, latest = resume_source(config["load_checkpoint"], run_dir, dp, mp, config.source)
        load_rank_checkpoint(state, step_dir / f"rank_{rank}.ckpt")
        start_step, resumed_from = latest["step"], str(step_dir)
    curve = resumed_curve(curve_path, start_step, step_dir) if resume else []
    memory_log = json.loads(memory_path.read_text()) if resume and memory_path.exists() else {"step": [], "mib": []}
    keep = sum(1 for s in memory_log["step"] if s <= start_step)
    memory_log = {"step": memory_log["step"][:keep], "mib": memory_log["mib"][:keep]}

    events = view = curve_writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        curve_writer = CurveWriter(curve_path, curve)
        events = EventLog(run_dir / "progress.jsonl")
        view = ProgressView(log_interval=rc["log_interval"]) if echo else None

    def publish(event):
        if view is not None:
            view.show(event)

    if is_main:
        publish(events.message(
            f"training {config['run_name']}: {dp} x {mp} ranks (data x model parallel), {total_steps} steps of "
            f"{rc['global_batch_size']} x {mc['seq_length']} tokens, {micro} micro-batch(es) per rank, Llama-style "
            f"{mc['num_layers']} x {mc['hidden_size']}, BPE vocabulary {mc['vocab_size']} ({mc['vocab_size'] // mp} "
            f"per rank), {'fused' if fused else 'unfused'} head ({config['loss']['type']})"
            + (f"; resumed at step {start_step} from {resumed_from}" if resume else "")))

    failure = _injected_failure()
    runner = StepRunner(step_cell, loss, layout.describe())
    loop_start = time.perf_counter()
    batch = None
    for step in range(start_step, total_steps):
        batch = rank_micro_batches(global_batch(corpus.ids, spec, config["seed"], step), dp, layout.dp_rank, micro)
        if failure is not None and failure[:2] == (rank, step + 1):
            if failure[2] != "nan":
                raise InjectedFailure(f"injected failure on rank {rank} at step {step + 1} "
                                      f"({FAIL_ENV}={os.environ[FAIL_ENV]})")
            batch.mask[0, 0, 0] = np.nan
        row = runner(step, batch.tokens, batch.labels, batch.mask)
        row["learning_rate"] = rates[step]
        curve.append(row)
        done = row["step"]
        if done == start_step + 1 or done % rc["log_interval"] == 0 or done == total_steps:
            memory_log["step"].append(done)
            memory_log["mib"].append(memory.resident_mib())
        if is_main:
            curve_writer.append(curve[-1])
            publish(events.step(done, total_steps, row["loss"], row["tokens_per_s"]))
        interval = rc["save_checkpoint_steps"]
        if done == total_steps or (interval and done % interval == 0):
            save_step(state, ckpt_dir, done, rank, parallel.world_size, dict(
                data_parallel=dp, model_parallel=mp, written_with_head="fused" if fused else "unfused",
                model_parameters=list(model.names), split_parameters=[HEAD] if mp > 1 else []),
                keep=rc["keep_checkpoint_max"], writes_index=node_main)
            if is_main:
                write_atomic(memory_path, json.dumps(memory_log))

    train_time = time.perf_counter() - loop_start
    peak = memory.peak_mib()
    measure = rc["measure_loss_time"] and batch is not None
    head_loss_s = time_head_and_loss(loss, fused, model, batch) if measure else None
    result = RunResult(run_dir, curve)
    if is_main:
        curve_writer.close()
        step_times = [row["step_time_s"] for row in curve[start_step + 1:]]
        step_s = float(np.median(step_times)) if step_times else None
        result.summary = _summarize(config, run_dir, curve, memory_log, dict(
            layout=f"{dp} x {mp}", world_size=dp * mp, nnodes=nnodes, head="fused" if fused else "unfused",
            loss_type=config["loss"]["type"], resumed_from=resumed_from, start_step=start_step,
            compile_step_s=runner.compile_time, steady_tokens_per_s=runner.steady_tokens_per_s,
            median_step_s=step_s, head_and_loss_s_per_micro_batch=head_loss_s,
            loss_share_of_step=(head_loss_s * micro / step_s) if head_loss_s and step_s else None,
            peak_rss_mib_per_rank=peak, train_time_s=train_time, total_time_s=time.perf_counter() - started,
            vocabulary=corpus.vocab_size, corpus_tokens=int(corpus.ids.size), tokenizer_cache=str(corpus.directory),
            ignored_config_keys=config.ignored))
        publish(events.message((run_dir / "summary.txt").read_text().rstrip()))
        events.close()
        if view is not None:
            view.close()
    barrier(parallel.world_size)  # the main rank's outputs are written before any rank starts to exit
    return result


def _summarize(config, run_dir, curve, memory_log, extra) -> dict:
    losses = [row["loss"] for row in curve]
    summary = {
        "run_name": config["run_name"], "config": config.source, "steps": len(curve),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "counted_tokens": int(sum(row["counted_tokens"] for row in curve)),
        "checkpoint": str(checkpoint_dir(run_dir) / "latest.json"),
        "outputs": [str(run_dir / name) for name in ("loss.csv", "step_times.csv", "loss.png", "throughput.png",
                                                     "memory.json")],
        **extra}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    tps, share = summary["steady_tokens_per_s"], summary["loss_share_of_step"]
    lines = [
        f"run {summary['run_name']} ({summary['config']})",
        f"layout: data_parallel x model_parallel = {summary['layout']} ({summary['world_size']} rank(s) on "
        f"{summary['nnodes']} node(s)); head: {summary['head']} ({summary['loss_type']})",
        f"steps: {summary['steps']}" + (f" (resumed at step {extra['start_step']})" if extra["resumed_from"] else ""),
        f"loss: {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} (min {summary['min_loss']:.4f})"
        if losses else "loss: no steps",
        f"counted tokens: {summary['counted_tokens']:,}; BPE vocabulary {summary['vocabulary']} of the output "
        f"layer's {config['model']['model_config']['vocab_size']} ({summary['corpus_tokens']:,} corpus tokens)",
        f"throughput: {tps:,.0f} counted tokens/s after the first step, median step {summary['median_step_s']:.3f} s "
        f"(first step with compilation {extra['compile_step_s']:.1f} s)" if tps else "throughput: n/a",
        f"output layer + loss: {summary['head_and_loss_s_per_micro_batch'] * 1e3:.1f} ms per micro-batch (forward + "
        f"backward, measured alone), {share:.0%} of the median step" if share else "output layer + loss: n/a",
        "peak resident memory per rank (MiB): " + ", ".join(f"rank {r}: {m:,.0f}"
                                                            for r, m in enumerate(summary["peak_rss_mib_per_rank"])),
        f"time: {extra['train_time_s']:.1f} s training, {extra['total_time_s']:.1f} s in this process",
        f"outputs: {run_dir}/loss.csv, step_times.csv, loss.png, throughput.png, memory.json, summary.json, "
        "checkpoints/",
    ]
    if config.ignored:
        lines.append("MindFormers keys accepted and not used: " + ", ".join(config.ignored))
    (run_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    if losses:
        steps = [row["step"] for row in curve]
        label = f"dp={summary['layout'].replace(' x ', ' x mp=')}, {summary['head']} head"
        plot.loss_chart(run_dir / "loss.png", steps, losses, label=label,
                        title=f"{config['run_name']}: training loss per step")
        per_rank = {r: [m[r] for m in memory_log["mib"]] for r in range(summary["world_size"])}
        plot.throughput_chart(run_dir / "throughput.png", steps, [row["tokens_per_s"] for row in curve],
                              memory_log["step"], per_rank, title=f"{config['run_name']}: throughput and memory")
    return summary
