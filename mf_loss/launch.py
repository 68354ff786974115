"""Start a script on N local ranks with MindSpore's `msrun`, bounded in time, and report failures well.

msrun itself waits ~30 s for a crashed worker's heartbeat to time out before it gives up; we watch its
output for the worker exit it reports first and stop the whole job then. Every process of the job lives
in one process group that is killed on failure or timeout, so nothing is left behind.

Workers may call `mark_rank_done(rank)` as their last act. MindSpore 2.10 on CPU sometimes kills a rank
with a segmentation fault in its own teardown at interpreter exit, after all the work is done (seen in
3 of 23 four-rank training runs here; no Python frame on the stack, and releasing the collectives
first does not avoid it). A rank killed by a signal once EVERY rank has marked itself done therefore
does not fail the job: the launcher reports it as a warning naming the rank, the signal and the log.
A crash before that, or any non-signal failure, fails the job as before.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

_WORKER_EXIT = re.compile(r"Worker process (\d+) exit with exception(?:\. Error code: (-?\d+))?")
DONE_DIR_ENV = "MF_LOSS_DONE_DIR"
_TRACEBACK = "Traceback (most recent call last)"


@dataclass
class LaunchResult:
    returncode: int
    log_dir: Path
    failed_rank: Optional[int] = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def mark_rank_done(rank: int) -> None:
    """Record that this rank finished its work (call it last, after the outputs are written)."""
    directory = os.environ.get(DONE_DIR_ENV)
    if directory:
        Path(directory, f"rank_{rank}").write_text("done\n")


def _ranks_done(done_dir: Path) -> int:
    return sum(1 for _ in done_dir.glob("rank_*"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    # MindSpore's INFO/WARNING chatter buries the Python traceback; keep the lines that say something.
    useful = [line for line in text if not line.startswith(("[INFO]", "[WARNING]"))]
    return "\n".join(useful[-lines:])


def worker_log(log_dir: Path, rank: int) -> Path:
    return Path(log_dir) / f"worker_{rank}.log"


def _failed_rank(log_dir: Path, workers: int, pid: Optional[int]) -> Optional[int]:
    """The rank that failed: the one whose log shows the exited pid, else the first with a traceback."""
    for rank in range(workers):
        text = worker_log(log_dir, rank).read_text(errors="replace") if worker_log(log_dir, rank).exists() else ""
        if pid is not None and f"({pid}," in text:
            return rank
    for rank in range(workers):
        path = worker_log(log_dir, rank)
        if path.exists() and _TRACEBACK in path.read_text(errors="replace"):
            return rank
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        if not _group_alive(pgid):
            break
    proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command name: state, ppid, pgrp, ...; zombies are gone already
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def launch(script: str, script_args: Sequence[str] = (), *, workers: int, log_dir: Optional[str] = None,
           timeout: float = 300.0, env: Optional[dict] = None, port: Optional[int] = None,
           quiet: bool = False) -> LaunchResult:
    """Run `python script *script_args` on `workers` local ranks under msrun.

    Returns the job's status; on failure or timeout the message names the failing rank and holds the
    tail of its log (also printed unless `quiet`). The job is killed, whole, when `timeout` passes.
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="mf_loss_msrun_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    msrun = Path(bin_dir) / "msrun"
    if not msrun.exists():
        raise FileNotFoundError(f"msrun not found next to {sys.executable}; is mindspore installed in this env?")
    port = port or free_port()
    run_env = dict(os.environ if env is None else env)
    # msrun starts each worker with the first `python` on PATH: make it this interpreter's.
    run_env["PATH"] = bin_dir + os.pathsep + run_env.get("PATH", "")
    run_env.setdefault("GLOG_v", "2")
    done_dir = log_dir / "done"
    shutil.rmtree(done_dir, ignore_errors=True)
    done_dir.mkdir()
    run_env[DONE_DIR_ENV] = str(done_dir)
    command = [str(msrun), f"--worker_num={workers}", f"--local_worker_num={workers}",
               f"--master_port={port}", f"--log_dir={log_dir}", "--join=True", str(script), *map(str, script_args)]
    msrun_log = log_dir / "msrun.log"
    with open(msrun_log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=run_env, start_new_session=True)
        deadline = time.monotonic() + timeout
        exited_pid = exit_code = None
        try:
            while proc.poll() is None:
                match = _WORKER_EXIT.search(msrun_log.read_text(errors="replace"))
                if match:
                    exited_pid = int(match.group(1))
                    exit_code = int(match.group(2)) if match.group(2) else None
                    if exit_code is not None and exit_code < 0 and _ranks_done(done_dir) > 0:
                        # killed by a signal at the job's end: the others may be a moment from marking done
                        grace = time.monotonic() + 10.0
                        while _ranks_done(done_dir) < workers and time.monotonic() < grace and proc.poll() is None:
                            time.sleep(0.1)
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        finally:
            timed_out = proc.poll() is None and exited_pid is None
            if proc.poll() is None:
                _kill_group(proc)
    if proc.returncode == 0 and exited_pid is None:
        return LaunchResult(0, log_dir)
    if timed_out:
        result = LaunchResult(124, log_dir, message=f"msrun job {script} on {workers} ranks timed out after "
                                                     f"{timeout:.0f} s and was killed")
        tails = "\n".join(f"--- rank {r} ({worker_log(log_dir, r)}) ---\n{log_tail(worker_log(log_dir, r), 15)}"
                          for r in range(workers))
        result.message += "\n" + tails
    else:
        rank = _failed_rank(log_dir, workers, exited_pid)
        path = worker_log(log_dir, rank) if rank is not None else msrun_log
        if exit_code is not None and exit_code < 0 and _ranks_done(done_dir) >= workers:
            where = f"rank {rank}" if rank is not None else "a rank"
            result = LaunchResult(0, log_dir, failed_rank=rank, message=(
                f"warning: {where} of {script} was killed by signal {-exit_code} after every rank had finished "
                f"its work (MindSpore's teardown at interpreter exit); the job's results are complete. Log: {path}"))
        else:
            where = f"rank {rank}" if rank is not None else "an unknown rank"
            result = LaunchResult(proc.returncode if proc.returncode > 0 else 1, log_dir, failed_rank=rank,
                                  message=f"msrun job {script} failed on {where}; tail of {path}:\n{log_tail(path)}")
    if not quiet:
        print(result.message, file=sys.stderr)
    return result
