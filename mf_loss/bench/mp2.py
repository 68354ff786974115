"""The model-parallel rows: 2 msrun ranks (mf_loss.launch), each holding half of the vocabulary, GRAPH mode.
Per design: time per step on each rank, and the collectives and bytes of one compiled forward+backward
step, counted in the graph MindSpore executes (its last IR dump), not taken from our own bookkeeping."""
import glob
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from . import measure

MP = 2
COLLECTIVES = ("AllReduce", "AllGather", "Broadcast", "ReduceScatter", "AlltoAll")
_ITEM_BYTES = {"Float32": 4, "Float16": 2, "BFloat16": 2, "Int32": 4, "Int64": 8, "Float64": 8, "Bool": 1}
_OUTPUT = re.compile(r"->\s*\(<Tensor\[(\w+)\],\s*\(([\d,\s]*)\)")
# logits rows: mf_loss.CrossEntropyLoss backends; head rows: the fused head with the hidden gradient
# completed inside the loss (default) or left as this rank's share, and the unfused matmul + fused loss
LOGITS_DESIGNS = ("fused", "composed")
HEAD_DESIGNS = ("linear_fused", "linear_fused_recompute", "linear_fused_share", "linear_unfused")
DESIGN_NOTES = {
    "linear_fused": "LinearCrossEntropyLoss, default grad_mode (float32: gradient made in the forward; half "
                    "precision: recompute), complete_hidden_grad=True: hidden's gradient summed inside the loss",
    "linear_fused_recompute": "LinearCrossEntropyLoss, grad_mode='recompute' (logits made again in the backward, "
                              "a vocabulary block at a time), complete_hidden_grad=True",
    "linear_fused_share": "LinearCrossEntropyLoss, complete_hidden_grad=False: hidden's gradient is this rank's "
                          "share (a model's copy-to-model-parallel op sums it)",
    "linear_unfused": "matmul + CrossEntropyLoss(backend='fused'): hidden's gradient is this rank's share",
}


def collectives_in_ir(ir_dir) -> dict:
    """Collective calls and the bytes of their outputs in the last numbered IR file MindSpore wrote (the
    executed graph, backward included)."""
    numbered = {}
    for path in glob.glob(os.path.join(ir_dir, "**", "*.ir"), recursive=True):
        match = re.search(r"_(\d{4})\.ir$", path)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        return dict(error=f"no IR files in {ir_dir}")
    lines = Path(numbered[max(numbered)]).read_text().splitlines()
    calls = []
    for index, line in enumerate(lines):
        for name in COLLECTIVES:
            if f"= {name}(" not in line and f"= PrimFunc_{name}(" not in line:
                continue
            found = next((m for m in map(_OUTPUT.search, lines[index:index + 6]) if m), None)
            shape = [int(s) for s in found.group(2).split(",") if s.strip()] if found else None
            size = _ITEM_BYTES.get(found.group(1), 4) if found else None
            calls.append(dict(collective=name, shape=shape, dtype=found.group(1) if found else None,
                              bytes=(size * _product(shape)) if shape is not None else None))
    return dict(ir_file=os.path.basename(numbered[max(numbered)]), calls=calls,
                counts={name: sum(c["collective"] == name for c in calls) for name in COLLECTIVES},
                bytes_per_step=sum(c["bytes"] or 0 for c in calls))


def _product(shape):
    out = 1
    for size in shape:
        out *= size
    return out


def _design_cell(design, config, parallel_config, notes):
    from . import impls

    if design in LOGITS_DESIGNS:
        import mf_loss
        from .ms_cells import MaskedLoss
        return MaskedLoss(mf_loss.CrossEntropyLoss(parallel_config=parallel_config, backend=design))
    name = "linear_fused" if design == "linear_fused_share" else design
    if design == "linear_fused_share":
        config = dict(config, linear_options=dict(config.get("linear_options", {}), complete_hidden_grad=False))
    return impls.head_loss_cell(name, config, notes, parallel_config, MP)


