"""Measurement: peak memory of one step, step timings, the machine's memory bandwidth, machine facts.

Peak memory comes from the kernel because MindSpore's own memory statistics are 0 on CPU and its pool keeps
what a step freed: only a fresh process's first step shows the step's own memory."""
import os
import platform
import statistics
import time

import psutil


def peak_during(step):
    """Runs `step` once; returns (seconds, peak bytes resident beyond what was resident before, whether the
    high-water mark could be reset). psutil has no peak-RSS reset: writing 5 to /proc/self/clear_refs resets
    the kernel's VmHWM, which is then read back from /proc/self/status."""
    before = psutil.Process().memory_info().rss
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    return seconds, max(0, peak - before), reset


def timed_step(step):
    """(wall seconds, process CPU seconds over all threads) of one call of `step`."""
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - start, time.process_time() - start_cpu


def time_steps(step, warmup, repeats):
    """Wall and CPU seconds of `repeats` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    measured = [timed_step(step) for _ in range(repeats)]
    return [m[0] for m in measured], [m[1] for m in measured]


def memory_bandwidth(megabytes=256, repeats=5) -> dict:
    """The machine's memory bandwidth as a large NumPy copy sees it: (bytes read + bytes written) / time,
    the median and the best of `repeats` copies of a `megabytes` array (far larger than any cache)."""
    import numpy as np

    source = np.ones(megabytes * 2 ** 20 // 8, np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in before timing
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        rates.append(2 * source.nbytes / (time.perf_counter() - start))
    return dict(median_bytes_per_s=statistics.median(rates), best_bytes_per_s=max(rates), array_bytes=source.nbytes,
                repeats=repeats, method="numpy.copyto of a float64 array, (read + write bytes) / seconds")


def available_memory() -> int:
    return psutil.virtual_memory().available


def machine_info() -> dict:
    info = dict(python=platform.python_version(), platform=platform.platform(), cpus=psutil.cpu_count(),
                cpus_usable=len(psutil.Process().cpu_affinity()),
                memory_gib=round(psutil.virtual_memory().total / 2 ** 30, 1), load_average_start=list(os.getloadavg()))
    try:
        with open("/proc/cpuinfo") as cpuinfo:  # the model name: psutil does not report it
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version
    for package in ("mindspore", "torch"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            pass
    try:
        from ..kernels.build import isa_flags
        info["fused_isa_flags"] = " ".join(isa_flags()) or "baseline"
    except Exception as error:  # noqa: BLE001 - informative only, and says why it is missing
        info["fused_isa_flags"] = f"unknown ({type(error).__name__})"
    return info
