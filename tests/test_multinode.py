"""Several msrun nodes: two nodes simulated on this machine (two msrun processes, node ranks 0 and
1 on 127.0.0.1, 2 ranks each) make one world; a node whose ranks are killed stops the other, naming the node
and rank, and leaves no process. (`mf-loss train` on two nodes is tests/test_reproducible.py's: the same bits
as on one node.) Unit tests check the arguments and the msrun command line of each node without starting
anything."""
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from mf_loss import cli
from mf_loss.launch import NodeLayout, free_port, launch, msrun_command
import background
from test_launch import JobProcesses, _cmdline

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("launch_worker.py")
CONFIG = ROOT / "configs" / "dp2_mp2.yaml"


# ----------------------------------------------------------------------------------------------- unit

@pytest.mark.unit
def test_each_node_holds_its_block_of_global_ranks():
    nodes = [NodeLayout(workers=2, nnodes=2, node_rank=k, master_port=29500) for k in (0, 1)]
    assert [list(n.ranks) for n in nodes] == [[0, 1], [2, 3]]
    assert [n.world for n in nodes] == [4, 4]
    assert [nodes[0].node_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert nodes[1].describe_rank(2) == "rank 2 on node 1"
    assert NodeLayout(workers=4, master_port=29500).describe_rank(3) == "rank 3"


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, message", [
    (dict(workers=2, nnodes=2, node_rank=2), r"node_rank 2 must be in \[0, nnodes=2\)"),
    (dict(workers=2, nnodes=2, node_rank=-1), r"node_rank -1 must be in \[0, nnodes=2\)"),
    (dict(workers=2, nnodes=0), r"nnodes must be >= 1, got 0"),
    (dict(workers=0), r"workers \(ranks on this node\) must be >= 1, got 0"),
    (dict(workers=2, master_port=80), r"master_port 80 must be a TCP port in \[1024, 65535\]"),
    (dict(workers=2, master_addr="node 0"), r"master_addr must be a host name or IP address, got 'node 0'"),
    (dict(workers=2, cluster_timeout=0), r"cluster_timeout must be >= 1 s, got 0"),
])
def test_node_layout_refuses_bad_arguments_by_name(kwargs, message):
    kwargs.setdefault("master_port", 29500)
    with pytest.raises(ValueError, match=message):
        NodeLayout(**kwargs)


@pytest.mark.unit
def test_node_layout_refuses_a_non_integer_rank():
    with pytest.raises(TypeError, match=r"node_rank must be an int, got '1' \(str\)"):
        NodeLayout(workers=2, nnodes=2, node_rank="1", master_port=29500)


