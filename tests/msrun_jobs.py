"""The suite's msrun jobs: one launch per layout per session runs every distributed part the session's tests
need (the CrossEntropyLoss wiring of tests/dist_worker.py, LinearCrossEntropyLoss's of
tests/dist_linear_worker.py), since each launch costs 25-35 s of start-up before any check. Each rank writes
each part's results to OUT/<part>_rank<r>.npz and .json as soon as the part is done.

Test side: `Jobs.rank_results(layout, part)` (the `msrun_ranks` fixture of tests/conftest.py) launches, on
first use, the jobs of every layout the session's tests read, at once (each job waits on its cluster and its
ranks' start-up, which the others' work fills), each with a timeout; it returns every rank's results of one
part. A part that not every rank finished fails each of its tests with the launch's message (the failing
rank's log tail); a part that every rank finished is read even when a later part failed the job.

Rank side (`python msrun_jobs.py --dp D --mp M --out DIR --parts loss,linear --modes pynative,graph`): the
shared command line, the collective count of the executed graph's IR, and writing a part's results.
"""
import argparse
import importlib
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mf_loss.launch import launch, mark_rank_done  # noqa: E402

LAYOUTS = {"mp2": (1, 2), "dp2_mp2": (2, 2)}   # name -> (data_parallel, model_parallel)
# The case suites in GRAPH mode (a compile per case) run on the largest layout; every layout compiles the
# exchange in GRAPH mode through its training steps.
GRAPH_CASES_LAYOUT = "dp2_mp2"


def modes_of(layout: str) -> tuple:
    """The modes the layout's job runs the case suites in."""
    return ("pynative", "graph") if layout == GRAPH_CASES_LAYOUT else ("pynative",)
PARTS = {"loss": "dist_worker", "linear": "dist_linear_worker"}  # part -> module with run_rank()
# Both parts on 4 ranks of 2 shared cores: ~4-6 min when the machine is quiet, 2-3x that when it is loaded.
LAUNCH_TIMEOUT_S = 1500


def _msrun_items(items) -> list:
    return [item for item in items if getattr(getattr(item, "module", None), "MSRUN_PART", None)]


def parts_of(items) -> list:
    """The parts the selected tests read: each distributed test module names its part as MSRUN_PART."""
    wanted = {item.module.MSRUN_PART for item in _msrun_items(items)}
    return [part for part in PARTS if part in wanted]


def layouts_of(items) -> list:
    """The layouts the selected tests read (their `layout` parameter)."""
    wanted = {item.callspec.params.get("layout") for item in _msrun_items(items) if hasattr(item, "callspec")}
    return [layout for layout in LAYOUTS if layout in wanted]


class Jobs:
    """The session's msrun jobs, one per layout, all launched at the first use of any and run once."""

    def __init__(self, tmp_path_factory, parts, layouts):
        self.tmp_path_factory, self.parts, self.layouts = tmp_path_factory, list(parts), list(layouts)
        self.launched, self.read = {}, {}

    def _launch(self, layout: str) -> None:
        dp, mp = LAYOUTS[layout]
        out = self.tmp_path_factory.mktemp(f"msrun_{layout}")
        result = launch(Path(__file__), ["--dp", dp, "--mp", mp, "--out", out, "--parts", ",".join(self.parts),
                                         "--modes", ",".join(modes_of(layout))],
                        workers=dp * mp, log_dir=out / "logs", timeout=LAUNCH_TIMEOUT_S)
        self.launched[layout] = (dp, mp, out, result)

    def rank_results(self, layout: str, part: str):
        """(dp, mp, [(arrays, report)] for every rank) of `part` in the job of `layout`."""
        assert part in self.parts, f"part {part!r} was not announced: its test module must set MSRUN_PART"
        if layout not in self.launched:
            threads = [threading.Thread(target=self._launch, args=(name,))
                       for name in dict.fromkeys(self.layouts + [layout]) if name not in self.launched]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert layout in self.launched, f"launching the {layout} job raised (its traceback is in the captured stderr)"
        dp, mp, out, result = self.launched[layout]
        if (layout, part) not in self.read:
            missing = [r for r in range(dp * mp) if not (out / f"{part}_rank{r}.json").exists()]
            assert not missing, (f"the {part} part of the {layout} job has no results from rank(s) {missing}: "
                                 f"{result.message or 'the job ended without writing them'}")
            self.read[layout, part] = [(dict(np.load(out / f"{part}_rank{r}.npz")),
                                        json.loads((out / f"{part}_rank{r}.json").read_text())) for r in range(dp * mp)]
        return dp, mp, self.read[layout, part]


def executed_graph_collectives(ir_dir) -> tuple:
    """(file, {collective: calls}) of the last IR file the compiler wrote in `ir_dir`: the executed graph,
    backprop included (read by the benchmark's reader, whose parsing tests/test_bench.py checks)."""
    from mf_loss.bench.mp2 import collectives_in_ir  # rank side only: the test side never needs the benchmark

    found = collectives_in_ir(ir_dir)
    if "error" in found:
        raise RuntimeError(found["error"])
    return found["ir_file"], found["counts"]


def write_results(out: Path, part: str, rank: int, arrays: dict, report: dict) -> None:
    """The arrays first, then the report (renamed into place): a report on disk means the part is complete."""
    np.savez(out / f"{part}_rank{rank}.npz", **arrays)
    partial = out / f"{part}_rank{rank}.json.partial"
    partial.write_text(json.dumps(report, indent=1))
    partial.rename(out / f"{part}_rank{rank}.json")


def main():
    parser = argparse.ArgumentParser(description="one rank of the test suite's msrun job")
    parser.add_argument("--dp", type=int, required=True)
    parser.add_argument("--mp", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--modes", default="pynative,graph", help="the case suites' modes, comma-separated")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}, expected some of {list(PARTS)}")
    from mindspore.communication import get_rank, init
    from mf_loss import ParallelConfig
    init()
    rank = get_rank()
    config = ParallelConfig(data_parallel=args.dp, model_parallel=args.mp)
    where = dict(rank=rank, dp_rank=rank // args.mp, mp_rank=rank % args.mp)
    for part in parts:
        arrays, report = importlib.import_module(PARTS[part]).run_rank(config, where["dp_rank"], where["mp_rank"],
                                                                       args.out / f"{part}_ir_rank{rank}",
                                                                       args.modes.split(","))
        write_results(args.out, part, rank, arrays, dict(where, **report))
        print(f"rank {rank}: {part} done, {len(arrays)} arrays", flush=True)
    mark_rank_done(rank)


if __name__ == "__main__":
    main()
