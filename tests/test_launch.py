"""mf_loss.launch on one node: a rank killed by a signal after every rank marked itself done is a warning
(MindSpore's teardown crash), a crash before that fails the job naming the rank, a job past its timeout is
stopped whole (real 2-rank msrun jobs); the log reading and the process-tree stop (unit)."""
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

import background

from mf_loss.launch import launch, log_tail
from mf_loss.launch.logs import Follower, rank_of_pid, timed_out_ranks
from mf_loss.launch.processes import alive, descendants, stop

WORKER = Path(__file__).with_name("launch_worker.py")


def test_a_cluster_that_never_formed_is_told_from_the_scripts_failures(tmp_path):
    from mf_loss.launch.logs import cluster_never_formed
    (tmp_path / "done").mkdir()
    (tmp_path / "worker_0.log").write_text("[WARNING] chatter\nTraceback (most recent call last):\n"
                                           "ValueError: the script's own error\n")
    assert cluster_never_formed(tmp_path, range(2)) is None
    (tmp_path / "worker_1.log").write_text("[ERROR] DISTRIBUTED ... Failed to fetch the address of the rank "
                                           "MCCL_COLLECTIVE_RANK_MS_WORKER_3 for mccl collective nodes.\n")
    assert "MCCL_COLLECTIVE_RANK_MS_WORKER_3" in cluster_never_formed(tmp_path, range(2))
    (tmp_path / "done" / "rank_0").write_text("done\n")  # a rank that finished its work: the cluster had formed
    assert cluster_never_formed(tmp_path, range(2)) is None


class JobProcesses:
    """Every process started below this test process while a job runs (psutil), to check that none is left;
    with `tag`, only the processes of the job whose environment carries it (tests/background.py), as other
    jobs may run at the same time."""

    def __init__(self, tag=None):
        self.tag, self.before = tag, set(psutil.Process().children(recursive=True))
        self.seen, self.stopping = {}, threading.Event()  # process -> its command line, read while it runs
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        me = psutil.Process()
        while not self.stopping.is_set():
            for process in set(me.children(recursive=True)) - self.before - set(self.seen):
                if self.tag is None or background.carries_tag(process, self.tag):
                    self.seen[process] = " ".join(_cmdline(process))
            self.stopping.wait(0.2)

    def started(self, name: str) -> int:
        """How many of the processes seen ran `name`."""
        return sum(1 for command in self.seen.values() if name in command)

    def left_running(self) -> list:
        self.stopping.set()
        self.thread.join()
        return [f"{p.pid} {command}" for p, command in self.seen.items() if alive(p)]


def _cmdline(process):
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:
        return []


TIMEOUT_S = 60  # the timed-out job's: long enough for its ranks to start and log on a loaded machine
JOBS = {"after_done": ["after_done"], "before_done": ["before_done"], "unformed_once": ["unformed_once", "{out}/marker"],
        "timed_out": ["nodes_forever", "{out}"]}  # job -> launch_worker.py's arguments


@background.starts_with_session("jobs")
def launch_jobs(tmp_path_factory):
    """The 2-rank msrun jobs of the tests below, all at once (each waits on its cluster and its ranks'
    start-up more than it computes): job -> (its directory, LaunchResult), and the processes left running
    after all of them ended."""
    processes = JobProcesses(tag="launch")

    def run(job):
        name, args = job
        out = tmp_path_factory.mktemp(name)
        return out, launch(WORKER, [a.format(out=out) for a in args], workers=2, log_dir=out / "logs",
                           timeout=TIMEOUT_S if name == "timed_out" else 300, quiet=True,
                           env=background.tagged_env("launch", MF_LOSS_TEST_NODE="0"))

    with ThreadPoolExecutor(len(JOBS)) as pool:
        results = dict(zip(JOBS, pool.map(run, JOBS.items())))
    return results, processes.left_running(), processes


@pytest.fixture(scope="module")
def jobs():
    return background.result(launch_jobs)


@pytest.mark.distributed
def test_signal_after_every_rank_is_done_is_a_warning(jobs):
    out, result = jobs[0]["after_done"]
    assert result.ok, result.message
    assert result.failed_rank == 1
    assert result.message.startswith(f"warning: rank 1 of {WORKER} was killed by signal 11 after every rank had "
                                     "finished its work"), result.message
    assert sorted(p.name for p in (out / "logs" / "done").iterdir()) == ["rank_0", "rank_1"]


@pytest.mark.distributed
def test_signal_before_the_rank_is_done_fails_the_job(jobs):
    _, result = jobs[0]["before_done"]
    assert not result.ok
    assert result.failed_rank == 1
    assert result.message.startswith(f"msrun job {WORKER} failed on rank 1 (killed by signal 11)"), result.message


