"""The parent side of `mf-loss train`: check the request, prepare the data, start the ranks, show progress.

One rank (data_parallel = model_parallel = 1) trains in this process. More ranks are started with msrun
(`mf_loss.launch.launch`, which stops the whole job when a rank fails or time runs out), on one node or
several (`nnodes`, every node running the same command with its own `node_rank`). The tokenizer and the
corpus's ids are built here, before any rank starts, so that no rank builds them. Rank 0 (on node 0)
appends its progress to <run dir>/progress.jsonl, which node 0's process follows and shows.
"""
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import psutil

from ..config_loader import Config, ConfigError, load_config
from .checks import check_trainable

RANKS_PER_CORE = 4            # CPU ranks mostly wait on each other; beyond this a step crawls
RANK_MEMORY_GIB = 1.25        # measured peak 1.05 GiB resident per rank of the default dp2_mp2 run (MindSpore + graph)
WORKER = Path(__file__).resolve().parent / "worker.py"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


class TrainError(RuntimeError):
    """A request that cannot run, or a run that failed; the message says why and what to do."""


def usable_cores() -> int:
    return len(psutil.Process().cpu_affinity())


def available_memory_gib() -> float:
    return psutil.virtual_memory().available / 2**30


def check_layout(config: Config, nnodes: int, node_rank: int) -> int:
    """The ranks this node runs: dp x mp over all nodes, split evenly, each model-parallel group on one node."""
    p, world = config.parallel, config.world_size
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise TrainError(f"--node-rank {node_rank} must be in [0, --nnodes {nnodes})")
    if world % nnodes:
        raise TrainError(f"{config.source}: data_parallel x model_parallel = {p['data_parallel']} x "
                         f"{p['model_parallel']} = {world} ranks do not split evenly over --nnodes {nnodes}")
    per_node = world // nnodes
    if per_node % p["model_parallel"]:
        raise TrainError(f"{config.source}: {per_node} rank(s) per node cannot hold whole model-parallel groups of "
                         f"{p['model_parallel']} (ranks are model-parallel adjacent: rank = dp_rank x mp + mp_rank); "
                         f"the model-parallel ranks must share a node, whose collectives run every micro-batch. Use "
                         f"--nnodes dividing data_parallel = {p['data_parallel']}")
    return per_node


def check_capacity(config: Config, ranks: int) -> None:
    """Refuse more ranks on this node than it can run: more than RANKS_PER_CORE per core, or more than the
    available memory holds."""
    cores = usable_cores()
    limit, reason = RANKS_PER_CORE * cores, f"{RANKS_PER_CORE} per CPU core on {cores} core(s)"
    memory = available_memory_gib()
    if int(memory / RANK_MEMORY_GIB) < limit:
        limit = max(1, int(memory / RANK_MEMORY_GIB))
        reason = f"about {RANK_MEMORY_GIB:g} GiB per rank in {memory:.1f} GiB of available memory"
    if ranks > limit:
        p = config.parallel
        raise TrainError(f"{config.source}: parallel_config asks for data_parallel x model_parallel = "
                         f"{p['data_parallel']} x {p['model_parallel']} = {config.world_size} ranks, {ranks} on this "
                         f"node, more than this machine can run: at most {limit} ({reason}). Lower data_parallel or "
                         "model_parallel, or spread the job over more nodes (--nnodes).")


def check_port(port: int) -> None:
    """The msrun scheduler listens on 127.0.0.1:port; make sure it can, before starting anything."""
    if not 1 <= port <= 65535:
        raise TrainError(f"--port {port} is not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            raise TrainError(f"--port {port} is busy or unreachable on 127.0.0.1 ({error.strerror}); msrun's "
                             "scheduler needs it free. Pick another --port, or leave --port out to use a free "
                             "one.") from None


class _Follower(threading.Thread):
    """Shows the events appended to progress.jsonl (by rank 0) until stopped."""

    def __init__(self, path: Path, view):
        super().__init__(daemon=True)
        self.path, self.view = path, view
        self.offset = path.stat().st_size if path.exists() else 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            self.drain()
            self.stopping.wait(0.5)
        self.drain()

    def drain(self):
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            self.view.show(json.loads(line))

    def stop(self):
        self.stopping.set()
        self.join(timeout=5)