def run_rank(config: dict) -> None:
    """One msrun rank: every design in turn; writes OUT/rank<r>.json."""
    import numpy as np

    import mindspore as ms
    from mindspore import Tensor
    from mindspore.communication import get_rank, init

    from mf_loss import ParallelConfig
    from mf_loss.launch import mark_rank_done

    from . import impls

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    rank = get_rank()
    rows, vocab, dtype, head = config["rows"], config["vocab"], config["dtype"], config.get("head", 0)
    local = vocab // MP
    ms_dtype = impls.mindspore_dtype(dtype)
    arrays = impls.make_inputs(config)  # one seed: the same labels and hidden state on both ranks
    label, mask = Tensor(arrays["label"]), Tensor(np.ones(rows, np.float32))
    if head:
        mine = slice(rank * local, (rank + 1) * local)  # this rank's rows of the output weight
        args = (Tensor(arrays["hidden"], dtype=ms_dtype), Tensor(arrays["head_weight"][mine], dtype=ms_dtype),
                label, mask)
        grad_position = (0, 1)
    else:
        full = np.random.default_rng(config.get("seed", 0) + 1 + rank).standard_normal((rows, local), np.float32)
        args = (Tensor(full, dtype=ms_dtype), label, mask)
        grad_position = 0
    del arrays
    report = dict(rank=rank, rows=rows, vocab=vocab, local_vocab=local, dtype=dtype, head=head, designs={})
    for design in config["designs"]:
        notes = {}
        cell = _design_cell(design, config, ParallelConfig(model_parallel=MP), notes)
        declared = getattr(getattr(cell, "loss", None), "collectives_per_call", None)
        if declared is not None:  # what the loss says it issues, beside what the IR shows
            notes["declared_collectives"] = declared(rows, local, ms_dtype)
        prepare, run = impls.mindspore_passes(cell, args, grad_position, True, design)["fwdbwd"]
        ir_dir = tempfile.mkdtemp(prefix=f"ir_{design}_rank{rank}_", dir=config["out"])
        ms.set_context(save_graphs=1, save_graphs_path=ir_dir)
        try:
            prepare()
            ms.set_context(save_graphs=0)
            run()
            wall, _ = measure.time_steps(run, config["warmup"], config["repeats"])
        except Exception as error:  # noqa: BLE001 - a design that fails (both ranks alike: a compile error)
            # is reported, and the other designs still run
            ms.set_context(save_graphs=0)
            message = str(error).strip().splitlines()
            report["designs"][design] = dict(error=f"{type(error).__name__}: {message[0] if message else ''}"[:600])
            continue
        report["designs"][design] = dict(median_s=statistics.median(wall), min_s=min(wall), times_s=wall,
                                         collectives=collectives_in_ir(ir_dir), notes=notes,
                                         about=DESIGN_NOTES.get(design, ""))
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(report))
    mark_rank_done(rank)


def run_mp2(shape, dtype, head, warmup, repeats, timeout, linear_options=None) -> dict:
    """Launches the 2 ranks and gathers their reports."""
    from mf_loss.launch import launch

    from .runner import worker_env

    rows, vocab = shape
    if vocab % MP:
        return dict(ok=False, message=f"vocabulary {vocab} is not divisible by mp={MP}", rows=rows, vocab=vocab,
                    dtype=dtype, head=head, mp=MP, ranks=[])
    out = Path(tempfile.mkdtemp(prefix="mf_loss_bench_mp2_"))
    config = dict(rows=rows, vocab=vocab, dtype=dtype, head=head, designs=list(HEAD_DESIGNS if head else LOGITS_DESIGNS),
                  warmup=warmup, repeats=repeats, out=str(out), seed=0, linear_options=linear_options or {})
    started = time.perf_counter()
    status = launch(str(Path(__file__).with_name("__main__.py")), ["--mp2-rank", json.dumps(config)], workers=MP,
                    log_dir=str(out / "logs"), timeout=timeout, env=worker_env(), quiet=True)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return dict(ok=status.ok and len(ranks) == MP, message="" if status.ok else status.message, rows=rows,
                vocab=vocab, dtype=dtype, head=head, mp=MP, wall_s=time.perf_counter() - started, ranks=ranks,
                log_dir=str(out))
