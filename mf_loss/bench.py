"""Side-by-side benchmark of cross-entropy implementations on CPU: time and peak memory.

    python -m mf_loss.bench [--shapes 4096x32000,2048x128256] [--dtypes float32,bfloat16]
                            [--impls fused,composed,mint,ops,mindformers,torch] [--repeats 5] [--warmup 1]
                            [--out DIR] [--quick] [--mp2]

Every implementation runs in a FRESH subprocess per configuration, so that peak memory can be read from
the kernel: the inputs are built directly in their dtype, `5` is written to /proc/self/clear_refs to
reset the high-water mark, one step runs, and the peak beyond the inputs is VmHWM minus the VmRSS read
just before the step (MindSpore's memory statistics are 0 on CPU, and its memory pool keeps what a step
freed, so only a process's first step shows the step's own memory). GRAPH-mode graphs are compiled
before that first step. Then `--warmup` more steps, then `--repeats` timed steps: the median and the
minimum of the wall time, and the median CPU time of the process (all threads), are reported.

Paired turns (the default when fused and others are asked for): a shared machine's load changes from
second to second, so implementations timed one after the other are not compared fairly. Each other
implementation therefore runs next to a fresh fused process, both set up and warmed up, and the two take
steps in turns (fused, other, other, fused, ...): the ratio fused / other is taken per turn and its
median reported, with the ratio of the minima and the median per-turn ratio of CPU times. `--rounds`
repeats everything with fresh processes; `--sequential` runs one process after the other instead (and
measures the forward's memory in a process of its own).

Passes: "fwd" is the loss value; "fwdbwd" is the value and the gradient w.r.t. the logits. With
`--lm-head H` the input is a (rows, H) hidden state instead and each step first makes the logits with a
fixed (H, vocab) head (gradient w.r.t. the hidden state), as in a model: the peak then counts the logits
too, and this is where the in-place backward saves its buffer in GRAPH mode.
Implementations (all on the same inputs; labels uniform int32 class ids, every token counted):
  fused           mf_loss.CrossEntropyLoss(backend="fused"), GRAPH mode
  fused_pynative  the same in PYNATIVE mode
  fused_inplace   mf_loss.CrossEntropyLoss(backend="fused", inplace_backward=True), PYNATIVE mode (the
                  mode where the saving reaches the caller; the logits hold the gradient after each step,
                  so later steps run on those values: the same work, finite losses)
  fused_inplace_graph  the same in GRAPH mode (the logits are a direct graph input there, and MindSpore
                  copies a gradient output that aliases an input: no saving, shown for completeness)
  composed        mf_loss.CrossEntropyLoss(backend="composed"), GRAPH mode
  mint            mindspore.mint.nn.functional.cross_entropy, GRAPH mode
  ops             mindspore.ops.cross_entropy, GRAPH mode
  mindformers     MindFormers' CrossEntropyLoss recipe, written here: float32 cast, log-softmax with max
                  subtraction, dense one-hot, sum(loss * mask) / (sum(mask) + 1e-8), hand-written backward
                  (softmax - one_hot) * dout; GRAPH mode
  torch           torch.nn.functional.cross_entropy, eager (when torch is installed)
mint, ops and mindformers take bfloat16 logits through a float32 cast (MindSpore's CPU cross entropy
kernels refuse bfloat16), as MindFormers' models do.

Outputs: a table on stdout (progress lines on stderr), `--out DIR` writes DIR/bench.json and
DIR/bench.png (a dependency-free PNG bar chart). `--mp2` adds a model-parallel run: 2 msrun ranks, each
holding half of the vocabulary, reporting per-rank time and the bytes the loss exchanges per step.
"""
import argparse
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

RESULT_MARK = "MF_BENCH_RESULT "
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

IMPLS = {
    "fused": "mf_loss fused (GRAPH)",
    "fused_pynative": "mf_loss fused (PYNATIVE)",
    "fused_inplace": "mf_loss fused, in-place backward (PYNATIVE)",
    "fused_inplace_graph": "mf_loss fused, in-place backward (GRAPH)",
    "composed": "mf_loss composed (GRAPH)",
    "mint": "mint.nn.functional.cross_entropy (GRAPH)",
    "ops": "ops.cross_entropy (GRAPH)",
    "mindformers": "MindFormers-style one-hot (GRAPH)",
    "torch": "torch F.cross_entropy (eager)",
}
DEFAULT_IMPLS = ("fused", "composed", "mint", "ops", "mindformers", "torch")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# ---------------------------------------------------------------------------------------------------------
# measurement helpers (worker side)
# ---------------------------------------------------------------------------------------------------------

def _proc_status() -> dict:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _measure_first_step(step):
    """(seconds, peak bytes beyond what was resident before, whether the peak could be reset)."""
    before = _proc_status()["VmRSS"]
    reset = _reset_peak()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _proc_status()["VmHWM"]
    return seconds, max(0, peak - before), reset


def _time_steps(step, warmup, repeats):
    """Wall-clock and process CPU seconds (all threads) of `repeats` steps after `warmup` steps."""
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu


