"""Our loss beside MindFormers' own CrossEntropyLoss on the same MindFormers Llama and corpus batch.

Used by tests/test_mindformers.py; run it (in the MindFormers environment) to print the table of differences:
    .venv-mindformers/bin/python tests/mindformers_compare.py
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # run as a script: the repository root, not tests/, first on sys.path
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from mf_loss.integrations.mindformers_train import build_model, corpus_ids, load_run_config  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mindformers_llama.yaml"
OURS = {"type": "mf_loss.CrossEntropyLoss"}                # mean over counted tokens
THEIRS = {"type": "CrossEntropyLoss"}                      # MindFormers' own, from its registry
ROWS, SEQ = 4, 32


def single_rank_config(**overrides):
    settings = {"parallel_config.data_parallel": 1, "parallel_config.model_parallel": 1,
                "model.model_config.seq_length": SEQ, "runner_config.batch_size": ROWS, **overrides}
    return load_run_config(CONFIG, [f"{k}={v}" for k, v in settings.items()])


def corpus_batch(seed: int = 0, seq: int = SEQ) -> np.ndarray:
    """(ROWS, seq+1) windows of the corpus: real text, no padding, no ignored label."""
    ids = corpus_ids("builtin")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq - 1, size=ROWS)
    return ids[starts[:, None] + np.arange(seq + 1)[None, :]].astype(np.int32)


def loss_and_grads(network, *inputs):
    """The training loss and the gradients of every trainable parameter (name -> array)."""
    params = network.trainable_params()
    loss, grads = ms.value_and_grad(network, None, params)(*inputs)
    return float(np.asarray(loss.asnumpy()).reshape(())), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def model_pair(config):
    """Two Llamas with the same weights (same seed): one with our loss, one with MindFormers'."""
    return build_model(config, OURS), build_model(config, THEIRS)


def no_ignored_tokens(config=None) -> dict:
    """Loss and parameter gradients of both models on one corpus batch; max differences."""
    config = config or single_rank_config()
    ours, theirs = model_pair(config)
    same_weights = max(float(np.abs(a.asnumpy() - b.asnumpy()).max())
                       for a, b in zip(ours.trainable_params(), theirs.trainable_params()))
    input_ids = Tensor(corpus_batch())
    loss_ours, grads_ours = loss_and_grads(ours, input_ids)
    loss_theirs, grads_theirs = loss_and_grads(theirs, input_ids)
    return {"weights_max_diff": same_weights, "loss_ours": loss_ours, "loss_theirs": loss_theirs,
            "grads_max_diff": max(float(np.abs(grads_ours[k] - grads_theirs[k]).max()) for k in grads_ours),
            "grads_max": max(float(np.abs(g).max()) for g in grads_theirs.values()),
            "grad_names": sorted(grads_ours) == sorted(grads_theirs)}


def llama_logits(config=None):
    """The Llama's float32 logits (ROWS*SEQ, V) on a corpus batch, and its labels (next tokens)."""
    config = config or single_rank_config()
    network = build_model(config, OURS)
    network.set_train(False)
    input_ids = corpus_batch(1)
    logits, _, _ = network(Tensor(input_ids[:, :-1]))
    return logits.asnumpy(), input_ids[:, 1:].reshape(-1)


def _loss_cells():
    from mindformers.core.loss import CrossEntropyLoss as TheirLoss

    from mf_loss import CrossEntropyLoss as OurLoss
    return OurLoss(), TheirLoss()


def _value_and_logit_grad(loss_fn, logits, labels, mask):
    value, grad = ms.value_and_grad(loss_fn, 0)(Tensor(logits), Tensor(labels), Tensor(mask))
    return float(np.asarray(value.asnumpy()).reshape(())), grad.asnumpy()


def ignored_token_table(ignored_fraction: float = 0.25, seed: int = 2) -> list:
    """Rows (case, MindFormers, mf_loss) measured on real Llama logits, where the two differ or might."""
    logits, labels = llama_logits()
    rng = np.random.default_rng(seed)
    ignored = rng.random(labels.shape) < ignored_fraction
    labels_ignored = np.where(ignored, -100, labels).astype(np.int32)
    ones = np.ones(labels.shape, np.float32)
    ours, theirs = _loss_cells()
    rows = []

    # ignore_index labels with mask 1 (what a dataset's loss_mask of ones gives MindFormers' Llama)
    ours_value, ours_grad = _value_and_logit_grad(ours, logits, labels_ignored, ones)
    theirs_value, theirs_grad = _value_and_logit_grad(theirs, logits, labels_ignored, ones)
    rows.append((f"loss, {ignored.sum()} of {labels.size} labels -100 with mask 1", theirs_value, ours_value))
    rows.append(("denominator (tokens counted)", float(labels.size), float((~ignored).sum())))
    rows.append(("sum of |gradient| over the ignored rows", float(np.abs(theirs_grad[ignored]).sum()),
                 float(np.abs(ours_grad[ignored]).sum())))
    rows.append(("max |gradient| on the counted rows", float(np.abs(theirs_grad[~ignored]).max()),
                 float(np.abs(ours_grad[~ignored]).max())))
    # the same labels with the mask MindFormers' Llama builds itself (label != -100): they agree
    counted = (~ignored).astype(np.float32)
    theirs_masked, _ = _value_and_logit_grad(theirs, logits, labels_ignored, counted)
    ours_masked, _ = _value_and_logit_grad(ours, logits, labels_ignored, counted)
    rows.append(("loss, the same labels with mask = (label != -100)", theirs_masked, ours_masked))
    # every token ignored
    all_ignored = np.full(labels.shape, -100, np.int32)
    rows.append(("loss, every label -100", _value_and_logit_grad(theirs, logits, all_ignored, ones)[0],
                 _value_and_logit_grad(ours, logits, all_ignored, ones)[0]))
    # a NaN in a row whose mask is 0
    poisoned = logits.copy()
    poisoned[0, 0] = np.nan
    mask = ones.copy()
    mask[0] = 0.0
    rows.append(("loss, NaN logit in a row with mask 0", _value_and_logit_grad(theirs, poisoned, labels.astype(
        np.int32), mask)[0], _value_and_logit_grad(ours, poisoned, labels.astype(np.int32), mask)[0]))
    return rows


def markdown(rows) -> str:
    lines = ["| case (real Llama logits, 4 x 32 tokens, V = 256) | MindFormers `CrossEntropyLoss` | mf_loss |",
             "| --- | --- | --- |"]
    lines += [f"| {case} | {theirs:.7g} | {ours:.7g} |" for case, theirs, ours in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    print(no_ignored_tokens())
    print(markdown(ignored_token_table()))
