"""mf_loss.launch: a rank killed by a signal after every rank marked itself done is a warning (MindSpore's
teardown crash), a crash before that fails the job naming the rank. Each case is a real 2-rank msrun job."""
from pathlib import Path

import pytest

from mf_loss.launch import launch

WORKER = Path(__file__).with_name("launch_worker.py")
pytestmark = pytest.mark.distributed


def test_signal_after_every_rank_is_done_is_a_warning(tmp_path):
    result = launch(WORKER, ["after_done"], workers=2, log_dir=tmp_path / "logs", timeout=300, quiet=True)
    assert result.ok, result.message
    assert result.failed_rank == 1
    assert result.message.startswith(f"warning: rank 1 of {WORKER} was killed by signal 11 after every rank had "
                                     "finished its work"), result.message
    assert sorted(p.name for p in (tmp_path / "logs" / "done").iterdir()) == ["rank_0", "rank_1"]


def test_signal_before_the_rank_is_done_fails_the_job(tmp_path):
    result = launch(WORKER, ["before_done"], workers=2, log_dir=tmp_path / "logs", timeout=300, quiet=True)
    assert not result.ok
    assert result.failed_rank == 1
    assert result.message.startswith(f"msrun job {WORKER} failed on rank 1"), result.message