def _ms_sync():
    """Waits for MindSpore's queued work (PYNATIVE runs kernels asynchronously)."""
    try:
        from mindspore.graph.api import _pynative_executor
        _pynative_executor.sync()
    except (ImportError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------------------
# the implementations (worker side)
# ---------------------------------------------------------------------------------------------------------

def _value_and_grad_cell(loss_cell):
    """A cell computing (loss, gradient w.r.t. the first input) of loss_cell(x, y, m)."""
    import mindspore as ms
    from mindspore import nn

    class ValueAndGrad(nn.Cell):
        def __init__(self):
            super().__init__()
            self.loss = loss_cell
            self.grad = ms.value_and_grad(self.loss, grad_position=0)

        def construct(self, x, y, m):
            return self.grad(x, y, m)

    return ValueAndGrad()


def _mindspore_steps(impl, rows, vocab, dtype, seed, lm_head=0):
    """Returns (steps, logits_bytes): steps[pass] = (prepare, run) for "fwd" and "fwdbwd".

    lm_head=H: the input is a hidden state (rows, H) and the logits are made inside the measured step by
    a matmul with a fixed (H, vocab) head, as in a model; the gradient is taken w.r.t. the hidden state."""
    import numpy as np

    import mindspore as ms
    from mindspore import Tensor, mint, nn, ops

    graph = impl not in ("fused_pynative", "fused_inplace")
    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE, device_target="CPU")
    rng = np.random.default_rng(seed)
    ms_dtype = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[dtype]
    host = rng.standard_normal((rows, lm_head or vocab), dtype=np.float32)
    logits = Tensor(host, dtype=ms_dtype)  # converted on the host; the float32 array is freed below
    del host
    head = Tensor(rng.standard_normal((lm_head, vocab), dtype=np.float32) / math.sqrt(lm_head),
                  dtype=ms_dtype) if lm_head else None
    label = Tensor(rng.integers(0, vocab, rows).astype(np.int32))
    mask = Tensor(np.ones(rows, np.float32))
    upcast = dtype == "bfloat16" and impl in ("mint", "ops", "mindformers")

    if impl in ("fused", "fused_pynative", "fused_inplace", "fused_inplace_graph", "composed"):
        import mf_loss
        backend = "composed" if impl == "composed" else "fused"
        inplace = impl.startswith("fused_inplace")
        loss_fn = mf_loss.CrossEntropyLoss(backend=backend, inplace_backward=inplace)
        core = loss_fn.class_index_core
        if core.backend != backend or core.inplace != inplace:
            raise RuntimeError(f"asked for backend={backend} inplace={inplace}, got {core.backend} {core.inplace}")

        class Loss(nn.Cell):
            def __init__(self):
                super().__init__()
                self.loss = loss_fn

            def construct(self, x, y, m):
                return self.loss(x, y, m)
    elif impl in ("mint", "ops"):
        framework_loss = mint.nn.functional.cross_entropy if impl == "mint" else ops.cross_entropy

        class Loss(nn.Cell):
            def __init__(self):
                super().__init__()
                self.upcast = upcast
                self.framework_loss = framework_loss

            def construct(self, x, y, m):
                if self.upcast:
                    x = x.astype(ms.float32)
                return self.framework_loss(x, y)
    elif impl == "mindformers":
        Loss = _mindformers_style_loss(ms, nn, ops, Tensor, vocab)
    else:
        raise ValueError(f"unknown MindSpore implementation {impl!r}")

    loss_cell = Loss()
    if head is not None:
        logits_loss = loss_cell

        class HeadThenLoss(nn.Cell):
            def __init__(self):
                super().__init__()
                self.loss = logits_loss
                self.head = head

            def construct(self, hidden, y, m):
                return self.loss(ops.matmul(hidden, self.head), y, m)

        loss_cell = HeadThenLoss()

    cells = {"fwd": loss_cell, "fwdbwd": _value_and_grad_cell(loss_cell)}
    args = (logits, label, mask)

    def make(pass_name):
        cell = cells[pass_name]

        def prepare():
            if graph:
                cell.compile(*args)

        def run():
            out = cell(*args)
            _ms_sync()
            value = out[0] if isinstance(out, tuple) else out
            if not math.isfinite(float(value.asnumpy())):
                raise FloatingPointError(f"{impl} returned a non-finite loss")
            del out

        return prepare, run

    return {name: make(name) for name in cells}, rows * vocab * DTYPE_BYTES[dtype]


def _mindformers_style_loss(ms, nn, ops, Tensor, vocab):
    """MindFormers' CrossEntropyLoss recipe (mp = 1), written from its description: float32 logits,
    log-softmax with max subtraction, a dense one-hot, NLL as -sum(log_softmax * one_hot), the masked mean
    sum(loss * mask) / (sum(mask) + 1e-8), and a hand-written backward (softmax - one_hot) * dout that keeps
    the softmax and the one-hot from the forward."""

    class _SoftmaxNLL(nn.Cell):
        def __init__(self):
            super().__init__()
            self.max = ops.ReduceMax(keep_dims=True)
            self.sum_keep = ops.ReduceSum(keep_dims=True)
            self.sum = ops.ReduceSum()
            self.exp = ops.Exp()
            self.log = ops.Log()
            self.onehot = ops.OneHot()
            self.zeros_like = ops.ZerosLike()
            self.on = Tensor(1.0, ms.float32)
            self.off = Tensor(0.0, ms.float32)

        def construct(self, logits, label):
            shifted = logits - self.max(logits, -1)
            exps = self.exp(shifted)
            sums = self.sum_keep(exps, -1)
            log_softmax = shifted - self.log(sums)
            one_hot = self.onehot(label, vocab, self.on, self.off)
            loss = -self.sum(log_softmax * one_hot, -1)
            return loss, exps / sums, one_hot

        def bprop(self, logits, label, out, dout):
            _, softmax, one_hot = out
            return (softmax - one_hot) * dout[0].reshape(-1, 1), self.zeros_like(label)

    class MindFormersStyle(nn.Cell):
        def __init__(self):
            super().__init__()
            self.loss = _SoftmaxNLL()
            self.cast = ops.Cast()
            self.sum = ops.ReduceSum()

        def construct(self, logits, label, mask):
            loss, _, _ = self.loss(self.cast(logits, ms.float32), label)
            return self.sum(loss * mask) / (self.sum(mask) + 1e-8)

    return MindFormersStyle


def _torch_steps(rows, vocab, dtype, seed, lm_head=0):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    logits = torch.randn(rows, lm_head or vocab, dtype=torch_dtype)  # the hidden state with lm_head
    label = torch.randint(0, vocab, (rows,), dtype=torch.int64)
    head = (torch.randn(lm_head, vocab) / math.sqrt(lm_head)).to(torch_dtype) if lm_head else None

    def head_then_loss(x):
        return F.cross_entropy(x if head is None else x @ head, label)

    def fwd():
        with torch.no_grad():
            value = head_then_loss(logits)
        if not math.isfinite(float(value)):
            raise FloatingPointError("torch returned a non-finite loss")

    def fwdbwd():
        x = logits.detach().requires_grad_(True)
        value = head_then_loss(x)
        value.backward()
        if not math.isfinite(float(value)) or x.grad is None:
            raise FloatingPointError("torch returned a non-finite loss")
        del x, value

    return {"fwd": (lambda: None, fwd), "fwdbwd": (lambda: None, fwdbwd)}, rows * vocab * DTYPE_BYTES[dtype]


