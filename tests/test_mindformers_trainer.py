"""MindFormers' own training flow (its Trainer, data loader and runner wrapper; configs/mindformers_trainer.yaml) with
our Llama and loss: one process against MindFormers' own loss, and 2 data-parallel msrun ranks against one process
over the same global batches. Runs in the MindFormers environment (tests/test_mindformers_suite.py runs it there).

The data (one MindRecord, 4 steps of 8 rows of 64 tokens from the shipped corpus): steps 1-3 have no ignored label;
in step 4 a quarter of the labels are -100 while loss_mask stays 1. There MindFormers' CrossEntropyLoss counts
every token in its denominator (N = 512) and ours only the c labels that are not -100, both adding nothing for
the ignored ones: MindFormers' step-4 loss = ours x c / N (c is about 384)."""
import importlib
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("mindformers") is None:
    pytest.skip("needs the MindFormers environment; tests/test_mindformers_suite.py runs this file in it",
                allow_module_level=True)

import mindspore as ms  # noqa: E402

from mf_loss.config_loader import ConfigError  # noqa: E402
from mf_loss.integrations import mindformers as integration  # noqa: E402
from mf_loss.integrations.mindformers_data import CorpusRecordSettings, record_rows, write_mindrecord  # noqa: E402
from mf_loss.train.curve import read_curve  # noqa: E402

