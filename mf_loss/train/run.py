"""The parent side of `mf-loss train`: check the request, start the ranks, show their progress.

One rank (data_parallel = model_parallel = 1) trains in this process. More ranks are started with msrun
(`mf_loss.launch.launch`, which stops the whole job when a rank fails or time runs out); rank 0 writes its
progress to <run dir>/progress.log, which this process follows and prints.
"""
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ..config_loader import Config, ConfigError, check_trainable, load_config

RANKS_PER_CORE = 4            # CPU ranks mostly wait on each other; beyond this a step crawls
RANK_MEMORY_GIB = 1.0         # measured peak ~0.85 GiB resident per training rank (MindSpore + graph)
WORKER = Path(__file__).resolve().parent / "worker.py"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


class TrainError(RuntimeError):
    """A request that cannot run, or a run that failed; the message says why and what to do."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def available_memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def check_capacity(config: Config) -> None:
    """Refuse layouts this machine cannot run: more than RANKS_PER_CORE ranks per core, or more ranks
    than the available memory holds."""
    world = config.world_size
    cores = usable_cores()
    limit, reason = RANKS_PER_CORE * cores, f"{RANKS_PER_CORE} per CPU core on {cores} core(s)"
    memory = available_memory_gib()
    if memory is not None and int(memory / RANK_MEMORY_GIB) < limit:
        limit = max(1, int(memory / RANK_MEMORY_GIB))
        reason = f"about {RANK_MEMORY_GIB:g} GiB per rank in {memory:.1f} GiB of available memory"
    if world > limit:
        p = config.parallel
        raise TrainError(f"{config.source}: parallel_config asks for data_parallel x model_parallel = "
                         f"{p['data_parallel']} x {p['model_parallel']} = {world} ranks, more than this machine can "
                         f"run: at most {limit} ({reason}). Lower data_parallel or model_parallel.")


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
    """Prints the lines appended to a file until stopped."""

    def __init__(self, path: Path, out=sys.stdout):
        super().__init__(daemon=True)
        self.path, self.out = path, out
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
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[:text.rfind("\n") + 1]
        if complete:
            self.out.write(complete)
            self.out.flush()
            self.offset += len(complete.encode())

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


def _fresh_run_dir(run_dir: Path) -> None:
    """A new (not resumed) run starts from an empty run directory."""
    if run_dir.exists():
        for name in ("loss.csv", "loss.png", "progress.log", "summary.json", "summary.txt"):
            (run_dir / name).unlink(missing_ok=True)
        for name in ("checkpoints", "logs"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _checkpoint_note(run_dir: Path, args_text: str) -> str:
    from .trainer import checkpoint_dir, read_latest
    latest = read_latest(checkpoint_dir(run_dir))
    if latest is None:
        return "No checkpoint was written before the failure."
    return (f"The last complete checkpoint is step {latest['step']} in {checkpoint_dir(run_dir) / latest['dir']}; "
            f"continue with: mf-loss train {args_text} --resume")


def train_command(config_path: str, overrides=(), *, resume: bool = False, output_dir: Optional[str] = None,
                  port: Optional[int] = None, timeout: float = 900.0, out=sys.stdout) -> Path:
    """Validate, then train on the configured ranks; returns the run directory. Raises ConfigError or
    TrainError with a message for the user."""
    config = load_config(config_path, overrides)
    check_trainable(config)
    check_capacity(config)
    if port is not None:
        check_port(port)
    run_dir = run_dir_for(config, output_dir)
    resume = resume or config["resume_training"]
    if resume:
        from .trainer import resume_source
        resume_source(config, run_dir)  # fails here, before any rank starts, when there is nothing to resume
    else:
        _fresh_run_dir(run_dir)
    args_text = f"--config {config_path}" + "".join(f" --set {o}" for o in overrides)
    if output_dir:
        args_text += f" --output-dir {output_dir}"
    world = config.world_size
    if world == 1:
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
    worker_args = ["train", "--config", str(Path(config_path).resolve()), "--run-dir", str(run_dir)]
    for override in overrides:
        worker_args += ["--set", override]
    if resume:
        worker_args.append("--resume")
    env = worker_env()
    print(f"starting {world} ranks with msrun (start-up takes ~30 s); logs in {run_dir / 'logs'}", file=out,
          flush=True)
    follower = _Follower(run_dir / "progress.log", out)
    follower.start()
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so launch() still stops the whole job on the way out.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = launch(str(WORKER), worker_args, workers=world, log_dir=str(run_dir / "logs"), timeout=timeout,
                        env=env, port=port, quiet=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        follower.stop()
    if not result.ok:
        raise TrainError(f"{result.message}\n{_checkpoint_note(run_dir, args_text)}")
    if result.message:  # a rank that crashed in MindSpore's teardown after the work was done
        print(result.message, file=out, flush=True)
    print(f"msrun job finished in {time.monotonic() - started:.0f} s", file=out, flush=True)
    return run_dir