def run_worker(config: dict) -> dict:
    """Runs one configuration in this (fresh) process; returns its measurements."""
    impl, rows, vocab, dtype = config["impl"], config["rows"], config["vocab"], config["dtype"]
    result = dict(config, error=None, passes={})
    started = time.perf_counter()
    if impl == "torch":
        steps, logits_bytes = _torch_steps(rows, vocab, dtype, config.get("seed", 0), config.get("lm_head", 0))
    else:
        steps, logits_bytes = _mindspore_steps(impl, rows, vocab, dtype, config.get("seed", 0),
                                               config.get("lm_head", 0))
    result["logits_bytes"] = logits_bytes
    for index, pass_name in enumerate(config["passes"]):
        prepare, run = steps[pass_name]
        prepare()
        first_s, peak, reset = _measure_first_step(run)
        times, cpu = _time_steps(run, config["warmup"], config["repeats"])
        result["passes"][pass_name] = dict(
            median_s=statistics.median(times), min_s=min(times), times_s=times, first_step_s=first_s,
            cpu_median_s=statistics.median(cpu), cpu_s=cpu,
            # only the first step of a process shows its memory: later passes reuse the pool
            peak_bytes=peak if index == 0 and reset else None,
            peak_over_logits=(peak / logits_bytes) if index == 0 and reset else None)
    result["worker_s"] = time.perf_counter() - started
    return result


READY_MARK = "MF_BENCH_READY "
TIME_MARK = "MF_BENCH_TIME "


def serve_worker(config: dict) -> None:
    """Paired mode, one side: set up, measure the first step of the first pass (its memory), warm every
    pass up, print READY; then run one step per `step <pass>` line of stdin, answering with its wall and
    CPU seconds; `quit` (or the end of stdin) ends."""
    impl, rows, vocab, dtype = config["impl"], config["rows"], config["vocab"], config["dtype"]
    if impl == "torch":
        steps, logits_bytes = _torch_steps(rows, vocab, dtype, config.get("seed", 0), config.get("lm_head", 0))
    else:
        steps, logits_bytes = _mindspore_steps(impl, rows, vocab, dtype, config.get("seed", 0),
                                               config.get("lm_head", 0))
    ready = dict(logits_bytes=logits_bytes, passes={})
    for index, pass_name in enumerate(config["passes"]):
        prepare, run = steps[pass_name]
        prepare()
        first_s, peak, reset = _measure_first_step(run)
        for _ in range(config["warmup"]):
            run()
        ready["passes"][pass_name] = dict(first_step_s=first_s, peak_bytes=peak if index == 0 and reset else None)
    print(READY_MARK + json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        run = steps[command[1]][1]
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        print(TIME_MARK + json.dumps([time.perf_counter() - start, time.process_time() - start_cpu]), flush=True)


# ---------------------------------------------------------------------------------------------------------
# model parallel (msrun, 2 ranks)
# ---------------------------------------------------------------------------------------------------------

def run_mp2_rank(config: dict) -> None:
    """One msrun rank: half of the vocabulary, fused or composed, GRAPH mode. Writes OUT/rank<r>.json."""
    import numpy as np

    import mindspore as ms
    from mindspore import Tensor
    from mindspore.communication import get_rank, init

    import mf_loss
    from mf_loss import ParallelConfig

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    rank = get_rank()
    rows, vocab, dtype, mp = config["rows"], config["vocab"], config["dtype"], 2
    local = vocab // mp
    rng = np.random.default_rng(config.get("seed", 0))
    ms_dtype = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[dtype]
    host = rng.standard_normal((rows, local), dtype=np.float32)
    logits = Tensor(host, dtype=ms_dtype)
    del host
    label = Tensor(rng.integers(0, vocab, rows).astype(np.int32))  # same seed: the same labels on both ranks
    mask = Tensor(np.ones(rows, np.float32))
    report = dict(rank=rank, rows=rows, vocab=vocab, local_vocab=local, dtype=dtype, backends={})
    for backend in config["backends"]:
        loss_fn = mf_loss.CrossEntropyLoss(parallel_config=ParallelConfig(model_parallel=mp), backend=backend)

        step_cell = _value_and_grad_cell(loss_fn)
        step_cell.compile(logits, label, mask)

        def run():
            out = step_cell(logits, label, mask)
            _ms_sync()
            float(out[0].asnumpy())

        run()
        times, _ = _time_steps(run, config["warmup"], config["repeats"])
        exchange = loss_fn.class_index_core.exchange
        report["backends"][backend] = dict(
            median_s=statistics.median(times), min_s=min(times), times_s=times,
            bytes_exchanged_per_step=exchange.bytes_per_call(rows + 1, 4),  # + the logits-width row
            backend_used=loss_fn.class_index_core.backend)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(report))


def run_mp2(args, shape, dtype) -> dict:
    """Launches 2 ranks under msrun (mf_loss.launch when present) and gathers their reports."""
    rows, vocab = shape
    out = Path(tempfile.mkdtemp(prefix="mf_loss_bench_mp2_"))
    config = dict(rows=rows, vocab=vocab, dtype=dtype, backends=["fused", "composed"], warmup=args.warmup,
                  repeats=args.repeats, out=str(out), seed=0)
    script_args = ["--mp2-rank", json.dumps(config)]
    env = _worker_env()
    try:
        from .launch import launch
    except ImportError:
        launch = None
    started = time.perf_counter()
    if launch is not None:
        status = launch(__file__, script_args, workers=2, log_dir=str(out / "logs"), timeout=args.mp2_timeout,
                        env=env, quiet=True)
        ok, message = status.ok, status.message
    else:
        ok, message = _msrun_fallback(script_args, out, env, args.mp2_timeout)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return dict(ok=ok and len(ranks) == 2, message=message if not ok else "", rows=rows, vocab=vocab, dtype=dtype,
                mp=2, wall_s=time.perf_counter() - started, ranks=ranks, log_dir=str(out))


def _msrun_fallback(script_args, out, env, timeout):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    msrun = str(Path(sys.executable).parent / "msrun")
    command = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}",
               f"--log_dir={out / 'logs'}", "--join=True", __file__, *script_args]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=out)
    except subprocess.TimeoutExpired:
        return False, f"msrun timed out after {timeout} s"
    return proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# orchestration (parent side)