pytestmark = [pytest.mark.mindformers, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mindformers_trainer.yaml"
ROWS, SEQ, STEPS, CLEAN_STEPS = 8, 64, 4, 3
IGNORED_FRACTION = 0.25
COLUMNS = "[input_ids, labels, loss_mask]"
ONE_PROCESS = ["use_parallel=false", f"runner_config.batch_size={ROWS}", f"train_dataset.batch_size={ROWS}"]
THEIR_LOSS = "model.model_config.loss.type=CrossEntropyLoss"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(MindRecord path, labels (STEPS * ROWS, SEQ + 1)): the corpus windows configs/mindformers_trainer.yaml
    trains on, with ignored labels in the last step's rows only."""
    input_ids, labels, loss_mask, _ = record_rows(CorpusRecordSettings(seq_length=SEQ, rows=STEPS * ROWS))
    last = slice(CLEAN_STEPS * ROWS, STEPS * ROWS)
    ignored = np.random.default_rng(7).random(labels[last].shape) < IGNORED_FRACTION
    ignored[:, 0] = False  # position 0 is never a label (the model predicts [1:])
    labels[last] = np.where(ignored, -100, labels[last])
    path = tmp_path_factory.mktemp("mindrecord") / "corpus.mindrecord"
    write_mindrecord(path, input_ids, labels, loss_mask)
    return path, labels


def train(output_dir: Path, name: str, data_path: Path, overrides, steps: int, timeout: float = 420):
    """The loss curve of `bash scripts/train.sh --config configs/mindformers_trainer.yaml` (the python it runs)."""
    command = [sys.executable, "-m", "mf_loss.integrations.mindformers_train", "--config", str(CONFIG),
               "--output-dir", str(output_dir), "--steps", str(steps), "--timeout", str(timeout - 30)]
    for override in [f"trainer.model_name={name}", f"train_dataset.data_loader.dataset_dir={data_path}",
                     f"train_dataset.input_columns={COLUMNS}", f"train_dataset.construct_args_key={COLUMNS}",
                     *overrides]:
        command += ["--set", override]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=output_dir,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    curve = read_curve(output_dir / name / "loss.csv")
    assert [row["step"] for row in curve] == list(range(1, steps + 1)), result.stdout[-3000:]
    assert f"step {steps}/{steps}" in result.stdout  # the progress shown live (TrainCallBack's stop_step)
    return curve


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The curves of one process with our loss and with MindFormers', and of 2 data-parallel ranks with ours
    (run at once: each is mostly start-up and compilation, one thread's work)."""
    out = tmp_path_factory.mktemp("mindformers_trainer_runs")
    path, _ = data
    with ThreadPoolExecutor() as pool:
        started = [pool.submit(train, out, "ours", path, ONE_PROCESS, STEPS),
                   pool.submit(train, out, "theirs", path, ONE_PROCESS + [THEIR_LOSS], STEPS),
                   pool.submit(train, out, "dp2", path, [], CLEAN_STEPS)]
        ours, theirs, parallel = (run.result() for run in started)
    return ours, theirs, parallel, out


def losses(curve, steps=slice(None)):
    return np.array([row["loss"] for row in curve])[steps]


def test_one_process_curve_equals_mindformers_loss_without_ignored_tokens(runs):
    ours, theirs, _, _ = runs
    clean = slice(0, CLEAN_STEPS)
    np.testing.assert_allclose(losses(ours, clean), losses(theirs, clean), rtol=1e-6, atol=0)
    np.testing.assert_allclose([r["grad_norm"] for r in ours[clean]], [r["grad_norm"] for r in theirs[clean]],
                               rtol=1e-6)
    assert losses(ours)[0] == pytest.approx(np.log(8192), abs=0.05)  # a fresh model on an 8192-token vocabulary
    assert losses(ours)[CLEAN_STEPS - 1] < losses(ours)[0]


def test_a_label_minus_100_with_mask_1_counts_in_mindformers_denominator_only(runs, data):
    ours, theirs, _, _ = runs
    _, labels = data
    step = labels[CLEAN_STEPS * ROWS:STEPS * ROWS, 1:]
    counted, total = int((step != -100).sum()), step.size
    assert total == ROWS * SEQ and 0.6 * total < counted < 0.9 * total
    ours_loss, theirs_loss = losses(ours)[CLEAN_STEPS], losses(theirs)[CLEAN_STEPS]
    # the same sum of token losses (same weights after the equal steps 1-3) over different denominators
    assert theirs_loss == pytest.approx(ours_loss * counted / total, rel=2e-5)
    assert theirs_loss < 0.9 * ours_loss


def test_two_data_parallel_ranks_equal_one_process_over_the_same_global_batches(runs):
    """MindFormers' data-parallel mode (parallel_config reset to 1 x 1; the model takes dp = 2 from the world size,
    and compiles with lazy inline off): each rank reads every other row, MindFormers averages the gradients."""
    ours, _, parallel, out = runs
    np.testing.assert_allclose(losses(parallel), losses(ours, slice(0, CLEAN_STEPS)), rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in parallel], [r["grad_norm"] for r in ours[:CLEAN_STEPS]],
                               rtol=1e-5)
    logs = sorted(p.name for p in (out / "dp2" / "logs").glob("worker_*.log"))
    assert logs == ["worker_0.log", "worker_1.log"]


# ------------------------------------------------------------------------------ the two breaks, one process

@pytest.fixture
def data_parallel_context():
    ms.set_auto_parallel_context(parallel_mode="data_parallel")
    yield
    ms.reset_auto_parallel_context()


def _model_config(**overrides):
    from mindformers.models.llama import LlamaConfig
    settings = dict(batch_size=2, seq_length=16, hidden_size=32, num_layers=1, num_heads=2, vocab_size=64,
                    compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                    rotary_dtype="float32", param_init_type="float32", fused_rms_norm=False, use_rope_slice=True,
                    use_flash_attention=False, use_past=False, disable_lazy_inline=True)
    return LlamaConfig(**{**settings, **overrides})


def test_the_config_reaches_mindformers_lazy_inline(monkeypatch, data_parallel_context):
    """Outside stand-alone mode MindFormers' @lazy_inline turns MindSpore's lazy inline on unless the config,
    passed as `config=`, says disable_lazy_inline (what MindFormers' Trainer sets): with the config passed
    positionally the model compiles its whole graph lazily inlined and fails outside stand-alone mode."""
    import mindspore.common
    applied = []
    original = mindspore.common.lazy_inline

    def recording(*args, **kwargs):
        applied.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(mindspore.common, "lazy_inline", recording)
    network = integration.VocabParallelLlamaForCausalLM(_model_config(disable_lazy_inline=True))
    assert type(network.loss).__name__ == "CrossEntropyLoss"
    assert applied == []
    integration.VocabParallelLlamaForCausalLM(_model_config(disable_lazy_inline=False))
    assert applied  # the check can see lazy inline being applied


class _Layout:
    def __init__(self, data_parallel, model_parallel):
        self.data_parallel, self.model_parallel = data_parallel, model_parallel


class _Context:
    """MindFormers' Context singleton as build_context leaves it: the YAML's parallel_config."""
    def __init__(self, model_parallel):
        self.parallel_opr = type("ParallelOperator", (), {"parallel": _Layout(1, model_parallel)})()


def _fake_world(monkeypatch, world, model_parallel):
    """This process as rank 0 of `world` ranks (no msrun), with the YAML's model_parallel in MindFormers' Context."""
    from mf_loss.parallel import comm
    build_context = importlib.import_module("mindformers.core.context.build_context")
    monkeypatch.setattr(integration.GlobalComm, "INITED", True)
    for module in (integration, comm):
        monkeypatch.setattr(module, "get_group_size", lambda *args: world)
    monkeypatch.setattr(comm, "get_rank", lambda *args: 0)
    monkeypatch.setattr(build_context, "Context", type("Context", (), {
        "is_exists": classmethod(lambda cls: True), "__new__": lambda cls: _Context(model_parallel)}))


def test_data_parallel_mode_takes_dp_from_the_world_size(monkeypatch, data_parallel_context):
    """MindFormers' Trainer hands the model parallel_config 1 x 1 (its reset) on 4 ranks."""
    _fake_world(monkeypatch, world=4, model_parallel=1)
    network = integration.VocabParallelLlamaForCausalLM(_model_config())
    assert (network.parallel.data_parallel, network.parallel.model_parallel) == (4, 1)
    assert network.layout.mp_size == 1 and network.lm_head.weight.shape == (64, 32)  # the whole head


def test_data_parallel_mode_refuses_model_parallel(monkeypatch, data_parallel_context):
    _fake_world(monkeypatch, world=4, model_parallel=2)
    with pytest.raises(ConfigError, match=r"model_parallel: 2 under MindFormers' data-parallel mode(.|\n)*"
                                          r"average(.|\n)*configs/mindformers_llama\.yaml"):
        integration.VocabParallelLlamaForCausalLM(_model_config())


def test_stand_alone_keeps_parallel_config(monkeypatch):
    monkeypatch.setattr(integration, "get_group_size", lambda *args: 4)
    assert integration._trainer_parallel_config() is None


def test_the_yaml_with_model_parallel_is_refused_before_any_rank_starts(tmp_path):
    from mf_loss.integrations.mindformers_run import prepare_run
    with pytest.raises(ConfigError, match="model_parallel: MindFormers' data-parallel mode runs 1 only"):
        prepare_run(CONFIG, ["parallel_config.model_parallel=2"], str(tmp_path))
    assert not (tmp_path / "mindformers_trainer").exists()


# ------------------------------------------------------------------------------------------------ the data

def test_the_corpus_mindrecord_is_built_once_and_read_by_mindformers_loader(tmp_path):
    from mindspore.dataset import MindDataset

    from mf_loss.integrations.mindformers_data import corpus_mindrecord
    settings = CorpusRecordSettings(seq_length=SEQ, rows=6, ignored_fraction=0.5)
    path = corpus_mindrecord(settings, cache_dir=tmp_path)
    stamp = path.stat().st_mtime_ns
    assert corpus_mindrecord(settings, cache_dir=tmp_path) == path and path.stat().st_mtime_ns == stamp
    assert corpus_mindrecord(CorpusRecordSettings(seq_length=SEQ, rows=6), cache_dir=tmp_path) != path
    input_ids, labels, loss_mask, _ = record_rows(settings)
    rows = list(MindDataset(str(path), columns_list=["input_ids", "labels", "loss_mask"], shuffle=False)
                .create_tuple_iterator(output_numpy=True))
    np.testing.assert_array_equal(np.stack([r[0] for r in rows]), input_ids)
    np.testing.assert_array_equal(np.stack([r[1] for r in rows]), labels)
    assert (np.stack([r[2] for r in rows]) == 1).all() and loss_mask.shape == (6, SEQ + 1)
    assert 0.3 < (labels == -100).mean() < 0.7 and (input_ids > 0).all()  # no padding in the corpus windows


def test_corpus_mindrecord_block_errors_name_the_key():
    from mf_loss.integrations.mindformers_data import settings_of
    with pytest.raises(ConfigError, match="corpus_mindrecord: unknown key.*seq_lenght"):
        settings_of({"corpus_mindrecord": {"seq_lenght": 64}}, "x.yaml")
    with pytest.raises(ConfigError, match="ignored_fraction in"):
        settings_of({"corpus_mindrecord": {"ignored_fraction": 2}}, "x.yaml")


# ------------------------------------------------------------------------------------------- the CPU wrapper

def test_the_cpu_wrapper_skips_the_update_when_a_gradient_is_not_finite():
    """MindFormers' MFTrainOneStepCell checks overflow with an Ascend-only kernel; ours, on CPU, with IsFinite
    over the gradients: a step whose gradient holds inf reports overflow and leaves the weights as they were."""
    from mindspore import Tensor, nn

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.dense = nn.Dense(3, 2)

        def construct(self, x):
            return (self.dense(x) ** 2).mean()

    net = Net()
    step = integration.CPUTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1),
                                           use_clip_grad=True)
    assert step.on_cpu
    before = net.dense.weight.asnumpy().copy()
    loss, overflow = step(Tensor(np.array([[1.0, np.inf, 0.0]], np.float32)))[:2]
    assert bool(overflow.asnumpy()) and (net.dense.weight.asnumpy() == before).all()
    loss, overflow = step(Tensor(np.array([[1.0, 2.0, 0.0]], np.float32)))[:2]
    assert not bool(overflow.asnumpy()) and np.isfinite(float(loss.asnumpy()))
    assert not (net.dense.weight.asnumpy() == before).all()
