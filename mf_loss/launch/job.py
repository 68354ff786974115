"""`launch()`: run a script on this node's msrun ranks, watch them, stop everything on failure or timeout.

What stops a job, on each node:
- a local rank exits with an error: msrun reports it at once (it would itself wait ~30-50 s more);
- (node 0) msrun's scheduler stops hearing from ranks of another node (~30 s after they died): those ranks
  are named;
- (other nodes) the local ranks lose the scheduler on node 0: MindSpore retries for ~20 s, then kills them;
  we stop the node `master_grace` s after the first lost heartbeat if that has not happened;
- `timeout` s pass.
Then every process of the job is stopped (psutil, whole tree), and the message names the node, the rank
and the tail of its log (of another node's rank when this machine can read that log).

A single-node job whose ranks never formed their cluster (a rank gave up inside
`mindspore.communication.init()`: seen once in about 20 CI runs here, one rank's registration with msrun's
scheduler timed out and the others could not fetch its address) is started once more, with a warning; the
script's own failures are never retried.
"""
import os
import sys
import tempfile
import time
import subprocess
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import psutil

from . import logs
from .layout import DEFAULT_CLUSTER_TIMEOUT, NodeLayout, free_port, is_local_address, msrun_command, resolve
from .processes import alive, descendants, stop, wait_for_listener

POLL_S = 0.25
RETRY_DIR = "retry"   # the logs of a job started once more because its cluster never formed
DONE_GRACE_S = 10.0   # after a signal at the job's end, how long the other ranks may take to mark themselves done
PEER_EVIDENCE_S = 3.0  # after a local rank fails on a multi-node job, how long to look for a remote cause first


@dataclass
class LaunchResult:
    returncode: int
    log_dir: Path
    failed_rank: Optional[int] = None
    message: str = ""
    failed_node: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class _Watch:
    """What the logs have shown so far."""
    exited_pid: Optional[int] = None
    exit_code: Optional[int] = None
    remote_ranks: tuple = ()                # ranks of other nodes the scheduler timed out (node 0)
    lost_scheduler_at: Optional[float] = None  # monotonic time of the first lost heartbeat (other nodes)
    lost_scheduler_line: str = ""
    gave_up_on_master: bool = False          # the ranks outlived master_grace after losing the scheduler

    @property
    def stopped(self) -> bool:
        return self.exited_pid is not None or bool(self.remote_ranks)


def launch(script, script_args: Sequence = (), *, workers: int, log_dir=None, timeout: float = 300.0,
           env: Optional[dict] = None, port: Optional[int] = None, quiet: bool = False, nnodes: int = 1,
           node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: Optional[int] = None,
           cluster_timeout: int = DEFAULT_CLUSTER_TIMEOUT, master_grace: float = 30.0) -> LaunchResult:
    """Run `python script *script_args` on `workers` ranks of this node under msrun; with `nnodes` > 1 every
    node runs the same call with its own `node_rank` (0 hosts msrun's scheduler on master_addr:master_port).

    `port` is the older name of `master_port` (a free one when neither is given on a single node). Returns the
    job's status; on failure or timeout the message names the failing node and rank and holds the tail of its
    log (also printed unless `quiet`). The whole job is stopped when `timeout` passes.
    """
    if port is not None and master_port is not None and port != master_port:
        raise ValueError(f"port={port} and master_port={master_port} differ; port is the older name of "
                         "master_port: give one")
    master_port = master_port if master_port is not None else port
    if master_port is None and nnodes > 1:
        raise ValueError(f"nnodes={nnodes} needs master_port: every node must name the same port of node 0's "
                         "scheduler")
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="mf_loss_msrun_"))

    def layout_on(port):
        return NodeLayout(workers=workers, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                          master_port=port if port is not None else free_port(), cluster_timeout=cluster_timeout)

    started = time.monotonic()
    result = _run(script, script_args, layout_on(master_port), log_dir, timeout, env, master_grace)
    reason = logs.cluster_never_formed(log_dir, range(workers)) if nnodes == 1 and not result.ok else None
    if reason is not None and time.monotonic() - started < timeout / 2:
        # MindSpore's start-up, not the script: once more, in a sub-directory of the logs, on a fresh port when
        # the caller named none (a node of a multi-node job cannot restart alone, so only nnodes == 1)
        retry = _run(script, script_args, layout_on(master_port), log_dir / RETRY_DIR,
                     timeout - (time.monotonic() - started), env, master_grace)
        notice = (f"warning: the ranks of {script} never formed their cluster on the first start (MindSpore's "
                  f"msrun start-up, before the script's own work: {reason}); started once more (the first "
                  f"start's logs: {log_dir})")
        result = LaunchResult(retry.returncode, retry.log_dir, retry.failed_rank,
                              notice + ("\n" + retry.message if retry.message else ""), retry.failed_node)
    return _report(result, quiet)


