"""Shared fixtures: each test in its own scratch directory in PYNATIVE mode, GRAPH mode on request, and the
session's msrun jobs (`msrun_ranks`)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import mindspore as ms  # noqa: E402

import background  # noqa: E402
import msrun_jobs  # noqa: E402

# PYNATIVE runs each kernel on a worker thread while Python busy-waits at every host sync; the tests' many
# tiny ops run several times faster on the calling thread (same kernels, same numbers). It only takes effect
# before the first eager op of the process, hence here, at import time, for every test module.
ms.runtime.launch_blocking()


# The quick tier (`bash scripts/test.sh --quick`, pytest -m quick): in-process checks, a few minutes in all,
# chosen so that a slip in the loss's math fails at least one of them (which one catches what: the test names).
QUICK = (
    "test_mp_in_one_process.py",
    "test_cross_entropy_options.py",
    "test_vocab_parallel_math.py::test_core_cases_on_every_mp",
    "test_vocab_parallel_math.py::test_a_slice_of_minus_inf_logits_holds_no_mass",
    "test_head_kernels.py",
    "test_fused_kernels.py",
    "test_linear_cross_entropy.py::test_option_grid_pynative",
    "test_linear_cross_entropy.py::test_mask_kinds",
    "test_linear_cross_entropy.py::test_chunk_sizes_that_do_and_do_not_divide_rows",
    "test_linear_cross_entropy.py::test_empty_batch_and_nothing_counted",
    "test_linear_cross_entropy.py::test_half_precision_inputs",
    "test_linear_cross_entropy.py::test_equals_cross_entropy_loss_on_materialised_logits",
    "test_linear_cross_entropy.py::test_against_torch_linear_cross_entropy",
    "test_linear_cross_entropy.py::test_bad_",
    "test_modes_and_errors.py",
    "test_import_graph.py",
    "test_structure.py",
    "test_packaging.py::test_library_requirements_name_no_tool_package",
    "test_config.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("/", 1)[-1].startswith(QUICK):
            item.add_marker(pytest.mark.quick)
    # In-process tests first, while the jobs started with the session (tests/background.py) wait on their
    # clusters; then the tests that start processes of their own. Within each part, the files' order.
    items.sort(key=lambda item: bool(item.get_closest_marker("distributed") or item.get_closest_marker("slow")))


@pytest.fixture(scope="session", autouse=True)
def _jobs_started_with_the_session(request, tmp_path_factory):
    tmp_path_factory.getbasetemp()  # made here, once: the jobs' threads would race to make it
    pool = background.start(request.session.items, tmp_path_factory)
    yield
    pool.shutdown(wait=True)


@pytest.fixture(autouse=True)
def _scratch_dir_and_mode(tmp_path, monkeypatch):
    # MindSpore writes rank_0/ and analyze_fail.ir into the working directory on compile errors.
    monkeypatch.chdir(tmp_path)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield


@pytest.fixture(scope="session")
def msrun_ranks(request, tmp_path_factory):
    """`msrun_ranks(layout, part)`: (dp, mp, [(arrays, report)] per rank) of one part of the session's msrun job
    of `layout`, launched once for every part and layout the selected tests read (tests/msrun_jobs.py)."""
    items = request.session.items
    return msrun_jobs.Jobs(tmp_path_factory, msrun_jobs.parts_of(items), msrun_jobs.layouts_of(items)).rank_results