# ---------------------------------------------------------------------------------------------------------

def _error_summary(stderr: str) -> str:
    """The exception line of a worker's traceback (else the last lines), without MindSpore's chatter."""
    lines = [t for t in (stderr or "").splitlines() if t.strip() and not t.startswith(("[WARNING]", "[INFO]"))]
    for line in reversed(lines):
        head = line.split(":", 1)[0].strip()
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line.strip()[-600:]
    return " | ".join(lines[-4:])[-600:]


def _worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GLOG_v", "3")  # MindSpore: errors only
    return env


def spawn_worker(config: dict, timeout: float) -> dict:
    """Runs `config` in a fresh interpreter (in a scratch directory: MindSpore writes files on errors)."""
    logits_bytes = config["rows"] * config["vocab"] * DTYPE_BYTES[config["dtype"]]
    need = logits_bytes * (1 + MEMORY_FACTORS.get(config["impl"], 4.0))
    available = _available_memory()
    if need > 0.85 * available:
        return dict(config, error=f"skipped: needs about {need / 2 ** 30:.1f} GiB, {available / 2 ** 30:.1f} GiB "
                                  "available", passes={}, logits_bytes=logits_bytes)
    with tempfile.TemporaryDirectory(prefix="mf_loss_bench_") as scratch:
        command = [sys.executable, "-m", "mf_loss.bench", "--worker", json.dumps(config)]
        try:
            proc = subprocess.run(command, cwd=scratch, env=_worker_env(), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(config, error=f"timed out after {timeout:.0f} s", passes={})
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return dict(config, error=f"worker exited {proc.returncode}: {_error_summary(proc.stderr)}", passes={})


class _Served:
    """A `--serve` worker process driven step by step (paired mode)."""

    def __init__(self, config: dict, timeout: float):
        import queue
        import threading

        self.config = config
        self._scratch = tempfile.TemporaryDirectory(prefix="mf_loss_bench_")
        self._stderr = open(Path(self._scratch.name) / "stderr.txt", "w+")
        self._lines = queue.Queue()
        self._proc = subprocess.Popen([sys.executable, "-m", "mf_loss.bench", "--serve", json.dumps(config)],
                                      cwd=self._scratch.name, env=_worker_env(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)

        def pump():
            for line in self._proc.stdout:
                self._lines.put(line)
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.ready = self._expect(READY_MARK, timeout)

    def _expect(self, mark, timeout):
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.config['impl']}: no answer within {timeout:.0f} s") from None
            if line is None:
                self._stderr.seek(0)
                raise RuntimeError(f"worker exited {self._proc.wait()}: {_error_summary(self._stderr.read())}")
            if line.startswith(mark):
                return json.loads(line[len(mark):])

    def step(self, pass_name, timeout):
        self._proc.stdin.write(f"step {pass_name}\n")
        self._proc.stdin.flush()
        return self._expect(TIME_MARK, timeout)

    def close(self):
        try:
            self._proc.stdin.write("quit\n")
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()
        self._scratch.cleanup()


def run_pair(fused_config: dict, other_config: dict, timeout: float):
    """Runs fused and another implementation in two fresh processes, step by step in turns (ABBA), so that
    both see the same moments of a busy machine. Returns their results in run_worker's format; the
    other's carries `paired`: fused's times and the per-turn ratios fused / other."""
    results, workers, current = [], [], 0
    configs = (fused_config, other_config)
    try:
        for current, config in enumerate(configs):
            workers.append(_Served(config, timeout))
        times = [{p: [] for p in fused_config["passes"]} for _ in workers]
        for i in range(fused_config["repeats"]):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for pass_name in fused_config["passes"]:
                for current in order:
                    times[current][pass_name].append(workers[current].step(pass_name, timeout))
    except (RuntimeError, TimeoutError, OSError) as err:
        for w in workers:
            w.close()
        # the error belongs to the side that failed; the other side has no measurement from this pair
        return [dict(c, error=str(err) if i == current else None, passes={}) for i, c in enumerate(configs)]
    for w in workers:
        w.close()
    for w, config in enumerate((fused_config, other_config)):
        ready = workers[w].ready
        result = dict(config, error=None, logits_bytes=ready["logits_bytes"], passes={})
        for pass_name, steps in times[w].items():
            wall = [t[0] for t in steps]
            cpu = [t[1] for t in steps]
            peak = ready["passes"][pass_name]["peak_bytes"]
            result["passes"][pass_name] = dict(
                median_s=statistics.median(wall), min_s=min(wall), times_s=wall, cpu_median_s=statistics.median(cpu),
                cpu_s=cpu, first_step_s=ready["passes"][pass_name]["first_step_s"], peak_bytes=peak,
                peak_over_logits=(peak / ready["logits_bytes"]) if peak is not None else None)
        results.append(result)
    results[1]["paired"] = {
        p: dict(fused_times_s=[t[0] for t in times[0][p]], fused_cpu_s=[t[1] for t in times[0][p]],
                ratios=[a[0] / b[0] for a, b in zip(times[0][p], times[1][p])],
                cpu_ratios=[a[1] / b[1] for a, b in zip(times[0][p], times[1][p]) if b[1] > 0])
        for p in fused_config["passes"]}
    return results


def _parse_shape(text: str):
    try:
        rows, vocab = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x32000, got {text!r}") from None
    return rows, vocab


def _csv(kind):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        return [kind(v) for v in values]
    return parse


def _torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def machine_info() -> dict:
    info = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count())
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2 ** 20, 1)
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version
        info["mindspore"] = version("mindspore")
        if _torch_available():
            info["torch"] = version("torch")
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    try:
        from .ops.fused import isa_flags
        info["fused_isa_flags"] = " ".join(isa_flags()) or "baseline"
    except Exception:  # noqa: BLE001
        pass
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mf-loss bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_csv(_parse_shape), default=None,
                        help="rows x vocabulary, comma separated (default 4096x32000,2048x128256)")
    parser.add_argument("--dtypes", type=_csv(str), default=None, help="float32, float16, bfloat16 (default float32)")
    parser.add_argument("--impls", type=_csv(str), default=None,
                        help=f"comma separated, of: {', '.join(IMPLS)} (default {', '.join(DEFAULT_IMPLS)})")
    parser.add_argument("--passes", type=_csv(str), default=None, help="fwdbwd and/or fwd (default both)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps after warm-up (default 5)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after the first (memory) step (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole sequence of processes this many times, interleaved, and pool the "
                             "timings (fairer on a machine whose load changes)")
    parser.add_argument("--out", type=Path, default=None, help="write bench.json and bench.png into this directory")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--png", type=Path, default=None, help="write the PNG chart here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process (default 900)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes at once (default 1: timings side by side need a quiet machine)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 2 repeats, both passes in one process: proves it runs (CI), < 60 s")
    parser.add_argument("--lm-head", type=int, default=0, metavar="H",
                        help="make the logits inside the measured step from a (rows, H) hidden state and an "
                             "(H, vocab) head, as a model does (the peak then includes the logits themselves); "
                             "default 0: the logits are the input")
    parser.add_argument("--mp2", action="store_true",
                        help="also run mp=2 under msrun (per-rank time, bytes exchanged per step)")
    parser.add_argument("--mp2-timeout", type=float, default=600.0)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="combine reports of earlier runs (bench.json files) into one table, JSON and chart")
    parser.add_argument("--sequential", action="store_true",
                        help="one process after the other instead of paired turns with fused (see --help text)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--mp2-rank", help=argparse.SUPPRESS)
    return parser


