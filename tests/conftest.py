import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import mindspore as ms  # noqa: E402


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