@pytest.mark.distributed
def test_a_cluster_that_never_formed_is_started_once_more(jobs):
    out, result = jobs[0]["unformed_once"]
    assert result.ok, result.message
    assert result.message.startswith(f"warning: the ranks of {WORKER} never formed their cluster on the first "
                                     "start"), result.message
    assert "Failed to fetch the address of the rank" in result.message
    assert result.log_dir == out / "logs" / "retry"
    assert sorted(p.name for p in (out / "logs" / "retry" / "done").iterdir()) == ["rank_0", "rank_1"]
    assert not any((out / "logs" / "done").iterdir())  # the first start did no work


@pytest.mark.distributed
def test_a_job_past_its_timeout_is_stopped_whole(jobs):
    """msrun runs its workers in sessions of their own: stopping msrun's process group alone would leave them."""
    (out, timed_out), left_running, processes = jobs[0]["timed_out"], jobs[1], jobs[2]
    assert timed_out.returncode == 124, timed_out.message
    assert timed_out.message.startswith(f"msrun job {WORKER} timed out after {TIMEOUT_S} s and was killed"), \
        timed_out.message
    assert "--- rank 0 (" in timed_out.message and "--- rank 1 (" in timed_out.message
    assert left_running == []  # of every job above
    assert processes.started(f"{WORKER} nodes_forever {out}") >= 2  # its workers did run (msrun's scheduler too)


@pytest.mark.unit
def test_follower_returns_only_complete_new_lines(tmp_path):
    path = tmp_path / "log"
    follower = Follower(path)
    assert follower.new_text() == ""                     # not there yet
    path.write_text("one\ntw")
    assert follower.new_text() == "one\n"
    with open(path, "a") as f:
        f.write("o\nthree\n")
    assert follower.new_text() == "two\nthree\n"
    assert follower.new_text() == ""


@pytest.mark.unit
def test_the_schedulers_timed_out_ranks_are_read_from_its_log():
    # lines as MindSpore 2.10's scheduler writes them (from a run where ranks 2 and 3 were killed)
    text = ("[ERROR] DISTRIBUTED(6668,7f0698e9e6c0,python):2026-11-30-01:43:44.445.853 [mindspore/ccsrc/cluster/"
            "topology/meta_server_node.cc:548] UpdateTopoState] The node: 3 is timed out. It may exit with exception,"
            " please check this node's log.\n"
            "[ERROR] DISTRIBUTED(6668,7f0698e9e6c0,python):2026-11-30-01:43:44.445.888 [mindspore/ccsrc/cluster/"
            "topology/meta_server_node.cc:548] UpdateTopoState] The node: 2 is timed out. It may exit with exception,"
            " please check this node's log.\n")
    assert timed_out_ranks(text) == [2, 3]
    assert timed_out_ranks("Cluster currently has 4 alive nodes.") == []


@pytest.mark.unit
def test_the_failed_rank_is_the_one_whose_log_shows_the_pid(tmp_path):
    (tmp_path / "worker_2.log").write_text("[WARNING] DISTRIBUTED(4242,7f,python): ...\n")
    (tmp_path / "worker_3.log").write_text("[WARNING] DISTRIBUTED(4343,7f,python): ...\nTraceback (most recent "
                                           "call last):\nRuntimeError: boom\n")
    assert rank_of_pid(tmp_path, range(2, 4), 4242) == 2
    assert rank_of_pid(tmp_path, range(2, 4), 9999) == 3   # unknown pid: the rank with a traceback
    assert log_tail(tmp_path / "worker_3.log") == "Traceback (most recent call last):\nRuntimeError: boom"
    assert log_tail(tmp_path / "worker_2.log") == "[WARNING] DISTRIBUTED(4242,7f,python): ..."  # only chatter
    assert log_tail(tmp_path / "worker_9.log") == f"(no log at {tmp_path / 'worker_9.log'})"


@pytest.mark.unit
def test_stop_ends_a_tree_whose_child_has_a_session_of_its_own():
    """As msrun's workers: the child runs setsid, so killing the parent's process group would miss it."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "start_new_session=True); time.sleep(120)")], start_new_session=True)
    root = psutil.Process(parent.pid)
    deadline = time.monotonic() + 30
    while len(descendants(root)) < 2:
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    tree = descendants(root)
    child = next(p for p in tree if p.pid != parent.pid)
    assert os.getsid(child.pid) != os.getsid(parent.pid)
    stop(tree, grace=5)
    parent.wait(timeout=10)
    assert not alive(child) and not alive(root)
