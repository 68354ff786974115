"""The process runner: every configuration in a fresh interpreter (so that its first step shows its own
memory), either alone (`--worker`: all its steps, one JSON line back) or served step by step (`--serve`),
so that two implementations take turns (ABBA) and see the same moments of a shared machine."""
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from . import measure
from .impls import IMPLS, build_steps, logits_bytes

RESULT_MARK = "MF_BENCH_RESULT "
READY_MARK = "MF_BENCH_READY "
TIME_MARK = "MF_BENCH_TIME "
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


# --- worker side ----------------------------------------------------------------------------------------

def _set_up(config):
    """Builds the steps and measures each pass's first step (memory: only the first pass's is the step's
    own, later passes reuse MindSpore's pool). Returns (steps, {pass: first-step facts})."""
    steps = build_steps(config)
    first = {}
    for index, pass_name in enumerate(config["passes"]):
        prepare, run = steps.passes[pass_name]
        prepare()
        seconds, peak, reset = measure.peak_during(run)
        beyond = max(0, peak - steps.excluded_bytes) if index == 0 and reset else None
        first[pass_name] = dict(first_step_s=seconds, peak_bytes=beyond)
    return steps, first


def _pass_record(first, wall, cpu, logits_size):
    """One pass's record: timings of the measured steps, and the first step's time and peak memory."""
    peak = first["peak_bytes"]
    return dict(median_s=statistics.median(wall), min_s=min(wall), times_s=wall, cpu_median_s=statistics.median(cpu),
                cpu_s=cpu, first_step_s=first["first_step_s"], peak_bytes=peak,
                peak_over_logits=peak / logits_size if peak is not None else None)


def _facts(steps):
    return dict(logits_bytes=steps.logits_bytes, excluded_bytes=steps.excluded_bytes, notes=steps.notes)


def run_worker(config: dict) -> dict:
    """All of one configuration's steps in this process; its record."""
    started = time.perf_counter()
    steps, first = _set_up(config)
    result = dict(config, error=None, passes={}, **_facts(steps))
    for pass_name in config["passes"]:
        wall, cpu = measure.time_steps(steps.passes[pass_name][1], config["warmup"], config["repeats"])
        result["passes"][pass_name] = _pass_record(first[pass_name], wall, cpu, steps.logits_bytes)
    result["worker_s"] = time.perf_counter() - started
    return result