# peak memory beyond the inputs during fwd+bwd, in logits sizes (measured here, rounded up): a run that
# would not fit in the available memory is skipped instead of pushing a shared machine into swap or OOM
MEMORY_FACTORS = {"fused": 1.3, "fused_pynative": 2.3, "fused_inplace": 1.3, "fused_inplace_graph": 1.3,
                  "composed": 21.0, "mint": 3.3, "ops": 20.0,
                  "mindformers": 22.0, "torch": 3.3}


def _available_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _configs(args):
    configs = []
    for round_index in range(args.rounds):
        configs += [dict(c, round=round_index) for c in _one_round(args)]
    return configs


def _one_round(args):
    configs = []
    for rows, vocab in args.shapes:
        for dtype in args.dtypes:
            for impl in args.impls:
                if args.together:
                    configs.append(dict(impl=impl, rows=rows, vocab=vocab, dtype=dtype, passes=list(args.passes),
                                        warmup=args.warmup, repeats=args.repeats, seed=0, lm_head=args.lm_head))
                else:
                    for pass_name in args.passes:
                        configs.append(dict(impl=impl, rows=rows, vocab=vocab, dtype=dtype, passes=[pass_name],
                                            warmup=args.warmup, repeats=args.repeats, seed=0,
                                            lm_head=args.lm_head))
    return configs


def _merge(results):
    """One record per (impl, shape, dtype): the passes of its processes and rounds pooled (median and
    minimum over every timed step of every round; peak memory: the median of the rounds' first steps)."""
    merged = {}
    for r in results:
        key = (r["impl"], r["rows"], r["vocab"], r["dtype"])
        record = merged.setdefault(key, dict(impl=r["impl"], label=IMPLS.get(r["impl"], r["impl"]), rows=r["rows"],
                                             vocab=r["vocab"], dtype=r["dtype"], logits_bytes=r.get("logits_bytes"),
                                             passes={}, errors=[], _pool={}))
        record["logits_bytes"] = record["logits_bytes"] or r.get("logits_bytes")
        if r.get("error"):
            record["errors"].append(r["error"])
        for name, p in r.get("paired", {}).items():
            paired = record.setdefault("paired", {}).setdefault(
                name, dict(fused_times_s=[], fused_cpu_s=[], ratios=[], cpu_ratios=[]))
            for key in paired:
                paired[key] += p[key]
        for name, p in r.get("passes", {}).items():
            pool = record["_pool"].setdefault(name, dict(times=[], cpu=[], peaks=[], first=[]))
            pool["times"] += p["times_s"]
            pool["cpu"] += p.get("cpu_s", [])
            first = p["first_step_s"]
            pool["first"] += first if isinstance(first, list) else [first]
            if p.get("peak_bytes") is not None:
                pool["peaks"].append(p["peak_bytes"])
    for record in merged.values():
        for name, pool in record.pop("_pool").items():
            peak = statistics.median(pool["peaks"]) if pool["peaks"] else None
            logits_bytes = record["logits_bytes"]
            record["passes"][name] = dict(
                median_s=statistics.median(pool["times"]), min_s=min(pool["times"]),
                cpu_median_s=statistics.median(pool["cpu"]) if pool["cpu"] else None,
                peak_bytes=peak, peak_over_logits=(peak / logits_bytes) if peak is not None and logits_bytes else None,
                rounds=len(pool["first"]), first_step_s=pool["first"], times_s=pool["times"], cpu_s=pool["cpu"])
    return list(merged.values())


def _ratios(records):
    """Per (shape, dtype): fused's median fwd+bwd time over the others' (side by side, one run)."""
    out = []
    groups = {}
    for r in records:
        groups.setdefault((r["rows"], r["vocab"], r["dtype"]), {})[r["impl"]] = r
    for (rows, vocab, dtype), by_impl in groups.items():
        fused = by_impl.get("fused")
        if not fused or "fwdbwd" not in fused["passes"]:
            continue
        entry = dict(rows=rows, vocab=vocab, dtype=dtype)
        for impl, r in by_impl.items():
            if impl == "fused" or "fwdbwd" not in r["passes"]:
                continue
            paired = r.get("paired", {}).get("fwdbwd")
            if paired and paired["ratios"]:
                # measured in turns: the median of the per-turn ratios, the ratio of the minima, and the
                # median of the per-turn CPU-time ratios
                entry[f"fused_over_{impl}_median"] = statistics.median(paired["ratios"])
                entry[f"fused_over_{impl}_min"] = min(paired["fused_times_s"]) / r["passes"]["fwdbwd"]["min_s"]
                if paired["cpu_ratios"]:
                    entry[f"fused_over_{impl}_cpu_median"] = statistics.median(paired["cpu_ratios"])
                continue
            for stat in ("median_s", "min_s", "cpu_median_s"):
                mine, theirs = fused["passes"]["fwdbwd"].get(stat), r["passes"]["fwdbwd"].get(stat)
                if mine is not None and theirs:
                    entry[f"fused_over_{impl}_{stat[:-2]}"] = mine / theirs
        peak = fused["passes"]["fwdbwd"].get("peak_over_logits")
        if peak is not None:
            entry["fused_fwdbwd_peak_over_logits"] = peak
        out.append(entry)
    return out


