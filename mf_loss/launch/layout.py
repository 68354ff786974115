"""Where this node's ranks sit in the job and the msrun command line that starts them (pure: no process,
no network), so that every node of a multi-node job is checked and built the same way."""
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import psutil

DEFAULT_CLUSTER_TIMEOUT = 300  # s msrun's ranks wait for the others to register (its own default is 600)


@dataclass(frozen=True)
class NodeLayout:
    """`workers` ranks on each of `nnodes` nodes; this node is `node_rank` and holds the global ranks
    [node_rank * workers, (node_rank + 1) * workers) (msrun numbers them so). Node 0 hosts msrun's
    scheduler on master_addr:master_port."""
    workers: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    cluster_timeout: int = DEFAULT_CLUSTER_TIMEOUT

    def __post_init__(self):
        for name in ("workers", "nnodes", "node_rank", "master_port", "cluster_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.workers < 1:
            raise ValueError(f"workers (ranks on this node) must be >= 1, got {self.workers}")
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be in [0, nnodes={self.nnodes})")
        if not 1024 <= self.master_port <= 65535:
            raise ValueError(f"master_port {self.master_port} must be a TCP port in [1024, 65535] (msrun's range)")
        if not self.master_addr or any(c.isspace() for c in self.master_addr):
            raise ValueError(f"master_addr must be a host name or IP address, got {self.master_addr!r}")
        if self.cluster_timeout < 1:
            raise ValueError(f"cluster_timeout must be >= 1 s, got {self.cluster_timeout}")

    @property
    def world(self) -> int:
        return self.workers * self.nnodes

    @property
    def ranks(self) -> range:
        """The global ranks on this node."""
        return range(self.node_rank * self.workers, (self.node_rank + 1) * self.workers)

    def node_of(self, rank: int) -> int:
        return rank // self.workers

    def describe_rank(self, rank: int) -> str:
        return f"rank {rank}" if self.nnodes == 1 else f"rank {rank} on node {self.node_of(rank)}"

    @property
    def where(self) -> str:
        """This node, as messages name it ('' on a single node)."""
        return "" if self.nnodes == 1 else f" on node {self.node_rank} of {self.nnodes}"


def msrun_command(msrun: Path, layout: NodeLayout, log_dir: Path, script, script_args: Sequence = ()) -> List[str]:
    """The msrun command line for this node: the same on every node but for --node_rank."""
    return [str(msrun), f"--worker_num={layout.world}", f"--local_worker_num={layout.workers}",
            f"--master_addr={layout.master_addr}", f"--master_port={layout.master_port}",
            f"--node_rank={layout.node_rank}", f"--cluster_time_out={layout.cluster_timeout}",
            f"--log_dir={log_dir}", "--join=True", str(script), *map(str, script_args)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve(master_addr: str) -> str:
    """master_addr as an IP address; a name that does not resolve is the user's error, said plainly."""
    try:
        return socket.getaddrinfo(master_addr, None, socket.AF_UNSPEC, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"master_addr {master_addr!r} does not resolve to an address ({error}); give node 0's IP "
                         "address or a host name every node can resolve") from None


def is_local_address(ip: str) -> bool:
    """Whether `ip` is one of this machine's addresses (loopback included). msrun starts its scheduler on
    every node for which this holds, so several nodes simulated on one machine all try to."""
    address = ipaddress.ip_address(ip.split("%")[0])
    if address.is_loopback:
        return True
    return any(ipaddress.ip_address(entry.address.split("%")[0]) == address
               for entries in psutil.net_if_addrs().values() for entry in entries
               if entry.family in (socket.AF_INET, socket.AF_INET6))