def _run(script, script_args: Sequence, layout: NodeLayout, log_dir: Path, timeout: float, env: Optional[dict],
         master_grace: float) -> LaunchResult:
    """One start of the job on this node: msrun, the watch over its logs, the stop; the result unreported."""
    node_rank, master_port, cluster_timeout = layout.node_rank, layout.master_port, layout.cluster_timeout
    master_ip = resolve(layout.master_addr)
    log_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    msrun = bin_dir / "msrun"
    if not msrun.exists():
        raise FileNotFoundError(f"msrun not found next to {sys.executable}; is mindspore installed in this env?")
    run_env = dict(os.environ if env is None else env)
    # msrun starts each worker with the first `python` on PATH: make it this interpreter's.
    run_env["PATH"] = str(bin_dir) + os.pathsep + run_env.get("PATH", "")
    run_env.setdefault("GLOG_v", "2")
    done_dir = log_dir / "done"
    shutil.rmtree(done_dir, ignore_errors=True)
    done_dir.mkdir()
    run_env[logs.DONE_DIR_ENV] = str(done_dir)
    deadline = time.monotonic() + timeout
    # Several nodes simulated on one machine: msrun starts a scheduler on every node whose master address is
    # local. Node 0's must own the port; the others' then fail to bind it, harmlessly (see _result).
    duplicate_scheduler = node_rank > 0 and is_local_address(master_ip)
    if duplicate_scheduler and not wait_for_listener(master_ip, master_port, min(cluster_timeout, timeout)):
        return LaunchResult(1, log_dir, failed_node=0, message=(
            f"msrun job {script}{layout.where} did not start: nothing listens on {master_ip}:{master_port} (node "
            f"0's scheduler) after {min(cluster_timeout, timeout):.0f} s; start node 0 first"))

    msrun_log = log_dir / "msrun.log"
    with open(msrun_log, "w") as out:
        proc = subprocess.Popen(msrun_command(msrun, layout, log_dir, script, script_args), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=run_env,
                                start_new_session=True)
    root = psutil.Process(proc.pid)
    known = descendants(root)
    watch = _Watch()
    followers = {"msrun": logs.Follower(msrun_log), "scheduler": logs.Follower(log_dir / "scheduler.log"),
                 **{r: logs.Follower(logs.worker_log(log_dir, r)) for r in layout.ranks}}
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            known |= descendants(root)
            _look(watch, followers, layout)
            if watch.stopped:
                _settle(watch, followers, layout, done_dir, proc)
                break
            if watch.lost_scheduler_at is not None and time.monotonic() > watch.lost_scheduler_at + master_grace:
                watch.gave_up_on_master = True
                break
            time.sleep(POLL_S)
        _look(watch, followers, layout)  # msrun may have exited just after writing its last line
        timed_out = proc.poll() is None and not watch.stopped and not watch.gave_up_on_master
    finally:
        # on success too: whatever of the job is still running (a worker in its own session) goes now
        stop([p for p in known | descendants(root) if alive(p)])
        proc.wait()
    return _result(script, layout, log_dir, done_dir, proc.returncode, watch, timed_out, timeout,
                   duplicate_scheduler)


