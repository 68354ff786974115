"""`mf-loss demo`: the loss and gradients of one fixed random batch on dp x mp msrun ranks, beside the
same computation on one device.

Each rank takes its data-parallel rows and its model-parallel slice of the vocabulary, computes the
per-token loss (numerator, denominator) with CrossEntropyLoss and the gradient of the numerator w.r.t.
its logits slice, and saves them. The parent sums numerators and denominators over data-parallel ranks,
places every gradient slice, divides once by the global token count, and prints both results.
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from .run import WORKER, TrainError, check_port, worker_env

IGNORE_INDEX = -100


def make_problem(rows: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    labels = rng.integers(0, vocab, size=rows).astype(np.int32)
    labels[rng.random(rows) < 0.1] = IGNORE_INDEX
    mask = (rng.random(rows) >= 0.1).astype(np.float32)
    # always some ignored and masked tokens, all in the first rows: data-parallel ranks count differently
    labels[1:rows // 4:2] = IGNORE_INDEX
    mask[2] = 0.0
    return logits, labels, mask


def loss_and_grad(logits, labels, mask, parallel_config):
    """(numerator, denominator, d numerator / d logits) with the project's loss, on this rank."""
    import mindspore as ms
    from mindspore import Tensor
    from mf_loss import CrossEntropyLoss
    loss = CrossEntropyLoss(parallel_config=parallel_config, calculate_per_token_loss=True,
                            ignore_index=IGNORE_INDEX)

    def numerator(x):
        num, den = loss(x, Tensor(labels), Tensor(mask))
        return num, den

    (num, den), grad = ms.value_and_grad(numerator, 0, has_aux=True)(Tensor(logits))
    return float(num.asnumpy()), float(den.asnumpy()), grad.asnumpy()


def rank_main(out: str, spec_json: str) -> int:
    from mindspore.communication import get_rank
    spec = json.loads(spec_json)
    dp, mp = spec["dp"], spec["mp"]
    rank = get_rank()
    dp_rank, mp_rank = rank // mp, rank % mp
    logits, labels, mask = make_problem(spec["rows"], spec["vocab"], spec["seed"])
    rows, cols = spec["rows"] // dp, spec["vocab"] // mp
    r, c = slice(dp_rank * rows, (dp_rank + 1) * rows), slice(mp_rank * cols, (mp_rank + 1) * cols)
    num, den, grad = loss_and_grad(np.ascontiguousarray(logits[r, c]), labels[r], mask[r],
                                   {"data_parallel": dp, "model_parallel": mp})
    np.savez(Path(out) / f"rank_{rank}.npz", num=num, den=den, grad=grad)
    return 0


def demo_command(dp=2, mp=2, rows=24, vocab=16, seed=0, port=None, timeout=300.0, out=sys.stdout) -> int:
    if rows % dp or vocab % mp:
        raise TrainError(f"--rows {rows} must be divisible by --dp {dp} and --vocab {vocab} by --mp {mp}")
    if port is not None:
        check_port(port)
    from ..launch import launch
    spec = {"dp": dp, "mp": mp, "rows": rows, "vocab": vocab, "seed": seed}
    work = Path(tempfile.mkdtemp(prefix="mf_loss_demo_"))
    print(f"starting {dp * mp} msrun ranks (dp={dp} x mp={mp}; ~30 s start-up); logs in {work / 'logs'}",
          file=out, flush=True)
    result = launch(str(WORKER), ["demo", "--out", str(work), "--spec", json.dumps(spec)], workers=dp * mp,
                    log_dir=str(work / "logs"), timeout=timeout, env=worker_env(), port=port, quiet=True)
    if not result.ok:
        raise TrainError(result.message)

    logits, labels, mask = make_problem(rows, vocab, seed)
    num_1, den_1, grad_1 = loss_and_grad(logits, labels, mask, None)
    grad_1 = grad_1 / max(den_1, 1.0)
    num_p = den_p = 0.0
    grad_p = np.zeros_like(logits)
    per_rank = []
    for rank in range(dp * mp):
        part = np.load(work / f"rank_{rank}.npz")
        dp_rank, mp_rank = rank // mp, rank % mp
        if mp_rank == 0:  # every model-parallel rank of a row block holds the same loss sums
            num_p += float(part["num"])
            den_p += float(part["den"])
        r0, c0 = dp_rank * (rows // dp), mp_rank * (vocab // mp)
        grad_p[r0:r0 + rows // dp, c0:c0 + vocab // mp] = part["grad"]
        per_rank.append(f"  rank {rank} (dp {dp_rank}, mp {mp_rank}): rows {r0}-{r0 + rows // dp - 1}, vocabulary "
                        f"{c0}-{c0 + vocab // mp - 1}: loss sum {float(part['num']):.6f} over "
                        f"{float(part['den']):g} tokens")
    grad_p = grad_p / max(den_p, 1.0)
    loss_1, loss_p = num_1 / max(den_1, 1.0), num_p / max(den_p, 1.0)
    width = 28
    print(f"\nfixed batch: {rows} tokens, vocabulary {vocab}, seed {seed}, "
          f"{int((labels == IGNORE_INDEX).sum())} ignore_index labels, {int((mask == 0).sum())} masked", file=out)
    print(f"{'':<{width}}{'dp=%d x mp=%d' % (dp, mp):>18}{'single device':>18}{'|difference|':>16}", file=out)
    print(f"{'loss (global token mean)':<{width}}{loss_p:>18.8f}{loss_1:>18.8f}{abs(loss_p - loss_1):>16.2e}", file=out)
    print(f"{'counted tokens':<{width}}{den_p:>18g}{den_1:>18g}{abs(den_p - den_1):>16g}", file=out)
    norm_p, norm_1 = float(np.linalg.norm(grad_p)), float(np.linalg.norm(grad_1))
    print(f"{'gradient norm':<{width}}{norm_p:>18.8f}{norm_1:>18.8f}{abs(norm_p - norm_1):>16.2e}", file=out)
    print(f"{'max |gradient difference|':<{width}}{'':>36}{float(np.abs(grad_p - grad_1).max()):>16.2e}", file=out)
    print("per rank:", file=out)
    print("\n".join(per_rank), file=out)
    return 0
