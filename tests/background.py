"""Jobs that mostly wait (msrun clusters forming, heartbeats and timeouts running out, the MindFormers
environment's own test run), started in threads when the test session starts, so that the in-process tests
(which tests/conftest.py runs first) go on meanwhile.

A test module marks the function that runs its job with `@starts_with_session("fixture")` (the function
takes pytest's tmp_path_factory); that fixture of the module gets the job's result with `result(function)`,
which waits for it. A job starts only when a selected test uses its fixture. Each job's processes carry its
tag in the environment (`TAG`), so that a job can check that it left none of its own running while others
still run.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import psutil

TAG = "MF_LOSS_TEST_JOB"
_JOBS = {}      # name -> ((module, fixture), function)
_STARTED = {}   # name -> Future


def starts_with_session(fixture: str):
    def register(function):
        _JOBS[function.__name__] = ((function.__module__, fixture), function)
        return function
    return register


def start(items, tmp_path_factory) -> ThreadPoolExecutor:
    """Starts every registered job whose fixture a selected test uses; returns the pool (shut it down at the
    end of the session)."""
    used = {(item.module.__name__, name) for item in items if getattr(item, "module", None)
            for name in getattr(item, "fixturenames", ())}
    wanted = [name for name, (where, _) in _JOBS.items() if where in used]
    pool = ThreadPoolExecutor(max_workers=max(1, len(wanted)))
    for name in wanted:
        _STARTED[name] = pool.submit(_JOBS[name][1], tmp_path_factory)
    return pool


def result(function):
    """The job's result, waited for (the session started it: a test uses its fixture)."""
    return _STARTED[function.__name__].result()


def tagged_env(tag: str, **extra) -> dict:
    """This process's environment with the job's tag (and `extra`)."""
    return dict(os.environ, **{TAG: tag}, **extra)


def carries_tag(process: psutil.Process, tag: str) -> bool:
    try:
        return process.environ().get(TAG) == tag
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
