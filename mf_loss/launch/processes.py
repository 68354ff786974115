"""The processes of an msrun job, found and stopped with psutil. msrun puts every worker in a session of
its own (setsid), so killing msrun's process group alone would leave the workers running: we follow the
tree from msrun down and stop every process group in it."""
import os
import signal
import time
from typing import Iterable, Set

import psutil


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(root: psutil.Process) -> Set[psutil.Process]:
    """`root` and every process below it now (psutil.Process compares pid and start time: no pid reuse)."""
    try:
        return {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def stop(processes: Iterable[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM to every process and to its process group, then SIGKILL to whatever is left after `grace` s.
    Our own process group is never signalled."""
    processes = {p for p in processes if alive(p)}
    own_group = os.getpgrp()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = set()
        for process in processes:
            try:
                groups.add(os.getpgid(process.pid))
                process.send_signal(sig)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        for group in groups - {own_group}:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        _, processes = psutil.wait_procs(processes, timeout=grace)
        processes = {p for p in processes if alive(p)}
        if not processes:
            return


def listening(ip: str, port: int) -> bool:
    """Whether a process of this machine listens on ip:port (or on every address at that port)."""
    wildcard = {"0.0.0.0", "::", ip}
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.laddr.ip in wildcard
               for c in psutil.net_connections(kind="tcp"))


def wait_for_listener(ip: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if listening(ip, port):
            return True
        time.sleep(0.25)
    return listening(ip, port)