def format_table(records) -> str:
    header = (f"{'implementation':<42} {'shape':>12} {'dtype':>8} | {'fwd med':>9} {'fwd min':>9} | "
              f"{'f+b med':>9} {'f+b min':>9} {'f+b cpu':>9} | {'peak f+b':>10} {'x logits':>8} | "
              f"{'f+b vs fused':>12}")
    lines = [header, "-" * len(header)]
    fused_median = {(r["rows"], r["vocab"], r["dtype"]): r["passes"]["fwdbwd"]["median_s"] for r in records
                    if r["impl"] == "fused" and "fwdbwd" in r["passes"]}

    def seconds(p, key):
        return f"{p[key] * 1e3:8.1f}ms" if p and p.get(key) is not None else f"{'-':>10}"

    for r in records:
        fwd, fb = r["passes"].get("fwd"), r["passes"].get("fwdbwd")
        peak = (fb or {}).get("peak_bytes")
        ratio = (fb or {}).get("peak_over_logits")
        base = fused_median.get((r["rows"], r["vocab"], r["dtype"]))
        paired = r.get("paired", {}).get("fwdbwd")
        if paired and paired["ratios"]:
            speed = f"{1.0 / statistics.median(paired['ratios']):11.2f}x"
        else:
            speed = f"{fb['median_s'] / base:11.2f}x" if fb and base else f"{'-':>12}"
        line = (f"{r['label']:<42} {str(r['rows']) + 'x' + str(r['vocab']):>12} {r['dtype']:>8} | "
                f"{seconds(fwd, 'median_s')} {seconds(fwd, 'min_s')} | {seconds(fb, 'median_s')} "
                f"{seconds(fb, 'min_s')} {seconds(fb, 'cpu_median_s')} | "
                f"{(f'{peak / 2 ** 20:7.0f}MiB') if peak is not None else '-':>10} "
                f"{(f'{ratio:7.2f}x') if ratio is not None else '-':>8} | {speed}")
        lines.append(line)
        for error in r["errors"]:
            lines.append(f"    ! {error[:200]}")
    return "\n".join(lines)