@pytest.mark.unit
def test_msrun_reads_each_nodes_command_line_as_that_node(monkeypatch, tmp_path):
    """The command lines of the two nodes differ only in --node_rank, and msrun's own parser reads them as
    4 ranks in all, 2 here, node 0's scheduler at 10.0.0.1:29500."""
    from mindspore.parallel.cluster.run import get_args

    msrun = Path(sys.executable).parent / "msrun"
    lines = [msrun_command(msrun, NodeLayout(workers=2, nnodes=2, node_rank=k, master_addr="10.0.0.1",
                                             master_port=29500, cluster_timeout=120), tmp_path, WORKER, ["x", 1])
             for k in (0, 1)]
    assert [a for a, b in zip(*lines) if a != b] == ["--node_rank=0"]
    for k, line in enumerate(lines):
        monkeypatch.setattr(sys, "argv", line)
        args = get_args()
        assert (args.worker_num, args.local_worker_num, args.node_rank) == (4, 2, k)
        assert (args.master_addr, args.master_port, args.cluster_time_out) == ("10.0.0.1", 29500, 120)
        assert (args.join, args.log_dir, args.task_script, args.task_script_args) == (True, str(tmp_path),
                                                                                     str(WORKER), ["x", "1"])


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, message", [
    (dict(nnodes=2, node_rank=1), r"nnodes=2 needs master_port"),
    (dict(port=29500, master_port=29501), r"port=29500 and master_port=29501 differ"),
    (dict(nnodes=2, node_rank=2, master_port=29500), r"node_rank 2 must be in \[0, nnodes=2\)"),
    (dict(nnodes=2, node_rank=1, master_port=29500, master_addr="no-such-host.invalid"),
     r"master_addr 'no-such-host.invalid' does not resolve"),
])
def test_launch_refuses_bad_node_arguments_before_starting_anything(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        launch(WORKER, ["none"], workers=2, log_dir=tmp_path, timeout=10, **kwargs)
    # (the jobs started with the session have processes of their own: only this launch's would name tmp_path)
    assert [p for p in psutil.Process().children(recursive=True) if str(tmp_path) in " ".join(_cmdline(p))] == []
    assert not (tmp_path / "msrun.log").exists()


@pytest.mark.unit
def test_which_master_addresses_are_this_machines():
    """msrun starts a scheduler on every node whose master address is local: the simulated nodes here."""
    from mf_loss.launch.layout import is_local_address, resolve
    assert is_local_address("127.0.0.1") and is_local_address("127.0.0.2") and is_local_address("::1")
    assert not is_local_address("192.0.2.1")  # TEST-NET-1, never assigned to a machine
    assert resolve("127.0.0.1") == "127.0.0.1"


def _cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.unit
@pytest.mark.parametrize("flags, code, message", [
    (["--nnodes", "2", "--node-rank", "2", "--master-port", "29500"], 1, "--node-rank 2 must be in [0, --nnodes 2)"),
    (["--nnodes", "3", "--master-port", "29500"], 1, "do not split evenly over --nnodes 3"),
    (["--nnodes", "4", "--master-port", "29500"], 1, "cannot hold whole model-parallel groups of 2"),
    (["--nnodes", "2"], 1, "--nnodes > 1 needs --master-port"),
    (["--nnodes", "2", "--port", "29500"], 2, "--port is the one-node flag; with --nnodes 2 give --master-port"),
    (["--port", "29500", "--master-port", "29501"], 2, "--port 29500 and --master-port 29501 differ"),
    (["--nnodes", "2", "--master-port", "80"], 2, "--master-port 80 must be a TCP port in [1024, 65535]"),
])
def test_train_refuses_bad_node_flags_naming_the_flag(capsys, flags, code, message):
    got_code, err = _cli(["train", "--config", str(CONFIG), "--set", "loss.type=CrossEntropyLoss", *flags], capsys)
    assert got_code == code and message in err, err


@pytest.mark.unit
@pytest.mark.parametrize("flags, expected", [
    ([], dict(port=None, nnodes=1, node_rank=0, master_addr="127.0.0.1")),
    (["--port", "29500"], dict(port=29500, nnodes=1, node_rank=0, master_addr="127.0.0.1")),
    (["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500"],
     dict(port=29500, nnodes=2, node_rank=1, master_addr="10.0.0.1")),
])
def test_train_passes_the_node_flags_to_train_command(monkeypatch, capsys, flags, expected):
    import mf_loss.train.run as run
    calls = []
    monkeypatch.setattr(run, "train_command", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert _cli(["train", "--config", str(CONFIG), "--steps", "3", *flags], capsys)[0] == 0
    (args, kwargs), = calls
    assert args == (str(CONFIG), ["runner_config.train_steps=3"])
    assert {k: kwargs[k] for k in expected} == expected


def _outcome(tmp_path, node_rank=1, returncode=1, duplicate_scheduler=False, done=0, **watch):
    """What launch() concludes from the logs and msrun's exit code alone (no process)."""
    from mf_loss.launch.job import _result, _Watch
    layout = NodeLayout(workers=2, nnodes=2, node_rank=node_rank, master_port=29500, cluster_timeout=60)
    (tmp_path / "done").mkdir(exist_ok=True)
    for rank in list(layout.ranks)[:done]:
        (tmp_path / "done" / f"rank_{rank}").write_text("done\n")
    return _result(WORKER, layout, tmp_path, tmp_path / "done", returncode, _Watch(**watch), False, 60,
                   duplicate_scheduler)


BIND_FAILED = ("[WARNING] DISTRIBUTED(5614,7f9e441cde40,python):2026-11-30-01:41:37.619.224 [mindspore/ccsrc/cluster/"
               "rpc/tcp/socket_operation.cc:454] Listen] Failed to call bind, url: 127.0.0.1:29500 Address already "
               "in use\n")


@pytest.mark.unit
def test_a_second_nodes_redundant_scheduler_failing_to_bind_is_not_a_failure(tmp_path):
    (tmp_path / "scheduler.log").write_text(BIND_FAILED)
    assert _outcome(tmp_path, duplicate_scheduler=True).ok
    failed = _outcome(tmp_path, duplicate_scheduler=False)  # node 0's own scheduler could not bind: a failure
    assert not failed.ok and "failed (msrun exit code 1)" in failed.message


@pytest.mark.unit
def test_ranks_another_node_lost_are_named_with_their_node(tmp_path):
    (tmp_path / "node_1").mkdir()
    (tmp_path / "node_1" / "worker_3.log").write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    (tmp_path / "node_0").mkdir()  # this node's log directory; node 1's beside it, as mf-loss train lays them out
    result = _outcome(tmp_path / "node_0", node_rank=0, remote_ranks=(3, 2))
    assert not result.ok and (result.failed_rank, result.failed_node) == (3, 1)
    assert result.message.startswith(f"msrun job {WORKER} on node 0 of 2 stopped: rank 3 on node 1 stopped "
                                     "answering (msrun's scheduler timed out rank 3 on node 1, rank 2 on node 1)")
    assert result.message.endswith(f"Tail of {tmp_path / 'node_1' / 'worker_3.log'}:\nTraceback (most recent call "
                                   "last):\nRuntimeError: boom")
    finished = _outcome(tmp_path / "node_0", node_rank=0, remote_ranks=(3,), done=2)
    assert finished.ok and finished.message.startswith("warning: node 1 stopped answering after every rank on node 0")


@pytest.mark.unit
def test_a_cluster_that_never_formed_says_how_to_start_the_nodes(tmp_path):
    (tmp_path / "worker_2.log").write_text("[WARNING] DISTRIBUTED(777,7f,python): x\nTraceback (most recent call "
                                           "last):\nRuntimeError: Failed to initialize distributed job cluster\n")
    result = _outcome(tmp_path, exited_pid=777, exit_code=1)
    assert not result.ok and (result.failed_rank, result.failed_node) == (2, 1)
    assert result.message.startswith(f"msrun job {WORKER} failed on rank 2 on node 1 of 2; tail of ")
    assert result.message.endswith("did not all register with the scheduler at 127.0.0.1:29500 within 60 s: start "
                                   "the same command on every node (node ranks 0 to 1) with the same master "
                                   "address and port.")


# ----------------------------------------------------------------------------------------------- msrun

def launch_two_nodes(out: Path, mode: str, on_started=None, timeout=300, tag="two_nodes"):
    """Both nodes' launch() calls, each in a thread as on its own machine; returns their results. The nodes'
    processes carry `tag` (tests/background.py)."""
    port, results = free_port(), {}

    def node(k):
        env = background.tagged_env(tag, MF_LOSS_TEST_NODE=str(k),
                                    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        results[k] = launch(WORKER, [mode, out], workers=2, nnodes=2, node_rank=k, master_port=port,
                            log_dir=out / "logs" / f"node_{k}", timeout=timeout, env=env, quiet=True,
                            cluster_timeout=180)
        results[k].finished = time.monotonic()

    threads = [threading.Thread(target=node, args=(k,)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    if on_started is not None:
        on_started()
    for thread in threads:
        thread.join()
    return results


def killer(out: Path, ranks, killed: dict):
    """Kills `ranks` (a whole node's, as when its machine dies) once they run their all-reduce loop."""
    def kill():
        deadline = time.monotonic() + 300
        while not all((out / f"running_{r}").exists() for r in ranks):
            assert time.monotonic() < deadline, f"ranks {ranks} never started running"
            time.sleep(0.2)
        for rank in ranks:
            psutil.Process(int((out / f"running_{rank}").read_text())).kill()
        killed["at"] = time.monotonic()
    return kill


@background.starts_with_session("two_node_clusters")
def killed_node_clusters(tmp_path_factory):
    """Two two-node clusters at once, each on its own port: in one node 1's ranks are killed, in the other
    node 0's (msrun's scheduler's node). Their ranks first report what they see of the world across the
    nodes, then all-reduce until killed. -> ({'node_1_killed', 'node_0_killed'} -> (out, results, killed at)),
    the processes left running after both)."""
    processes = JobProcesses(tag="multinode")
    kills = {"node_1_killed": (2, 3), "node_0_killed": (0, 1)}  # cluster -> the ranks killed

    def run(name):
        out, killed = tmp_path_factory.mktemp(name), {}
        return out, launch_two_nodes(out, "nodes_forever", killer(out, kills[name], killed), timeout=400,
                                     tag="multinode"), killed

    with ThreadPoolExecutor(len(kills)) as pool:
        clusters = dict(zip(kills, pool.map(run, kills)))
    return clusters, processes.left_running()


@pytest.fixture(scope="module")
def two_node_clusters():
    return background.result(killed_node_clusters)


@pytest.mark.distributed
@pytest.mark.parametrize("cluster", ["node_1_killed", "node_0_killed"])
def test_two_nodes_make_one_world_with_collectives_across_them(two_node_clusters, cluster):
    out, _, _ = two_node_clusters[0][cluster]
    reports = {r: json.loads((out / f"rank_{r}.json").read_text()) for r in range(4)}
    assert {r: (rep["world"], rep["node"]) for r, rep in reports.items()} == {0: (4, 0), 1: (4, 0), 2: (4, 1),
                                                                             3: (4, 1)}
    for rank, report in reports.items():
        assert report["gathered"] == [1.0, 2.0, 3.0, 4.0]            # every rank's slot, from both nodes
        partner = (rank + 2) % 4                                      # the same place on the other node
        assert report["cross_group"] == sorted([rank, partner])
        assert report["cross_sum"] == 10.0 ** rank + 10.0 ** partner
    for k, ranks in ((0, [0, 1]), (1, [2, 3])):  # each node's ranks log on that node
        assert sorted(p.name for p in (out / "logs" / f"node_{k}").glob("worker_*.log")) == \
            [f"worker_{r}.log" for r in ranks]


@pytest.mark.distributed
def test_a_killed_node_stops_the_other_naming_node_and_rank(two_node_clusters):
    _, results, killed = two_node_clusters[0]["node_1_killed"]
    node0, node1 = results[0], results[1]
    assert not node1.ok and node1.failed_rank in (2, 3) and node1.failed_node == 1, node1.message
    assert f"failed on rank {node1.failed_rank} on node 1 of 2 (killed by signal 9)" in node1.message
    assert not node0.ok and node0.returncode != 124, node0.message  # stopped by the watch, not the timeout
    assert node0.failed_node == 1 and node0.failed_rank in (2, 3), node0.message
    assert f"on node 0 of 2 stopped: rank {node0.failed_rank} on node 1 stopped answering" in node0.message
    assert f"worker_{node0.failed_rank}.log" in node0.message  # its log tail (readable here: one machine)
    print(f"node 0 stopped {node0.finished - killed['at']:.0f} s after node 1's ranks were killed:\n{node0.message}")


@pytest.mark.distributed
def test_a_killed_master_node_stops_the_other(two_node_clusters):
    """Node 0 holds msrun's scheduler: when its ranks die, its launcher stops the scheduler too and node 1's
    ranks lose it."""
    _, results, killed = two_node_clusters[0]["node_0_killed"]
    node0, node1 = results[0], results[1]
    assert not node0.ok and node0.failed_rank in (0, 1) and node0.failed_node == 0, node0.message
    assert f"failed on rank {node0.failed_rank} on node 0 of 2 (killed by signal 9)" in node0.message
    assert not node1.ok and node1.returncode != 124 and node1.failed_node == 0, node1.message
    assert "on node 1 of 2 stopped: its ranks lost node 0 (msrun's scheduler at 127.0.0.1:" in node1.message
    print(f"node 1 stopped {node1.finished - killed['at']:.0f} s after node 0's ranks were killed:\n{node1.message}")


@pytest.mark.distributed
def test_the_killed_clusters_leave_no_process(two_node_clusters):
    assert two_node_clusters[1] == []
