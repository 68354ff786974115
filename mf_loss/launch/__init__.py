"""Start a script on msrun ranks, on one node or several, bounded in time, and report failures well.

    from mf_loss.launch import launch, mark_rank_done
    launch("train.py", ["--lr", 1e-3], workers=2, nnodes=2, node_rank=K, master_addr="10.0.0.1",
           master_port=29500, log_dir="logs", timeout=900)      # the same call on every node, its own K

- layout.py: this node's place in the job and the msrun command line (pure);
- job.py: `launch()`, the watch over the logs and what stops a job (see there);
- processes.py: the job's process tree (psutil) and its stopping; logs.py: reading the logs as they grow.

Workers may call `mark_rank_done(rank)` as their last act. MindSpore 2.10 on CPU sometimes kills a rank
with a segmentation fault in its own teardown at interpreter exit, after all the work is done (seen in
3 of 23 four-rank training runs here; no Python frame on the stack, and releasing the collectives
first does not avoid it). A rank killed by a signal once EVERY rank of its node has marked itself done
therefore does not fail the job: the launcher reports it as a warning naming the rank, the signal and the
log. A crash before that, or any non-signal failure, fails the job.
"""
from .job import LaunchResult, launch
from .layout import NodeLayout, free_port, msrun_command
from .logs import DONE_DIR_ENV, log_tail, mark_rank_done, worker_log

__all__ = ["launch", "LaunchResult", "mark_rank_done", "NodeLayout", "msrun_command", "free_port", "log_tail",
           "worker_log", "DONE_DIR_ENV"]