def worker_env() -> dict:
    """This process's environment, with the directory holding `mf_loss` on PYTHONPATH for the workers
    (msrun starts WORKER as a script, which works from a source checkout too)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_dir_for(config: Config, output_dir: Optional[str] = None) -> Path:
    return (Path(output_dir or config["output_dir"]) / config["run_name"]).resolve()


def fresh_run_dir(run_dir: Path) -> None:
    """A new (not resumed) run starts from an empty run directory."""
    if run_dir.exists():
        for name in ("loss.csv", "step_times.csv", "loss.png", "throughput.png", "memory.json", "progress.jsonl",
                     "summary.json", "summary.txt"):
            (run_dir / name).unlink(missing_ok=True)
        for name in ("checkpoints", "logs"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _checkpoint_note(run_dir: Path, args_text: str) -> str:
    from .checkpoints import checkpoint_dir, read_latest
    latest = read_latest(checkpoint_dir(run_dir))
    if latest is None:
        return "No checkpoint was written before the failure."
    return (f"The last complete checkpoint is step {latest['step']} in {checkpoint_dir(run_dir) / latest['dir']}; "
            f"continue with: mf-loss train {args_text} --resume")


def train_command(config_path: str, overrides=(), *, resume: bool = False, output_dir: Optional[str] = None,
                  port: Optional[int] = None, timeout: float = 900.0, nnodes: int = 1, node_rank: int = 0,
                  master_addr: str = "127.0.0.1", out=sys.stdout) -> Path:
    """Validate, prepare the data, then train on the configured ranks (this node's share of them); returns
    the run directory. `port` is msrun's master port (on `master_addr`, node 0). Raises ConfigError or
    TrainError with a message for the user."""
    config = load_config(config_path, overrides)
    check_trainable(config)
    ranks_here = check_layout(config, nnodes, node_rank)
    check_capacity(config, ranks_here)
    if nnodes > 1 and port is None:
        raise TrainError("--nnodes > 1 needs --master-port: every node must name the same port of node 0")
    if port is not None and node_rank == 0:
        check_port(port)
    run_dir = run_dir_for(config, output_dir)
    resume = resume or config["resume_training"]
    if resume:
        from .checkpoints import resume_source
        # fails here, before any rank starts, when there is nothing to resume
        resume_source(config["load_checkpoint"], run_dir, config.parallel["data_parallel"],
                      config.parallel["model_parallel"], config.source)
    elif node_rank == 0:
        fresh_run_dir(run_dir)  # other nodes leave the directory alone: it may be node 0's (a shared disk)
    args_text = f"--config {config_path}" + "".join(f" --set {o}" for o in overrides)
    if output_dir:
        args_text += f" --output-dir {output_dir}"
    if nnodes > 1:
        args_text += f" --nnodes {nnodes} --node-rank {node_rank} --master-addr {master_addr} --master-port {port}"

    from .progress import ProgressView
    from .tokenizer import prepare_corpus
    from .trainer import tokenizer_settings
    corpus = prepare_corpus(config["train_dataset"]["corpus"], tokenizer_settings(config))
    print(f"tokenizer: {'built' if corpus.built else 'cached'} in {corpus.directory} ({corpus.vocab_size} tokens, "
          f"corpus {corpus.ids.size:,} tokens)", file=out, flush=True)
    if config.world_size == 1:
        from .trainer import train
        try:
            train(config, run_dir, resume=resume, echo=True)
        except (ConfigError, FileNotFoundError):
            raise
        except Exception as error:  # the single rank failed: same report as a failed msrun rank
            raise TrainError(f"training failed on rank 0: {type(error).__name__}: {error}\n"
                             f"{_checkpoint_note(run_dir, args_text)}") from error
        return run_dir

    from ..launch import launch
    run_dir.mkdir(parents=True, exist_ok=True)
    worker_args = ["train", "--config", str(Path(config_path).resolve()), "--run-dir", str(run_dir),
                   "--nnodes", str(nnodes)]
    for override in overrides:
        worker_args += ["--set", override]
    if resume:
        worker_args.append("--resume")
    log_dir = run_dir / "logs" if nnodes == 1 else run_dir / "logs" / f"node_{node_rank}"
    where = f"node {node_rank} of {nnodes}: " if nnodes > 1 else ""
    print(f"{where}starting {ranks_here} ranks with msrun (start-up takes ~30 s); logs in {log_dir}", file=out,
          flush=True)
    follower = None
    if node_rank == 0:  # rank 0 runs here
        follower = _Follower(run_dir / "progress.jsonl", ProgressView(out, config["runner_config"]["log_interval"]))
        follower.start()
    started = time.monotonic()
    nodes = dict(port=port) if nnodes == 1 else dict(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                                                     master_port=port)
    # SIGTERM unwinds like Ctrl-C, so launch() still stops the whole job on the way out.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = launch(str(WORKER), worker_args, workers=ranks_here, log_dir=str(log_dir), timeout=timeout,
                        env=worker_env(), quiet=True, **nodes)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if follower is not None:
            follower.stop()
            follower.view.close()
    if not result.ok:
        raise TrainError(f"{where}{result.message}\n{_checkpoint_note(run_dir, args_text)}")
    if result.message:  # a rank that crashed in MindSpore's teardown after the work was done
        print(result.message, file=out, flush=True)
    print(f"{where}msrun job finished in {time.monotonic() - started:.0f} s", file=out, flush=True)
    return run_dir