def _look(watch: _Watch, followers: dict, layout: NodeLayout) -> None:
    """Read what the logs added since the last look."""
    match = logs.WORKER_EXIT.search(followers["msrun"].new_text())
    if match and watch.exited_pid is None:
        watch.exited_pid = int(match.group(1))
        watch.exit_code = int(match.group(2)) if match.group(2) else None
    remote = [r for r in logs.timed_out_ranks(followers["scheduler"].new_text()) if r not in layout.ranks]
    if remote and not watch.remote_ranks:
        watch.remote_ranks = tuple(remote)
    for rank in layout.ranks:
        line = logs.first_line_with(followers[rank].new_text(), logs.LOST_SCHEDULER)
        if line and watch.lost_scheduler_at is None and layout.node_rank > 0:
            watch.lost_scheduler_at, watch.lost_scheduler_line = time.monotonic(), line


def _settle(watch: _Watch, followers: dict, layout: NodeLayout, done_dir: Path, proc) -> None:
    """A rank stopped: give the facts that explain it a moment to reach the logs."""
    if watch.exit_code is not None and watch.exit_code < 0 and logs.ranks_done(done_dir) > 0:
        # killed by a signal at the job's end: the others may be a moment from marking done
        grace = time.monotonic() + DONE_GRACE_S
        while logs.ranks_done(done_dir) < layout.workers and time.monotonic() < grace and proc.poll() is None:
            time.sleep(0.1)
    if layout.nnodes > 1 and watch.exited_pid is not None:
        # a local rank failing in a collective may be the echo of another node's death, logged a moment later
        until = time.monotonic() + PEER_EVIDENCE_S
        while not watch.remote_ranks and time.monotonic() < until:
            time.sleep(POLL_S)
            _look(watch, followers, layout)


