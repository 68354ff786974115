"""Reading an msrun job's logs as they grow: which local worker exited, which remote ranks the scheduler
gave up on, whether a worker lost the scheduler, the done markers, and readable log tails."""
import os
import re
from pathlib import Path
from typing import List, Optional

DONE_DIR_ENV = "MF_LOSS_DONE_DIR"
TRACEBACK = "Traceback (most recent call last)"
# msrun, when one of its workers exits with a non-zero code
WORKER_EXIT = re.compile(r"Worker process (\d+) exit with exception(?:\. Error code: (-?\d+))?")
# node 0's scheduler, when a rank stops sending heartbeats (~30 s after it died)
RANK_TIMED_OUT = re.compile(r"The node: (\d+) is timed out")
# a worker whose scheduler (on node 0) is gone; MindSpore retries for ~20 s, then kills the worker
LOST_SCHEDULER = "Failed to send heartbeat message to meta server"
# a worker or scheduler that gave up waiting for the others to register
CLUSTER_NOT_BUILT = "Failed to initialize distributed job cluster"
SCHEDULER_PORT_TAKEN = re.compile(r"Failed to call bind, url: \S+ Address already in use")
# a rank that gave up in mindspore.communication.init() because another rank never registered its address
# (MindSpore retries 19 x 3 s): the job's ranks never formed their cluster
ADDRESS_NOT_FETCHED = "Failed to fetch the address of the rank"


def mark_rank_done(rank: int) -> None:
    """Record that this rank finished its work (call it last, after the outputs are written)."""
    directory = os.environ.get(DONE_DIR_ENV)
    if directory:
        Path(directory, f"rank_{rank}").write_text("done\n")


def ranks_done(done_dir: Path) -> int:
    return sum(1 for _ in Path(done_dir).glob("rank_*"))


def worker_log(log_dir: Path, rank: int) -> Path:
    """msrun's log of a global rank (msrun names them so on every node)."""
    return Path(log_dir) / f"worker_{rank}.log"


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = 40) -> str:
    text = read_text(path)
    if not text and not Path(path).exists():
        return f"(no log at {path})"
    # MindSpore's INFO/WARNING chatter buries the Python traceback; keep the lines that say something.
    useful = [line for line in text.splitlines() if line.strip() and not line.startswith(("[INFO]", "[WARNING]"))]
    if not useful:  # nothing but chatter (a rank killed by a signal): its last words, whatever they are
        return "\n".join(text.splitlines()[-min(lines, 10):])
    return "\n".join(useful[-lines:])


class Follower:
    """The text appended to a file since the last call (the file may not exist yet)."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0

    def new_text(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return ""
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written is read next time
        self.offset += len(complete)
        return complete.decode(errors="replace")


def rank_of_pid(log_dir: Path, ranks, pid: Optional[int]) -> Optional[int]:
    """The rank whose log shows the pid msrun reported (MindSpore prefixes its lines with '(pid,'), else
    the first one with a Python traceback."""
    texts = {rank: read_text(worker_log(log_dir, rank)) for rank in ranks}
    if pid is not None:
        for rank, text in texts.items():
            if f"({pid}," in text:
                return rank
    for rank, text in texts.items():
        if TRACEBACK in text:
            return rank
    return None


def peer_log(log_dir: Path, node_rank: int, peer_node: int, rank: int) -> Optional[Path]:
    """Another node's log of `rank`, when this machine can read it: in the same log directory (a shared
    disk), or in the sibling `node_<k>` directory when this node's is named `node_<node_rank>` (the layout
    `mf-loss train` uses)."""
    log_dir = Path(log_dir)
    candidates = [worker_log(log_dir, rank)]
    if log_dir.name == f"node_{node_rank}":
        candidates.append(worker_log(log_dir.parent / f"node_{peer_node}", rank))
    return next((path for path in candidates if path.exists()), None)


def first_line_with(text: str, needle: str) -> Optional[str]:
    return next((line for line in text.splitlines() if needle in line), None)


def cluster_never_formed(log_dir: Path, ranks) -> Optional[str]:
    """The line of a worker log that shows the job's ranks never formed their cluster (before any rank marked
    itself done), or None."""
    if ranks_done(Path(log_dir) / "done") > 0:
        return None
    for rank in ranks:
        text = read_text(worker_log(log_dir, rank))
        for needle in (ADDRESS_NOT_FETCHED, CLUSTER_NOT_BUILT):
            line = first_line_with(text, needle)
            if line is not None:
                return line.strip()
    return None


def timed_out_ranks(scheduler_text: str) -> List[int]:
    return sorted({int(m.group(1)) for m in RANK_TIMED_OUT.finditer(scheduler_text)})
