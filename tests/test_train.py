"""`mf-loss train`: the pieces (corpus, tokenizer cache, batches, schedule, model math against torch, charts,
progress), then short real runs of a small Llama-style model:

- a single-process reference run with the fused head (12 steps);
- the same run with the unfused head, stopped at step 10 by a NaN that the loss's NaN check catches, resumed
  from its step-8 checkpoint with the fused head: its whole curve and final weights equal the fused run's
  to 1e-5 (the unfused steps 1-9 and the switch of heads at resume both checked);
- dp=2 x mp=2 on 4 msrun ranks with the fused head: rank 1 fails at step 10 -> a clear message naming rank 1
  with its log tail, no process left, the step-8 checkpoint intact; resumed with the unfused head, its loss
  curve and final weights equal the single-process run to 1e-5, with data-parallel ranks holding different
  numbers of counted tokens.
"""
import io
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mf_loss.config_loader import load_config
from mf_loss.train.data import BatchSpec, global_batch, rank_micro_batches
from mf_loss.train.tokenizer import TokenizerSettings, prepare_corpus, read_corpus

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
STEPS, CKPT_EVERY, FAIL_STEP = 12, 4, 10
# A smaller model than the shipped configs' (same code paths): the runs take seconds per step, not more.
SMALL = ["model.model_config.vocab_size=1024", "model.model_config.hidden_size=64", "model.model_config.num_layers=1",
         "model.model_config.seq_length=32", "lr_schedule.warmup_steps=3", "runner_config.log_interval=4",
         f"runner_config.save_checkpoint_steps={CKPT_EVERY}"]
UNFUSED = "loss.type=CrossEntropyLoss"   # the shipped configs' default is the fused head
TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------- corpus and tokenizer

@pytest.mark.unit
def test_builtin_corpus_is_the_king_james_bible():
    text = read_corpus("builtin")
    assert len(text.encode()) > 4_000_000
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