def _result(script, layout: NodeLayout, log_dir: Path, done_dir: Path, returncode: int, watch: _Watch,
            timed_out: bool, timeout: float, duplicate_scheduler: bool) -> LaunchResult:
    where = layout.where
    if duplicate_scheduler and watch.exited_pid is None and returncode != 0 and \
            logs.SCHEDULER_PORT_TAKEN.search(logs.read_text(log_dir / "scheduler.log")):
        returncode = 0  # only this node's redundant scheduler failed (it could not bind); node 0's ran the job
    if logs.ranks_done(done_dir) >= layout.workers and (watch.remote_ranks or watch.gave_up_on_master):
        # another node went first at the job's end (or crashed in its teardown): this node's work is complete
        gone = f"node {layout.node_of(watch.remote_ranks[0])}" if watch.remote_ranks else "node 0's scheduler"
        return LaunchResult(0, log_dir, message=(
            f"warning: {gone} stopped answering after every rank{where} of {script} had finished its work; the "
            "ranks were stopped and this node's results are complete"))
    if watch.remote_ranks:
        return _remote_failure(script, layout, log_dir, watch.remote_ranks)
    finished = watch.exit_code is not None and watch.exit_code < 0 and logs.ranks_done(done_dir) >= layout.workers
    if watch.gave_up_on_master or (watch.lost_scheduler_at is not None and watch.exited_pid is not None
                                   and not finished):
        return _lost_master(script, layout, log_dir, watch.lost_scheduler_line)
    if timed_out:
        tails = "\n".join(f"--- {layout.describe_rank(r)} ({logs.worker_log(log_dir, r)}) ---\n"
                          f"{logs.log_tail(logs.worker_log(log_dir, r), 15)}" for r in layout.ranks)
        return LaunchResult(124, log_dir, message=f"msrun job {script}{where} timed out after {timeout:.0f} s and "
                                                  f"was killed\n{tails}")
    if watch.exited_pid is None:
        if returncode == 0:
            return LaunchResult(0, log_dir)
        return LaunchResult(returncode, log_dir, message=f"msrun job {script}{where} failed (msrun exit code "
                                                         f"{returncode}); tail of {log_dir / 'msrun.log'}:\n"
                                                         f"{logs.log_tail(log_dir / 'msrun.log')}")
    rank = logs.rank_of_pid(log_dir, layout.ranks, watch.exited_pid)
    path = logs.worker_log(log_dir, rank) if rank is not None else log_dir / "msrun.log"
    node = layout.node_rank if rank is not None else None
    if finished:
        who = f"rank {rank}{where}" if rank is not None else "a rank"
        return LaunchResult(0, log_dir, failed_rank=rank, failed_node=node, message=(
            f"warning: {who} of {script} was killed by signal {-watch.exit_code} after every rank{where} had "
            f"finished its work (MindSpore's teardown at interpreter exit); the job's results are complete. "
            f"Log: {path}"))
    who = f"rank {rank}{where}" if rank is not None else f"an unknown rank{where}"
    if watch.exit_code is not None and watch.exit_code < 0:
        who += f" (killed by signal {-watch.exit_code})"
    text = logs.read_text(path)
    hint = ""
    if layout.nnodes > 1 and logs.CLUSTER_NOT_BUILT in text:
        hint = (f"\nThe {layout.world} ranks did not all register with the scheduler at {layout.master_addr}:"
                f"{layout.master_port} within {layout.cluster_timeout} s: start the same command on every node "
                f"(node ranks 0 to {layout.nnodes - 1}) with the same master address and port.")
    return LaunchResult(returncode if returncode > 0 else 1, log_dir, failed_rank=rank, failed_node=node,
                        message=f"msrun job {script} failed on {who}; tail of {path}:\n"
                                f"{logs.log_tail(path)}{hint}")


def _remote_failure(script, layout: NodeLayout, log_dir: Path, ranks) -> LaunchResult:
    rank = ranks[0]
    node = layout.node_of(rank)
    listed = ", ".join(layout.describe_rank(r) for r in ranks)
    message = (f"msrun job {script}{layout.where} stopped: {layout.describe_rank(rank)} stopped answering (msrun's "
               f"scheduler timed out {listed}): it died or node {node} is unreachable; this node's ranks were "
               f"stopped.")
    peer = logs.peer_log(log_dir, layout.node_rank, node, rank)
    if peer is not None:
        message += f"\nTail of {peer}:\n{logs.log_tail(peer)}"
    else:
        message += f" Its log is worker_{rank}.log in node {node}'s log directory."
    return LaunchResult(1, log_dir, failed_rank=rank, failed_node=node, message=message)


def _lost_master(script, layout: NodeLayout, log_dir: Path, line: str) -> LaunchResult:
    node0 = range(layout.workers)
    message = (f"msrun job {script}{layout.where} stopped: its ranks lost node 0 (msrun's scheduler at "
               f"{layout.master_addr}:{layout.master_port}): node 0's ranks {node0.start}-{node0.stop - 1} stopped "
               f"or node 0 is unreachable; this node's ranks were stopped.\n{line.strip()}")
    for rank in node0:  # node 0's failing rank, when this machine can read its log
        peer = logs.peer_log(log_dir, layout.node_rank, 0, rank)
        if peer is not None and logs.TRACEBACK in logs.read_text(peer):
            message += f"\nTail of {peer}:\n{logs.log_tail(peer)}"
            return LaunchResult(1, log_dir, failed_rank=rank, failed_node=0, message=message)
    return LaunchResult(1, log_dir, failed_node=0, message=message)


def _report(result: LaunchResult, quiet: bool) -> LaunchResult:
    if result.message and not quiet:
        print(result.message, file=sys.stderr)
    return result