def format_mp2(report) -> str:
    if not report["ok"]:
        return f"mp=2 run failed: {report['message'][-1500:]}"
    lines = [f"mp=2 under msrun, {report['rows']}x{report['vocab']} {report['dtype']} "
             f"(each rank {report['vocab'] // 2} classes), GRAPH, fwd+bwd per rank:"]
    for rank in report["ranks"]:
        for backend, b in rank["backends"].items():
            lines.append(f"  rank {rank['rank']} {backend:<9} median {b['median_s'] * 1e3:8.1f} ms  min "
                         f"{b['min_s'] * 1e3:8.1f} ms  exchanged {b['bytes_exchanged_per_step']} bytes/step "
                         f"(= mp * (N + 1) * K * 4: N tokens and the logits-width row)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(args.worker))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    if args.serve:
        serve_worker(json.loads(args.serve))
        return 0
    if args.mp2_rank:
        run_mp2_rank(json.loads(args.mp2_rank))
        return 0
    if args.merge:
        return _merge_reports(args)
    quick = args.quick
    args.shapes = args.shapes or ([(256, 2048)] if quick else [(4096, 32000), (2048, 128256)])
    args.dtypes = args.dtypes or ["float32"]
    default_impls = [i for i in DEFAULT_IMPLS if i != "torch" or _torch_available()]
    args.impls = args.impls or default_impls
    args.passes = args.passes or ["fwdbwd", "fwd"]
    args.repeats = args.repeats if args.repeats is not None else (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.jobs = args.jobs or (2 if quick else 1)
    args.together = quick
    for impl in args.impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if "torch" in args.impls and not _torch_available():
        raise SystemExit("torch is not installed: leave 'torch' out of --impls")
    for dtype in args.dtypes:
        if dtype not in DTYPE_BYTES:
            raise SystemExit(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    # fwd+bwd first: the first pass of a process is the one whose memory is measured
    args.passes = sorted(set(args.passes), key=["fwdbwd", "fwd"].index)

    paired = not (args.sequential or quick) and "fused" in args.impls and len(args.impls) > 1
    started = time.time()
    if paired:
        print(f"mf_loss bench, paired turns with fused: {', '.join(i for i in args.impls if i != 'fused')}; "
              f"{', '.join(f'{r}x{v}' for r, v in args.shapes)}; {', '.join(args.dtypes)}; {args.rounds} round(s) "
              f"of {args.repeats} turns after {args.warmup}+1 warm-up", file=sys.stderr, flush=True)
        results = _run_paired(args)
    else:
        configs = _configs(args)
        print(f"mf_loss bench: {len(configs)} worker processes ({', '.join(args.impls)}; "
              f"{', '.join(f'{r}x{v}' for r, v in args.shapes)}; {', '.join(args.dtypes)}), "
              f"{args.repeats} repeats after {args.warmup}+1 warm-up", file=sys.stderr, flush=True)
        results = _run_all(configs, args)
    records = _merge(results)
    report = dict(machine=machine_info(), started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                  seconds=round(time.time() - started, 1), load_average_end=list(os.getloadavg()),
                  settings=dict(shapes=[f"{r}x{v}" for r, v in args.shapes], dtypes=args.dtypes, impls=args.impls,
                                passes=args.passes, repeats=args.repeats, warmup=args.warmup, rounds=args.rounds,
                                quick=quick, paired_with_fused=paired, lm_head=args.lm_head,
                                separate_processes_per_pass=not args.together and not paired),
                  results=records, ratios=_ratios(records))
    if args.mp2:
        rows, vocab = args.shapes[0]
        print(f"[mp2] 2 ranks under msrun, {rows}x{vocab} {args.dtypes[0]} ...", file=sys.stderr, flush=True)
        report["mp2"] = run_mp2(args, (rows, vocab), args.dtypes[0])
    _print_report(report)
    _write_outputs(args, report)
    failed = [r for r in records if any(not e.startswith("skipped") for e in r["errors"])]
    return 1 if failed else 0


def _merge_reports(args) -> int:
    reports = [json.loads(Path(path).read_text()) for path in args.merge]
    records = [r for report in reports for r in report["results"]]
    merged = dict(machine=reports[0]["machine"], merged_from=[str(p) for p in args.merge],
                  runs=[dict(started=r.get("started"), seconds=r.get("seconds"), settings=r.get("settings"),
                             load_average_end=r.get("load_average_end")) for r in reports],
                  results=records, ratios=_ratios(records))
    for report in reports:
        if "mp2" in report:
            merged["mp2"] = report["mp2"]
    _print_report(merged)
    _write_outputs(args, merged)
    return 0


def _print_report(report):
    print(format_table(report["results"]))
    for entry in report["ratios"]:
        parts = [f"{k[len('fused_over_'):]}: {v:.3f}" for k, v in entry.items() if k.startswith("fused_over_")]
        if parts:
            print(f"fused / other, fwd+bwd ({entry['rows']}x{entry['vocab']} {entry['dtype']}): "
                  + ", ".join(parts))
    if "mp2" in report:
        print(format_mp2(report["mp2"]))


def _write_outputs(args, report):
    json_path = args.json or (args.out / "bench.json" if args.out else None)
    png_path = args.png or (args.out / "bench.png" if args.out else None)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    if png_path:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        write_chart(png_path, report["results"], report["machine"])
        print(f"wrote {png_path}", file=sys.stderr)


def _run_paired(args):
    results = []
    others = [i for i in args.impls if i != "fused"]
    total = len(args.shapes) * len(args.dtypes) * len(others) * args.rounds
    done = 0
    for rows, vocab in args.shapes:
        for dtype in args.dtypes:
            for round_index in range(args.rounds):
                for other in others:
                    common = dict(rows=rows, vocab=vocab, dtype=dtype, passes=list(args.passes), warmup=args.warmup,
                                  repeats=args.repeats, seed=0, round=round_index, lm_head=args.lm_head)
                    fused_config, other_config = dict(common, impl="fused"), dict(common, impl=other)
                    done += 1
                    print(f"[{done}/{total}] fused vs {other} {rows}x{vocab} {dtype}"
                          + (f" (round {round_index + 1})" if args.rounds > 1 else "") + " ...",
                          file=sys.stderr, flush=True)
                    logits_bytes = rows * vocab * DTYPE_BYTES[dtype]
                    need = logits_bytes * (2 + MEMORY_FACTORS["fused"] + MEMORY_FACTORS.get(other, 4.0))
                    available = _available_memory()
                    if need > 0.85 * available:
                        error = (f"skipped: the pair needs about {need / 2 ** 30:.1f} GiB, "
                                 f"{available / 2 ** 30:.1f} GiB available")
                        pair = [dict(other_config, error=error, passes={}, logits_bytes=logits_bytes)]
                    else:
                        pair = run_pair(fused_config, other_config, args.timeout)
                    for result in pair:
                        _progress(result, done, total)
                    results += pair
    return results


def _run_all(configs, args):
    results = [None] * len(configs)
    pending = list(enumerate(configs))
    running = {}
    done = 0
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            index, config = pending.pop(0)
            label = (f"{config['impl']} {config['rows']}x{config['vocab']} {config['dtype']} "
                     f"{'+'.join(config['passes'])}" + (f" (round {config['round'] + 1})" if args.rounds > 1 else ""))
            print(f"[{index + 1}/{len(configs)}] {label} ...", file=sys.stderr, flush=True)
            if args.jobs <= 1:
                results[index] = spawn_worker(config, args.timeout)
                done += 1
                _progress(results[index], done, len(configs))
                continue
            running[index] = _Background(config, args.timeout)
        for index in list(running):
            if running[index].done():
                results[index] = running.pop(index).result()
                done += 1
                _progress(results[index], done, len(configs))
        if running:
            time.sleep(0.2)
    return results


def _progress(result, done, total):
    if result.get("error"):
        print(f"    {result['impl']}: FAILED {result['error'][:300]}", file=sys.stderr, flush=True)
        return
    parts = []
    for name, p in result["passes"].items():
        peak = p.get("peak_over_logits")
        parts.append(f"{name} median {p['median_s'] * 1e3:.1f} ms, min {p['min_s'] * 1e3:.1f} ms"
                     + (f", peak {peak:.2f}x logits" if peak is not None else ""))
    print(f"    {result['impl']}: " + "; ".join(parts) + f"  ({done}/{total} done)", file=sys.stderr, flush=True)


class _Background:
    def __init__(self, config, timeout):
        import threading
        self._result = None
        self._thread = threading.Thread(target=self._run, args=(config, timeout), daemon=True)
        self._thread.start()

    def _run(self, config, timeout):
        self._result = spawn_worker(config, timeout)

    def done(self):
        return not self._thread.is_alive()

    def result(self):
        return self._result


# ---------------------------------------------------------------------------------------------------------
# a dependency-free PNG bar chart
# ---------------------------------------------------------------------------------------------------------

_GLYPHS = {
    "0": "01110100011001110101110011000101110", "1": "00100011000010000100001000010001110",
    "2": "01110100010000100010001000100011111", "3": "11111000100010000010000011000101110",
    "4": "00010001100101010010111110001000010", "5": "11111100001111000001000011000101110",
    "6": "00110010001000011110100011000101110", "7": "11111000010001000100010000100001000",
    "8": "01110100011000101110100011000101110", "9": "01110100011000101111000010001001100",
    "A": "01110100011000111111100011000110001", "B": "11110100011000111110100011000111110",
    "C": "01110100011000010000100001000101110", "D": "11100100101000110001100011001011100",
    "E": "11111100001000011110100001000011111", "F": "11111100001000011110100001000010000",
    "G": "01110100011000010111100011000101111", "H": "10001100011000111111100011000110001",
    "I": "01110001000010000100001000010001110", "J": "00111000100001000010000101001001100",
    "K": "10001100101010011000101001001010001", "L": "10000100001000010000100001000011111",
    "M": "10001110111010110101100011000110001", "N": "10001100011100110101100111000110001",
    "O": "01110100011000110001100011000101110", "P": "11110100011000111110100001000010000",
    "Q": "01110100011000110001101011001001101", "R": "11110100011000111110101001001010001",
    "S": "01111100001000001110000010000111110", "T": "11111001000010000100001000010000100",
    "U": "10001100011000110001100011000101110", "V": "10001100011000110001100010101000100",
    "W": "10001100011000110101101011010101010", "X": "10001100010101000100010101000110001",
    "Y": "10001100011000101010001000010000100", "Z": "11111000010001000100010001000011111",
    " ": "00000000000000000000000000000000000", ".": "00000000000000000000000000110001100",
    ",": "00000000000000000000011000010001000", ":": "00000011000110000000011000110000000",
    "-": "00000000000000011111000000000000000", "+": "00000001000010011111001000010000000",
    "(": "00010001000100001000010000010000010", ")": "01000001000001000010000100010001000",
    "/": "00000000010001000100010001000000000", "%": "11000110010001000100010001001100011",
    "_": "00000000000000000000000000000011111", "=": "00000000001111100000111110000000000",
    "<": "00010001000100010000010000010000010", ">": "01000001000001000001000100010001000",
    "*": "00000001001010101110101010010000000", "?": "01110100010000100010001000000000100",
    ";": "00000011000110000000011000010001000", "!": "00100001000010000100001000000000100",
}


class _Canvas:
    def __init__(self, width, height, background=(255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x0, y0, x1, y1, color):
        x0, x1 = max(0, int(x0)), min(self.width, int(x1))
        y0, y1 = max(0, int(y0)), min(self.height, int(y1))
        if x1 <= x0:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = (y * self.width + x0) * 3
            self.pixels[start:start + len(row)] = row

    def text(self, x, y, string, color=(0, 0, 0), scale=2):
        for char in string.upper():
            glyph = _GLYPHS.get(char, _GLYPHS["?"])
            for index, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = index % 5, index // 5
                    self.rect(x + gx * scale, y + gy * scale, x + (gx + 1) * scale, y + (gy + 1) * scale, color)
            x += 6 * scale
        return x

    def save(self, path):
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3])
                       for y in range(self.height))

        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                               + chunk(b"IEND", b""))