@pytest.mark.unit
def test_tokenizer_is_built_once_reused_and_rebuilt_when_corpus_or_settings_change(tmp_path):
    text = read_corpus("builtin")[:80_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    cache = tmp_path / "cache"
    settings = TokenizerSettings(vocab_size=400)

    first = prepare_corpus(str(corpus), settings, cache)
    assert first.built and first.vocab_size == 400 and first.pad_id == 0
    assert text.startswith(first.decode(first.ids[:300]))          # the ids are the corpus, in order
    sample = "And God said, Let there be light: caf\u00e9 \u2014 \u00fcber"  # unseen bytes encode too
    assert first.decode(first.encode(sample)) == sample

    again = prepare_corpus(str(corpus), settings, cache)
    assert not again.built and again.directory == first.directory
    np.testing.assert_array_equal(again.ids, first.ids)

    other_settings = prepare_corpus(str(corpus), TokenizerSettings(vocab_size=420), cache)
    assert other_settings.built and other_settings.directory != first.directory and other_settings.vocab_size == 420
    corpus.write_text(text + "Amen.\n")
    other_corpus = prepare_corpus(str(corpus), settings, cache)
    assert other_corpus.built and other_corpus.directory not in (first.directory, other_settings.directory)
    # atomic builds: nothing half-written is left beside the finished caches
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted(
        p.name for p in (first.directory, other_settings.directory, other_corpus.directory))


@pytest.mark.unit
def test_missing_corpus_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot read the training corpus .*nope.txt"):
        prepare_corpus(str(tmp_path / "nope.txt"), TokenizerSettings(400), tmp_path)


# ------------------------------------------------------------------------------------- batches and schedule

@pytest.mark.unit
def test_batches_hold_next_tokens_padding_and_unequal_dp_shares():
    config = load_config(CONFIGS / "dp2_mp2.yaml")
    mc, rc, ds = config["model"]["model_config"], config["runner_config"], config["train_dataset"]
    corpus = prepare_corpus("builtin", TokenizerSettings(mc["vocab_size"]))
    spec = BatchSpec(rc["global_batch_size"], mc["seq_length"], ds["pad_probability"], ds["ignore_probability"],
                     -100, corpus.pad_id)
    text = read_corpus("builtin")
    for step in range(6):
        batch = global_batch(corpus.ids, spec, config["seed"], step)
        assert batch.tokens.shape == (16, 64) and batch.tokens.max() < corpus.vocab_size
        counted = (batch.mask != 0) & (batch.labels != -100)
        next_ok = (batch.mask[:, 1:] != 0) & (batch.labels[:, :-1] != -100)
        np.testing.assert_array_equal(batch.labels[:, :-1][next_ok], batch.tokens[:, 1:][next_ok])
        assert (batch.mask == 0).any() and (batch.labels == -100).any() and counted.any()
        assert np.all(batch.tokens[batch.mask == 0] == corpus.pad_id)
        row = batch.tokens[1][batch.mask[1] != 0]
        assert corpus.decode(row) in text                                # rows are windows of the corpus
        parts = [rank_micro_batches(batch, 2, d, 2) for d in range(2)]
        assert parts[0].tokens.shape == (2, 4, 64)
        counts = [p.counted(-100) for p in parts]
        assert counts[0] != counts[1], f"step {step}: both dp ranks count {counts[0]} tokens"
        assert sum(counts) == batch.counted(-100) == int(counted.sum())
        np.testing.assert_array_equal(np.concatenate([p.tokens.reshape(-1, 64) for p in parts]), batch.tokens)


@pytest.mark.unit
def test_the_mindformers_style_example_config_loads_as_it_is_and_trains():
    """configs/mindformers_tiny_lm.yaml (our loader reading a MindFormers-style file) without overrides: its
    vocabulary fits the byte-level BPE, its layout and loss block are what `mf-loss train` runs."""
    from mf_loss.train.checks import check_trainable
    config = load_config(CONFIGS / "mindformers_tiny_lm.yaml")
    check_trainable(config)
    assert config["model"]["model_config"]["vocab_size"] == 8192
    assert (config.parallel["data_parallel"], config.parallel["model_parallel"]) == (2, 2)
    assert config["loss"]["type"] == "CrossEntropyLoss" and config["loss"]["calculate_per_token_loss"] is True


@pytest.mark.unit
def test_learning_rates_follow_warm_up_then_cosine():
    from mf_loss.train.trainer import learning_rates
    config = load_config(CONFIGS / "single.yaml")
    base, end, warmup, total = 3e-3, 3e-4, 20, 200
    rates = learning_rates(config)
    assert len(rates) == total
    for step in range(total):
        if step < warmup:
            expected = base * (step + 1) / warmup
        else:
            expected = end + 0.5 * (base - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert rates[step] == pytest.approx(expected, rel=1e-12), step
    constant = learning_rates(load_config(CONFIGS / "single.yaml", ["lr_schedule.type=ConstantWarmUpLR"]))
    assert constant[warmup:] == [pytest.approx(base)] * (total - warmup)


# ------------------------------------------------------------------------------------- the model's math

def _torch_llama(params: dict, tokens, mc):
    """The same Llama-style decoder, written plainly in float64 torch."""
    import torch
    hidden, heads = mc["hidden_size"], mc["num_heads"]
    head_dim = hidden // heads
    batch, seq = tokens.shape

    def rms(x, gain):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + mc["rms_norm_eps"]) * gain

    def rope(x):  # (B, heads, S, head_dim), pairs (i, i + head_dim/2) rotated by position * theta^(-2i/hd)
        frequency = mc["rope_theta"] ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * frequency[None, :]
        cos, sin = torch.cos(angle), torch.sin(angle)
        first, second = x[..., :head_dim // 2], x[..., head_dim // 2:]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], -1)

    x = params["tok_embeddings"][torch.as_tensor(tokens, dtype=torch.long)]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    for i in range(mc["num_layers"]):
        p = {name[len(f"layers.{i}."):]: value for name, value in params.items() if name.startswith(f"layers.{i}.")}
        h = rms(x, p["attention_norm"])
        q, k, v = ((h @ p[f"attention.{n}"]).reshape(batch, seq, heads, head_dim).transpose(1, 2)
                   for n in ("wq", "wk", "wv"))
        scores = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(head_dim)
        attention = torch.softmax(scores.masked_fill(causal, float("-inf")), -1) @ v
        x = x + attention.transpose(1, 2).reshape(batch, seq, hidden) @ p["attention.wo"]
        h = rms(x, p["ffn_norm"])
        x = x + (torch.nn.functional.silu(h @ p["feed_forward.w1"]) * (h @ p["feed_forward.w3"])) @ p["feed_forward.w2"]
    return rms(x, params["norm_out"]).reshape(batch * seq, hidden) @ params["head.weight"].T


@pytest.mark.unit
def test_model_logits_and_gradients_match_a_float64_torch_reference():
    import mindspore as ms
    import torch

    from mf_loss.parallel.comm import rank_layout
    from mf_loss.parallel.config import ParallelConfig
    from mf_loss.train.model import LlamaLM, initial_parameters
    mc = load_config(CONFIGS / "single.yaml", ["model.model_config.vocab_size=300", "model.model_config.hidden_size=32",
                                               "model.model_config.num_heads=4", "model.model_config.seq_length=8",
                                               "model.model_config.num_layers=1",
                                               "model.model_config.init_std=0.2"])["model"]["model_config"]
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 300, size=(2, 8)).astype(np.int32)
    weights_out = rng.standard_normal((16, 300))  # d(loss)/d(logits): a random linear functional of the logits

    model = LlamaLM(mc, rank_layout(ParallelConfig(1, 1)), seed=5)

    def objective(tokens_):
        logits_ = model(tokens_)
        return (logits_ * ms.Tensor(weights_out.astype(np.float32))).sum(), logits_

    (value, ms_logits), grads = ms.value_and_grad(objective, None, model.params, has_aux=True)(ms.Tensor(tokens))

    params = {name: torch.tensor(array, dtype=torch.float64, requires_grad=True)
              for name, array in initial_parameters(mc, 5).items()}
    logits = _torch_llama(params, tokens, mc)
    reference = (logits * torch.as_tensor(weights_out)).sum()
    reference.backward()
    np.testing.assert_allclose(ms_logits.asnumpy(), logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert float(value.asnumpy()) == pytest.approx(reference.item(), rel=1e-4)
    for name, grad in zip(model.names, grads):
        expected = params[name].grad.numpy()
        # float32 against float64: relative to the gradient's scale
        np.testing.assert_allclose(grad.asnumpy(), expected, atol=1e-4 * np.abs(expected).max(), err_msg=name)


@pytest.mark.unit
def test_a_training_step_applies_mindspores_optimizer_to_the_token_mean_gradient():
    """One step of TrainStep against nn.AdamWeightDecay's update written in NumPy (step 1, decay on matrices only):
    the optimizer gets the gradients in the model's order and the token mean's scale."""
    import mindspore as ms

    from mf_loss.parallel.comm import rank_layout
    from mf_loss.parallel.config import ParallelConfig
    from mf_loss.train.model import LlamaLM
    from mf_loss.train.trainer import build_optimizer, build_training_loss, learning_rates, train_step
    lr, decay, (beta1, beta2), eps = 1e-2, 0.1, (0.9, 0.95), 1e-5
    config = load_config(CONFIGS / "single.yaml", [
        UNFUSED, "optimizer.type=AdamW", f"optimizer.weight_decay={decay}", "optimizer.max_grad_norm=null",
        "lr_schedule.type=ConstantWarmUpLR", "lr_schedule.warmup_steps=0", f"lr_schedule.learning_rate={lr}",
        "model.model_config.vocab_size=300", "model.model_config.hidden_size=16", "model.model_config.num_heads=2",
        "model.model_config.num_layers=1", "model.model_config.seq_length=8", "parallel_config.micro_batch_num=1"])
    model = LlamaLM(config["model"]["model_config"], rank_layout(ParallelConfig(1, 1)), seed=2)
    loss = build_training_loss(config)
    step = train_step(model, loss, build_optimizer(config, list(model.params), learning_rates(config)), 1, None)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 300, size=(1, 2, 8)).astype(np.int32)
    labels = rng.integers(0, 300, size=(1, 2, 8)).astype(np.int32)
    mask = np.ones((1, 2, 8), np.float32)
    mask[0, 1, 5:] = 0
    before = [p.asnumpy().copy() for p in model.params]
    (numerator, denominator), grads = step.grad_fn(ms.Tensor(tokens[0]), ms.Tensor(labels[0]), ms.Tensor(mask[0]))
    assert float(denominator.asnumpy()) == 13
    step(ms.Tensor(tokens), ms.Tensor(labels), ms.Tensor(mask))
    for name, p0, grad, param in zip(model.names, before, grads, model.params):
        g = grad.asnumpy() / 13.0                       # the token mean's gradient
        wd = decay if p0.ndim > 1 else 0.0              # no decay on the norm gains
        m, v = (1 - beta1) * g, (1 - beta2) * g * g      # no bias correction, decoupled decay
        expected = p0 - lr * (m / (np.sqrt(v) + eps) + wd * p0)
        np.testing.assert_allclose(param.asnumpy(), expected, rtol=2e-5, atol=1e-7, err_msg=name)



@pytest.mark.unit
@pytest.mark.parametrize("split", [(), ("b",), ("a", "b"), ("c",)])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_the_shared_train_step_applies_the_clipped_token_mean_of_its_micro_batches(split, max_grad_norm):
    """step.TrainStep (both trainers' step) on a toy forward against float64 torch: gradients of the summed
    numerator over 3 micro-batches, divided once by all their counted tokens, clipped to the global norm, then
    SGD (lr 1: the update is the applied gradient). The reported norm counts every weight once, whichever are
    marked split (one process: no model-parallel group to sum over)."""
    import mindspore as ms
    import torch
    from mindspore import Parameter, Tensor, nn

    from mf_loss.train.step import TrainStep

    rng = np.random.default_rng(7)
    init = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal((5, 3)), "c": rng.standard_normal(5)}

    class Toy(nn.Cell):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (Parameter(Tensor(init[n].astype(np.float32)), name=n) for n in "abc")

        def construct(self, x, mask):
            z = ms.ops.matmul(ms.ops.tanh(ms.ops.matmul(x, self.a.T)), self.b.T) + self.c
            return ((z * z).sum(-1) * 0.5 * mask).sum(), mask.sum()

    toy = Toy()
    weights = [toy.a, toy.b, toy.c]
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    mask = (rng.random((3, 6)) < 0.7).astype(np.float32)
    step = TrainStep(toy, weights, nn.SGD(weights, learning_rate=1.0), 3, split=split, max_grad_norm=max_grad_norm)
    numerator, denominator, norm = step(Tensor(x), Tensor(mask))

    ref = {n: torch.tensor(v, requires_grad=True) for n, v in init.items()}
    xt, mt = torch.tensor(x, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)
    z = torch.tanh(xt @ ref["a"].T) @ ref["b"].T + ref["c"]
    expected_numerator = ((z * z).sum(-1) * 0.5 * mt).sum()
    expected_numerator.backward()
    grads = {n: t.grad.numpy() / mask.sum() for n, t in ref.items()}
    expected_norm = np.sqrt(sum((g * g).sum() for g in grads.values()))
    clip = min(1.0, max_grad_norm / (expected_norm + 1e-6)) if max_grad_norm else 1.0
    assert float(denominator.asnumpy()) == mask.sum()
    np.testing.assert_allclose(float(numerator.asnumpy()), float(expected_numerator.detach()), rtol=1e-5)
    np.testing.assert_allclose(float(norm.asnumpy()), expected_norm, rtol=1e-5)
    for name, param in zip("abc", weights):
        np.testing.assert_allclose(param.asnumpy(), init[name] - clip * grads[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.unit
def test_the_shared_train_step_names_an_unknown_split_weight():
    from mindspore import Parameter, Tensor, nn

    from mf_loss.train.step import TrainStep
    weight = Parameter(Tensor(np.ones((2, 2), np.float32)), name="w")
    with pytest.raises(ValueError, match=r"split names \['head'\] are not among the weights \(w\)"):
        TrainStep(nn.Dense(2, 2), [weight], nn.SGD([weight]), 1, split=("head",))



@pytest.mark.unit
def test_checkpoints_of_a_step_resume_and_load_at_full_shapes(tmp_path):
    """train/checkpoints (both trainers'): two model-parallel ranks' files of one step, step.json and latest.json;
    the full weights join the split parameter's rows; resuming names a wrong layout; old indexes are named."""
    import mindspore as ms

    from mf_loss.config_loader import ConfigError
    from mf_loss.train.checkpoints import load_full_weights, resume_source, save_step

    rng = np.random.default_rng(3)
    full = {"trunk": rng.standard_normal((3, 2)).astype(np.float32),
            "head": rng.standard_normal((4, 2)).astype(np.float32)}
    ckpt = tmp_path / "run" / "checkpoints"
    info = dict(data_parallel=1, model_parallel=2, model_parameters=["trunk", "head"], split_parameters=["head"])
    for step in (2, 4, 6):
        for rank in range(2):
            state = [ms.Parameter(ms.Tensor(full["trunk"] + step), name="trunk"),
                     ms.Parameter(ms.Tensor(full["head"][2 * rank:2 * rank + 2] + step), name="head"),
                     ms.Parameter(ms.Tensor(np.zeros(1, np.float32)), name="adam_m.trunk")]
            save_step(state, ckpt, step, rank, 1, info, keep=2, writes_index=rank == 0)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000004", "step_000006"]  # keep=2
    weights = load_full_weights(ckpt)
    assert sorted(weights) == ["head", "trunk"]
    np.testing.assert_array_equal(weights["head"], full["head"] + 6)
    np.testing.assert_array_equal(weights["trunk"], full["trunk"] + 6)
    np.testing.assert_array_equal(load_full_weights(ckpt / "step_000004")["head"], full["head"] + 4)

    step_dir, latest = resume_source(None, tmp_path / "run", 1, 2, "cfg.yaml")
    assert (step_dir, latest["step"]) == (ckpt / "step_000006", 6)
    step_dir, latest = resume_source(str(ckpt / "step_000004"), tmp_path / "other", 1, 2, "cfg.yaml")
    assert (step_dir, latest["step"]) == (ckpt / "step_000004", 4)
    with pytest.raises(ConfigError, match=r"cfg.yaml: --resume: .* data_parallel=1 x model_parallel=2, but the "
                                          r"config asks for 2 x 2"):
        resume_source(None, tmp_path / "run", 2, 2, "cfg.yaml")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        resume_source(None, tmp_path / "nothing", 1, 2, "cfg.yaml")
    old = json.loads((ckpt / "latest.json").read_text())
    del old["split_parameters"]
    (ckpt / "latest.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="has no split_parameters"):
        load_full_weights(ckpt)


# ------------------------------------------------------------------------------------- outputs and progress

@pytest.mark.unit
def test_charts_are_drawn(tmp_path):
    import matplotlib.image
    from mf_loss.train import plot
    steps = list(range(1, 51))
    loss_png = plot.loss_chart(tmp_path / "loss.png", steps, [9 / (1 + 0.1 * s) for s in steps],
                               title="test run", label="dp=2 x mp=2, fused head")
    assert matplotlib.image.imread(loss_png).shape[:2] == (450, 800)
    memory = {0: [900.0, 950.0], 1: [880.0, 940.0]}
    throughput_png = plot.throughput_chart(tmp_path / "t.png", steps, [1000.0 + s for s in steps], [1, 50], memory,
                                           title="test run")
    image = matplotlib.image.imread(throughput_png)
    assert image.shape[:2] == (650, 800) and image[..., :3].std() > 0.05  # not a blank canvas


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.unit
@pytest.mark.parametrize("terminal", [False, True])
def test_progress_shows_steps_loss_and_throughput(terminal):
    from mf_loss.train.progress import ProgressView
    out = _Terminal() if terminal else io.StringIO()
    view = ProgressView(out, log_interval=5)
    view.show({"message": "training test"})
    for step in range(3, 13):  # a run resumed at step 2
        view.show({"step": step, "total": 12, "loss": 10.0 / step, "tokens_per_s": 1234.0})
    view.close()
    text = out.getvalue()
    assert text.startswith("training test\n")
    if terminal:  # tqdm: counter, ETA and the postfix
        assert "12/12" in text and "loss 0.8333, 1,234 tok/s" in text and "\r" in text
    else:         # plain lines: the first step shown, every 5th, the last
        assert re.findall(r"step +(\d+)/12  loss (\d\.\d{4})  tok/s 1,234", text) == [
            ("3", "3.3333"), ("5", "2.0000"), ("10", "1.0000"), ("12", "0.8333")]


# ------------------------------------------------------------------------------------- real runs

def train_cli(config, output_dir, *extra, fail_at=None, timeout=420, measure_loss_time=False):
    from mf_loss.train.trainer import FAIL_ENV
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop(FAIL_ENV, None)
    if fail_at:
        env[FAIL_ENV] = fail_at
    command = [sys.executable, "-m", "mf_loss.cli", "train", "--config", str(CONFIGS / config),
               "--output-dir", str(output_dir), "--timeout", "300", f"--steps={STEPS}",
               *(f"--set={o}" for o in SMALL), f"--set=runner_config.measure_loss_time={measure_loss_time}", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_csv(run_dir):
    from mf_loss.train.curve import read_curve
    return read_curve(Path(run_dir) / "loss.csv")


def weights(run_dir):
    from mf_loss.train.checkpoints import load_full_weights
    return load_full_weights(Path(run_dir) / "checkpoints")


def processes_mentioning(text: str) -> list:
    import psutil
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["pid"] != os.getpid() and text in cmdline:
            found.append(f"{process.info['pid']}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory):
    """The single-process reference run and the dp=2 x mp=2 run that fails, started at once (the msrun job
    spends much of its time starting up): (reference, dp2_mp2_failed)."""
    reference_out, failed_out = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("dp2_mp2")
    with ThreadPoolExecutor() as pool:
        started = [pool.submit(train_cli, "single.yaml", reference_out, measure_loss_time=True),
                   pool.submit(train_cli, "dp2_mp2.yaml", failed_out, fail_at=f"1:{FAIL_STEP}")]
        reference_proc, failed_proc = (run.result() for run in started)
    return (reference_out, reference_proc), (failed_out, failed_proc)


@pytest.fixture(scope="module")
def reference(first_runs):
    """Single process, whole batch, fused head, uninterrupted."""
    out, proc = first_runs[0]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "single"
    return run_dir, read_csv(run_dir), weights(run_dir), proc.stdout


@pytest.mark.slow
def test_single_process_run_writes_its_outputs(reference):
    run_dir, curve, _, stdout = reference
    assert [row["step"] for row in curve] == list(range(1, STEPS + 1))
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.3
    assert re.search(rf"step {STEPS}/{STEPS}  loss \d\.\d{{4}}  tok/s [\d,]+", stdout), stdout[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["layout"] == "1 x 1" and summary["head"] == "fused"
    assert summary["final_loss"] == pytest.approx(curve[-1]["loss"], rel=1e-6)
    assert len(summary["peak_rss_mib_per_rank"]) == 1 and summary["peak_rss_mib_per_rank"][0] > 100
    assert summary["head_and_loss_s_per_micro_batch"] > 0 and summary["loss_share_of_step"] > 0  # measured, not judged
    for name in ("loss.png", "throughput.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert "peak resident memory per rank" in (run_dir / "summary.txt").read_text()
    events = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "step" in e] == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == STEPS


@pytest.mark.slow
def test_unfused_run_resumed_with_the_fused_head_equals_the_fused_run(reference, tmp_path):
    _, ref_curve, ref_weights, _ = reference
    # a NaN enters the loss at step 10: check_for_nan_in_loss_and_grad stops the run, naming the rank
    proc = train_cli("single.yaml", tmp_path, f"--set={UNFUSED}", fail_at=f"0:{FAIL_STEP}:nan")
    assert proc.returncode == 1
    assert ("training failed on rank 0: NonFiniteLossError: non-finite loss or gradient on rank 0 (dp 0, mp 0): "
            "1 token(s)") in proc.stderr, proc.stderr[-2000:]
    assert "The last complete checkpoint is step 8" in proc.stderr and "--resume" in proc.stderr
    run_dir = tmp_path / "single"
    assert [row["step"] for row in read_csv(run_dir)][-1] == FAIL_STEP - 1  # every completed step is kept
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["written_with_head"] == "unfused"
    proc = train_cli("single.yaml", tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 8" in proc.stdout and "fused head" in proc.stdout
    curve = read_csv(run_dir)
    assert [row["step"] for row in curve] == list(range(1, STEPS + 1))
    assert [row["counted_tokens"] for row in curve] == [row["counted_tokens"] for row in ref_curve]
    np.testing.assert_allclose([r["loss"] for r in curve], [r["loss"] for r in ref_curve], rtol=0, atol=TOLERANCE)
    final = weights(run_dir)
    for name in ref_weights:
        np.testing.assert_allclose(final[name], ref_weights[name], rtol=0, atol=TOLERANCE, err_msg=name)


@pytest.fixture(scope="module")
def dp2_mp2_failed(first_runs):
    """dp=2 x mp=2 on 4 ranks, fused head; rank 1 raises at step 10, after the step-8 checkpoint."""
    return first_runs[1]


@pytest.mark.distributed
def test_rank_failure_stops_the_job_with_a_clear_message(dp2_mp2_failed):
    out, proc = dp2_mp2_failed
    run_dir = out / "dp2_mp2"
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "failed on rank 1" in proc.stderr
    assert str(run_dir / "logs" / "worker_1.log") in proc.stderr
    assert f"InjectedFailure: injected failure on rank 1 at step {FAIL_STEP}" in proc.stderr  # the log tail
    assert "The last complete checkpoint is step 8" in proc.stderr
    assert processes_mentioning(str(run_dir)) == []
    # node 0's process showed rank 0's progress while the job ran (plain lines: not a terminal)
    assert re.search(r"step +8/12  loss \d\.\d{4}  tok/s ", proc.stdout), proc.stdout[-2000:]


@pytest.mark.distributed
def test_last_checkpoint_stays_loadable_after_the_failure(dp2_mp2_failed):
    import mindspore as ms
    out, _ = dp2_mp2_failed
    ckpt = out / "dp2_mp2" / "checkpoints"
    latest = json.loads((ckpt / "latest.json").read_text())
    assert latest["step"] == 8 and (latest["data_parallel"], latest["model_parallel"]) == (2, 2)
    for rank in range(4):
        params = ms.load_checkpoint(str(ckpt / latest["dir"] / f"rank_{rank}.ckpt"))
        assert params["head.weight"].shape == (512, 64)
        assert "adam_m.tok_embeddings" in params and int(params["global_step"].asnumpy().reshape(-1)[0]) == 8
    assert not list(ckpt.rglob(".*partial*"))


@pytest.mark.distributed
def test_dp2_mp2_resumed_with_the_unfused_head_matches_the_single_process_run(dp2_mp2_failed, reference):
    from mf_loss.train.compare import compare_runs
    out, _ = dp2_mp2_failed
    proc = train_cli("dp2_mp2.yaml", out, "--resume", f"--set={UNFUSED}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed at step 8" in proc.stdout and "unfused head" in proc.stdout
    run_dir = out / "dp2_mp2"
    assert [row["step"] for row in read_csv(run_dir)] == list(range(1, STEPS + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["peak_rss_mib_per_rank"]) == 4 and min(summary["peak_rss_mib_per_rank"]) > 100
    result = compare_runs(reference[0], run_dir)
    assert result["counted_tokens_equal"]
    assert result["loss_max_diff"] <= TOLERANCE
    assert result["weight_max_diff"] <= TOLERANCE, result["per_weight"]
    print(f"dp2 x mp2 (fused, then unfused) vs single process (fused): loss curve max |diff| "
          f"{result['loss_max_diff']:.2e}, weights max |diff| {result['weight_max_diff']:.2e}")


@pytest.mark.distributed
def test_demo_prints_the_parallel_and_single_device_results_side_by_side():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "mf_loss.cli", "demo", "--dp", "1", "--mp", "2", "--timeout", "240"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "dp=1 x mp=2" in proc.stdout and "single device" in proc.stdout
    loss_line = next(line for line in proc.stdout.splitlines() if line.startswith("loss (global token mean)"))
    parallel, single, difference = (float(v) for v in loss_line.split()[-3:])
    assert abs(parallel - single) <= TOLERANCE and difference <= TOLERANCE
    grad_line = next(line for line in proc.stdout.splitlines() if line.startswith("max |gradient difference|"))
    assert float(grad_line.split()[-1]) <= TOLERANCE
    assert "rank 1 (dp 0, mp 1): rows 0-23, vocabulary 8-15" in proc.stdout
