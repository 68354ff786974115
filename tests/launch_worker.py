"""An msrun rank for tests/test_launch.py and tests/test_multinode.py.

    launch_worker.py none|before_done|after_done   meet at a barrier; rank 1 may then die by SIGSEGV before or
                                                   after marking itself done (MindSpore's teardown crash)
    launch_worker.py nodes OUT                     report rank, world, node and cross-node collectives to OUT
    launch_worker.py nodes_forever OUT             the same, then all-reduce until killed (a node to kill)
    launch_worker.py unformed_once MARKER          the first worker to start while MARKER does not exist writes
                                                   MindSpore's "cluster never formed" error and exits before init()
                                                   (the start-up failure the launcher retries); then as `none`
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from mindspore import Tensor, ops
from mindspore.communication import create_group, get_group_size, get_rank, init

from mf_loss.launch import mark_rank_done


def report_nodes(out: Path) -> None:
    """What a rank sees of a job spread over nodes: its rank, the world, the node that started it (the test
    sets MF_LOSS_TEST_NODE per node) and collectives over the world and over a group spanning the nodes."""
    rank, world = get_rank(), get_group_size()
    slots = np.zeros(world, np.float32)
    slots[rank] = rank + 1  # an all-gather built from SUM: each rank fills its own slot
    gathered = ops.AllReduce()(Tensor(slots)).asnumpy()
    half = world // 2
    cross = [rank % half, rank % half + half]  # rank r and r + world/2: on different nodes when 2 nodes of half
    group = f"cross_{rank % half}"
    create_group(group, cross)
    cross_sum = ops.AllReduce(group=group)(Tensor(np.array([10.0 ** rank], np.float32))).asnumpy()
    (out / f"rank_{rank}.json").write_text(json.dumps(dict(
        rank=rank, world=world, node=int(os.environ["MF_LOSS_TEST_NODE"]), pid=os.getpid(),
        gathered=gathered.tolist(), cross_group=cross, cross_sum=float(cross_sum[0]))))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "unformed_once" and os.environ.get("MS_ROLE") == "MS_WORKER":  # msrun's scheduler runs us too
        try:
            os.close(os.open(sys.argv[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:  # the words of a rank that gave up in init(), as MindSpore 2.10 logs them
            print("RuntimeError: Failed to fetch the address of the rank MCCL_COLLECTIVE_RANK_MS_WORKER_1 for mccl "
                  "collective nodes", file=sys.stderr, flush=True)
            sys.exit(1)
    init()
    rank = get_rank()
    if mode.startswith("nodes"):
        out = Path(sys.argv[2])
        report_nodes(out)
        steps = 0
        while mode == "nodes_forever":
            ops.AllReduce()(Tensor(np.ones(1, np.float32))).asnumpy()
            steps += 1
            if steps == 20:
                (out / f"running_{rank}").write_text(str(os.getpid()))
            time.sleep(0.05)
        mark_rank_done(rank)
        sys.exit(0)
    ops.AllReduce()(Tensor(np.ones(1, np.float32))).asnumpy()
    if mode == "before_done" and rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    mark_rank_done(rank)
    if mode == "after_done" and rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    print(f"rank {rank}: finished", flush=True)
