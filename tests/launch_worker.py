"""An msrun rank for tests/test_launch.py: meets the others at a barrier, then rank 1 may die by SIGSEGV
before or after marking itself done (how MindSpore's teardown crash looks to the launcher)."""
import os
import signal
import sys

import numpy as np

from mindspore import Tensor, ops
from mindspore.communication import get_rank, init

from mf_loss.launch import mark_rank_done

if __name__ == "__main__":
    crash = sys.argv[1]  # "none", "before_done" or "after_done"
    init()
    rank = get_rank()
    ops.AllReduce()(Tensor(np.ones(1, np.float32))).asnumpy()
    if crash == "before_done" and rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    mark_rank_done(rank)
    if crash == "after_done" and rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    print(f"rank {rank}: finished", flush=True)