def serve_worker(config: dict) -> None:
    """Set up, measure the first steps, warm every pass up, print READY; then one step per `step <pass>`
    line of stdin, answering with its wall and CPU seconds, until `quit` or the end of stdin."""
    steps, first = _set_up(config)
    for pass_name in config["passes"]:
        for _ in range(config["warmup"]):
            steps.passes[pass_name][1]()
    print(READY_MARK + json.dumps(dict(first=first, **_facts(steps))), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        print(TIME_MARK + json.dumps(measure.timed_step(steps.passes[command[1]][1])), flush=True)


# --- parent side ----------------------------------------------------------------------------------------

def error_summary(stderr: str) -> str:
    """The exception line of a worker's traceback (else the last lines), without MindSpore's chatter."""
    lines = [t for t in (stderr or "").splitlines() if t.strip() and not t.startswith(("[WARNING]", "[INFO]"))]
    for index in range(len(lines) - 1, -1, -1):
        head, _, message = lines[index].partition(":")
        if head.strip().endswith(("Error", "Exception", "Interrupt")) and " " not in head.strip():
            if not message.strip():  # MindSpore puts its message on the following lines, between rules
                message = " ".join(t.strip() for t in lines[index + 1:index + 6] if not t.strip().startswith("---"))
            return f"{head.strip()}: {message.strip()}"[:600]
    return " | ".join(lines[-4:])[-600:]


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GLOG_v", "3")  # MindSpore: errors only
    return env


def memory_skip(configs) -> str:
    """Why these processes, run at once, would not fit in the available memory ("" when they fit)."""
    need = sum(logits_bytes(c) * (1 + IMPLS[c["impl"]].memory_factor) for c in configs)
    available = measure.available_memory()
    if need > 0.85 * available:
        return f"skipped: needs about {need / 2 ** 30:.1f} GiB, {available / 2 ** 30:.1f} GiB available"
    return ""


def spawn_worker(config: dict, timeout: float) -> dict:
    """Runs `config` in a fresh interpreter, in a scratch directory (MindSpore writes files on errors)."""
    skipped = memory_skip([config])
    if skipped:
        return dict(config, error=skipped, passes={}, logits_bytes=logits_bytes(config))
    with tempfile.TemporaryDirectory(prefix="mf_loss_bench_") as scratch:
        command = [sys.executable, "-m", "mf_loss.bench", "--worker", json.dumps(config)]
        try:
            proc = subprocess.run(command, cwd=scratch, env=worker_env(), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(config, error=f"timed out after {timeout:.0f} s", passes={})
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return dict(config, error=f"worker exited {proc.returncode}: {error_summary(proc.stderr)}", passes={})


def run_configs(configs, timeout, jobs, on_result):
    """Runs every configuration in its own process, `jobs` at once; calls on_result(result) as each ends."""
    results = [None] * len(configs)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(spawn_worker, config, timeout): index for index, config in enumerate(configs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            on_result(results[futures[future]])
    return results


class Served:
    """A `--serve` worker process driven step by step."""

    def __init__(self, config: dict, timeout: float):
        self.config = config
        self._scratch = tempfile.TemporaryDirectory(prefix="mf_loss_bench_")
        self._stderr = open(Path(self._scratch.name) / "stderr.txt", "w+")
        self._lines = queue.Queue()
        self._proc = subprocess.Popen([sys.executable, "-m", "mf_loss.bench", "--serve", json.dumps(config)],
                                      cwd=self._scratch.name, env=worker_env(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)

        def pump():
            for line in self._proc.stdout:
                self._lines.put(line)
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.ready = self._expect(READY_MARK, timeout)

    def _expect(self, mark, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.config['impl']}: no answer within {timeout:.0f} s") from None
            if line is None:
                self._stderr.seek(0)
                raise RuntimeError(f"worker exited {self._proc.wait()}: {error_summary(self._stderr.read())}")
            if line.startswith(mark):
                return json.loads(line[len(mark):])

    def step(self, pass_name, timeout):
        self._proc.stdin.write(f"step {pass_name}\n")
        self._proc.stdin.flush()
        return self._expect(TIME_MARK, timeout)

    def close(self):
        try:
            self._proc.stdin.write("quit\n")
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()
        self._scratch.cleanup()


def run_pair(anchor_config: dict, other_config: dict, timeout: float):
    """The anchor (fused) and another implementation in two fresh processes, taking steps in turns
    (A B B A ...). Returns both records; the other's carries `paired`: the anchor's times beside its own and
    the per-turn ratios anchor / other."""
    configs = (anchor_config, other_config)
    workers, current = [], 0
    try:
        for current, config in enumerate(configs):
            workers.append(Served(config, timeout))
        times = [{p: [] for p in anchor_config["passes"]} for _ in workers]
        for turn in range(anchor_config["repeats"]):
            order = (0, 1) if turn % 2 == 0 else (1, 0)
            for pass_name in anchor_config["passes"]:
                for current in order:
                    times[current][pass_name].append(workers[current].step(pass_name, timeout))
    except (RuntimeError, TimeoutError, OSError) as error:
        for worker in workers:
            worker.close()
        # the error belongs to the side that failed; the other side has no measurement from this pair
        return [dict(c, error=str(error) if i == current else None, passes={}) for i, c in enumerate(configs)]
    for worker in workers:
        worker.close()
    results = []
    for worker, config, measured in zip(workers, configs, times):
        ready = worker.ready
        result = dict(config, error=None, passes={}, logits_bytes=ready["logits_bytes"],
                      excluded_bytes=ready["excluded_bytes"], notes=ready["notes"])
        for pass_name, steps in measured.items():
            result["passes"][pass_name] = _pass_record(ready["first"][pass_name], [t[0] for t in steps],
                                                       [t[1] for t in steps], ready["logits_bytes"])
        results.append(result)
    results[1]["paired"] = {
        p: dict(anchor=anchor_config["impl"], anchor_times_s=[t[0] for t in times[0][p]],
                anchor_cpu_s=[t[1] for t in times[0][p]],
                ratios=[a[0] / b[0] for a, b in zip(times[0][p], times[1][p])],
                cpu_ratios=[a[1] / b[1] for a, b in zip(times[0][p], times[1][p]) if b[1] > 0])
        for p in anchor_config["passes"]}
    return results