_COLORS = {"fused": (31, 119, 180), "fused_pynative": (120, 170, 220), "fused_inplace": (23, 190, 207),
           "fused_inplace_graph": (158, 218, 229), "composed": (255, 127, 14),
           "mint": (44, 160, 44), "ops": (148, 103, 189), "mindformers": (214, 39, 40), "torch": (140, 86, 75)}


def write_chart(path, records, machine):
    """Per (shape, dtype): median fwd+bwd time (bars scaled to the slowest; labels in ms and x fused) and
    the peak memory beyond the inputs during fwd+bwd (x the logits' size)."""
    groups = {}
    for r in records:
        groups.setdefault((r["rows"], r["vocab"], r["dtype"]), []).append(r)
    label_w, bar_w, gap, row_h, scale = 46 * 12, 430, 40, 22, 2
    width = label_w + 2 * (bar_w + 230) + gap
    height = 90 + sum(40 + row_h * len(rs) + 20 for rs in groups.values())
    canvas = _Canvas(width, height)
    canvas.text(10, 10, "MF_LOSS BENCH: CROSS ENTROPY ON CPU, FWD+BWD", scale=scale)
    canvas.text(10, 34, f"{machine.get('cpu', '?')[:60]}, {machine.get('cpus_usable', machine.get('cpus'))} CPUS",
                color=(90, 90, 90), scale=scale)
    canvas.text(10, 58, "LEFT: MEDIAN TIME (MS; X FUSED, IN TURNS)   RIGHT: PEAK MEMORY BEYOND INPUTS (X LOGITS)",
                color=(90, 90, 90), scale=scale)
    y = 90
    for (rows, vocab, dtype), rs in groups.items():
        canvas.text(10, y + 10, f"{rows}X{vocab} {dtype}", scale=scale)
        canvas.rect(10, y + 32, width - 10, y + 33, (200, 200, 200))
        y += 40
        times = {r["impl"]: r["passes"]["fwdbwd"]["median_s"] for r in rs if "fwdbwd" in r["passes"]}
        peaks = {r["impl"]: r["passes"]["fwdbwd"].get("peak_over_logits") for r in rs if "fwdbwd" in r["passes"]}
        slowest = max(times.values(), default=1.0) or 1.0
        most = max((p for p in peaks.values() if p is not None), default=1.0) or 1.0
        fused = times.get("fused")
        for r in rs:
            color = _COLORS.get(r["impl"], (100, 100, 100))
            canvas.text(10, y + 4, r["label"][:46], scale=scale)
            x0 = label_w
            if r["impl"] in times:
                t = times[r["impl"]]
                canvas.rect(x0, y + 2, x0 + max(2, bar_w * t / slowest), y + row_h - 4, color)
                paired = r.get("paired", {}).get("fwdbwd")
                relative = (1.0 / statistics.median(paired["ratios"]) if paired and paired["ratios"]
                            else (t / fused if fused else None))
                note = f"{t * 1e3:.0f} MS" + (f" ({relative:.1f}X)" if relative else "")
                canvas.text(x0 + bar_w * t / slowest + 6, y + 4, note, scale=scale)
            else:
                skipped = r["errors"] and all(e.startswith("skipped") for e in r["errors"])
                label = "SKIPPED: NOT ENOUGH MEMORY" if skipped else ("FAILED" if r["errors"] else "-")
                if any("non-finite" in e for e in r["errors"]):
                    label = "FAILED: NON-FINITE LOSS"
                canvas.text(x0, y + 4, label, color=(200, 0, 0), scale=scale)
            x1 = label_w + bar_w + 230 + gap
            p = peaks.get(r["impl"])
            if p is not None:
                canvas.rect(x1, y + 2, x1 + max(2, bar_w * p / most), y + row_h - 4, color)
                canvas.text(x1 + bar_w * p / most + 6, y + 4, f"{p:.2f}X", scale=scale)
            y += row_h
        y += 20
    canvas.save(path)


if __name__ == "__main__":
    sys.exit(main())
