"""The implementations the benchmark compares, and the adapters that build one measured step of each.

Two families, each measured on the same inputs within the family:
  logits rows  a cross entropy on given (rows, vocab) logits (or, with --lm-head H, on logits made inside the
               step from a (rows, H) hidden state by a fixed head), gradient w.r.t. the input;
  head rows    (--head H) the lm head and the loss: hidden (rows, H), head_weight (vocab, H), labels; the
               gradient w.r.t. hidden AND head_weight.
An adapter returns `Steps`: per pass ("fwd": the loss value; "fwdbwd": value and gradients) a `prepare`
(GRAPH compilation, outside the measured step) and a `run` (one step, synchronised, checked finite)."""
import math
from dataclasses import dataclass, field

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def mindspore_dtype(name: str):
    """The MindSpore dtype of a benchmark dtype name (MindSpore imported only when asked)."""
    import mindspore as ms
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[name]


@dataclass(frozen=True)
class Implementation:
    label: str
    family: str            # "logits" or "head"
    framework: str         # "mindspore" or "torch"
    graph: bool = True     # MindSpore mode: GRAPH (compiled before the measured step) or PYNATIVE
    memory_factor: float = 4.0  # peak beyond the inputs in logits sizes (measured here, rounded up): a run
                                # that would not fit in the available memory is skipped, not swapped


IMPLS = {
    "fused": Implementation("mf_loss fused (GRAPH)", "logits", "mindspore", memory_factor=1.3),
    "fused_pynative": Implementation("mf_loss fused (PYNATIVE)", "logits", "mindspore", False, 2.3),
    "fused_inplace": Implementation("mf_loss fused, in-place backward (PYNATIVE)", "logits", "mindspore", False, 1.3),
    "fused_inplace_graph": Implementation("mf_loss fused, in-place backward (GRAPH)", "logits", "mindspore",
                                          memory_factor=1.3),
    "composed": Implementation("mf_loss composed (GRAPH)", "logits", "mindspore", memory_factor=3.0),
    "composed_pynative": Implementation("mf_loss composed (PYNATIVE)", "logits", "mindspore", False, 3.0),
    "mint": Implementation("mint.nn.functional.cross_entropy (GRAPH)", "logits", "mindspore", memory_factor=3.3),
    "ops": Implementation("ops.cross_entropy (GRAPH)", "logits", "mindspore", memory_factor=20.0),
    "mindformers": Implementation("MindFormers-style one-hot (GRAPH)", "logits", "mindspore", memory_factor=22.0),
    "torch": Implementation("torch F.cross_entropy (eager)", "logits", "torch", memory_factor=3.3),
    "linear_fused": Implementation("mf_loss LinearCrossEntropyLoss (GRAPH)", "head", "mindspore", memory_factor=1.0),
    "linear_fused_recompute": Implementation("mf_loss LinearCrossEntropyLoss, recompute (GRAPH)", "head",
                                             "mindspore", memory_factor=1.0),
    "linear_fused_pynative": Implementation("mf_loss LinearCrossEntropyLoss (PYNATIVE)", "head", "mindspore",
                                            False, 1.5),
    "linear_unfused": Implementation("matmul + mf_loss fused CE (GRAPH)", "head", "mindspore", memory_factor=3.3),
    "linear_mint": Implementation("matmul + mint cross_entropy (GRAPH)", "head", "mindspore", memory_factor=4.3),
    "torch_linear": Implementation("torch F.linear_cross_entropy, chunked", "head", "torch", memory_factor=1.5),
    "torch_linear_unchunked": Implementation("torch matmul + F.cross_entropy", "head", "torch", memory_factor=4.3),
}
DEFAULT_IMPLS = ("fused", "composed", "mint", "ops", "mindformers", "torch")
DEFAULT_HEAD_IMPLS = ("linear_fused", "linear_unfused", "linear_mint", "torch_linear", "torch_linear_unchunked")
# the implementation every other one of its family is paired with and compared to
ANCHOR = {"logits": "fused", "head": "linear_fused"}


@dataclass
class Steps:
    passes: dict                # pass name -> (prepare, run)
    logits_bytes: int           # the size the logits have (or would have) in the input dtype
    excluded_bytes: int = 0     # the gradients of the head rows' inputs: results, not counted in the peak
    notes: dict = field(default_factory=dict)


def logits_bytes(config) -> int:
    return config["rows"] * config["vocab"] * DTYPE_BYTES[config["dtype"]]


def make_inputs(config):
    """The family's inputs as float32/int32 NumPy arrays, the same for every implementation (one seed)."""
    import numpy as np

    rng = np.random.default_rng(config.get("seed", 0))
    rows, vocab = config["rows"], config["vocab"]
    label = rng.integers(0, vocab, rows).astype(np.int32)
    if config.get("head"):
        width = config["head"]
        hidden = rng.standard_normal((rows, width), dtype=np.float32)
        head_weight = rng.standard_normal((vocab, width), dtype=np.float32) / np.float32(math.sqrt(width))
        return dict(hidden=hidden, head_weight=head_weight, label=label)
    width = config.get("lm_head", 0)
    x = rng.standard_normal((rows, width or vocab), dtype=np.float32)
    head = rng.standard_normal((width, vocab), dtype=np.float32) / np.float32(math.sqrt(width)) if width else None
    return dict(x=x, fixed_head=head, label=label)


def build_steps(config) -> Steps:
    impl = IMPLS[config["impl"]]
    if impl.framework == "torch":
        return _torch_steps(config)
    return _mindspore_steps(config)


# --- MindSpore ------------------------------------------------------------------------------------------

def _sync():
    """Waits for MindSpore's queued work (PYNATIVE runs kernels asynchronously)."""
    from mindspore.graph.api import _pynative_executor
    _pynative_executor.sync()


def _mf_loss_cell(name):
    import mf_loss
    from .ms_cells import MaskedLoss

    backend = "composed" if name.startswith("composed") else "fused"
    inplace = name.startswith("fused_inplace")
    loss = mf_loss.CrossEntropyLoss(backend=backend, inplace_backward=inplace)
    core = getattr(loss, "core", None)
    used = (getattr(core, "backend", backend), getattr(core, "inplace", inplace))
    if used != (backend, inplace):
        raise RuntimeError(f"asked for backend={backend} inplace={inplace}, got {used[0]} {used[1]}")
    return MaskedLoss(loss)


def _logits_loss_cell(name, config):
    from mindspore import mint, ops

    from .ms_cells import FrameworkLoss, MindFormersStyle

    upcast = config["dtype"] == "bfloat16"
    if name in ("fused", "fused_pynative", "fused_inplace", "fused_inplace_graph", "composed", "composed_pynative"):
        return _mf_loss_cell(name)
    if name == "mint":
        return FrameworkLoss(mint.nn.functional.cross_entropy, upcast)
    if name == "ops":
        return FrameworkLoss(ops.cross_entropy, upcast)
    if name == "mindformers":
        return MindFormersStyle(config["vocab"])
    raise ValueError(f"{name!r} is not a MindSpore logits implementation")


def head_loss_cell(name, config, notes, parallel_config=None, mp=1):
    """The cell of a head row; `notes` receives what the fused loss chose (options, backend, chunk rows)."""
    from mindspore import mint

    import mf_loss
    from .ms_cells import FrameworkLoss, FusedHeadLoss, LinearThenLoss, MaskedLoss

    upcast = config["dtype"] == "bfloat16"
    if name in ("linear_fused", "linear_fused_pynative", "linear_fused_recompute"):
        options = dict(config.get("linear_options", {}))
        if name == "linear_fused_recompute":
            options["grad_mode"] = "recompute"
        loss = mf_loss.LinearCrossEntropyLoss(**({"parallel_config": parallel_config} if parallel_config else {}),
                                              **options)
        notes["linear_options"] = options
        if isinstance(getattr(loss, "backend", None), str):
            notes["backend"] = loss.backend
        core = getattr(loss, "core", None)
        if hasattr(loss, "recomputes"):  # the design a call with this dtype takes ("auto" looks at the dtype)
            notes["grad_mode"] = "recompute" if loss.recomputes(mindspore_dtype(config["dtype"])) else "forward"
        if notes.get("grad_mode") == "recompute":  # the backend's unit: classes per block (fused), rows (composed)
            notes["recompute_block"] = core.head_block(config["rows"], config["head"], config["vocab"] // mp)
        elif hasattr(core, "chunk_rows"):
            notes["chunk_rows"] = core.chunk_rows(config["rows"], config["vocab"] // mp)
        return FusedHeadLoss(loss)
    if name == "linear_unfused":
        loss = mf_loss.CrossEntropyLoss(**({"parallel_config": parallel_config} if parallel_config else {}),
                                        backend="fused")
        return LinearThenLoss(MaskedLoss(loss), upcast)
    if name == "linear_mint":
        return LinearThenLoss(FrameworkLoss(mint.nn.functional.cross_entropy, False), upcast)
    raise ValueError(f"{name!r} is not a MindSpore head implementation")


def mindspore_passes(cell, args, grad_position, graph, name):
    """{"fwd": (prepare, run), "fwdbwd": (prepare, run)} of `cell` on `args`."""
    from .ms_cells import ValueAndGrad

    cells = {"fwd": cell, "fwdbwd": ValueAndGrad(cell, grad_position)}

    def make(pass_name):
        measured = cells[pass_name]

        def prepare():
            if graph:
                measured.compile(*args)

        def run():
            out = measured(*args)
            _sync()
            value = out[0] if isinstance(out, tuple) else out
            if not math.isfinite(float(value.asnumpy())):
                raise FloatingPointError(f"{name} returned a non-finite loss")

        return prepare, run

    return {pass_name: make(pass_name) for pass_name in cells}


def _mindspore_steps(config) -> Steps:
    import numpy as np

    import mindspore as ms
    from mindspore import Tensor

    from .ms_cells import FixedHeadThenLoss

    name = config["impl"]
    graph = IMPLS[name].graph
    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE, device_target="CPU")
    ms_dtype = mindspore_dtype(config["dtype"])
    arrays = make_inputs(config)
    label = Tensor(arrays.pop("label"))
    mask = Tensor(np.ones(config["rows"], np.float32))
    steps = Steps({}, logits_bytes(config))
    if config.get("head"):
        cell = head_loss_cell(name, config, steps.notes)
        hidden = Tensor(arrays.pop("hidden"), dtype=ms_dtype)  # converted on the host; the arrays are freed
        head_weight = Tensor(arrays.pop("head_weight"), dtype=ms_dtype)
        steps.excluded_bytes = (hidden.size + head_weight.size) * DTYPE_BYTES[config["dtype"]]
        steps.passes = mindspore_passes(cell, (hidden, head_weight, label, mask), (0, 1), graph, name)
        return steps
    cell = _logits_loss_cell(name, config)
    if arrays["fixed_head"] is not None:
        cell = FixedHeadThenLoss(cell, Tensor(arrays.pop("fixed_head"), dtype=ms_dtype))
    x = Tensor(arrays.pop("x"), dtype=ms_dtype)
    steps.passes = mindspore_passes(cell, (x, label, mask), 0, graph, name)
    return steps


# --- torch ----------------------------------------------------------------------------------------------

def _torch_linear_options(rows, width, vocab, dtype):
    """torch's chunking options for F.linear_cross_entropy (its defaults, "auto"), and what torch resolves
    them to for this shape (a private method: reported when present)."""
    import dataclasses

    import torch
    options = torch.nn.LinearCrossEntropyOptions()
    try:
        resolved = options._adjust(rows, width, vocab, dtype, torch.device("cpu"))
        described = {k: str(v) for k, v in dataclasses.asdict(resolved).items()}
    except Exception as error:  # noqa: BLE001 - informative only
        described = {"resolved": f"unknown ({type(error).__name__}: {error})"}
    return options, dict(requested="LinearCrossEntropyOptions() (torch's auto defaults)", **described)


def _torch_steps(config) -> Steps:
    import torch
    import torch.nn.functional as F

    name, rows, vocab = config["impl"], config["rows"], config["vocab"]
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[config["dtype"]]
    arrays = make_inputs(config)
    label = torch.from_numpy(arrays.pop("label")).long()
    steps = Steps({}, logits_bytes(config))
    if config.get("head"):
        hidden = torch.from_numpy(arrays.pop("hidden")).to(torch_dtype)
        head_weight = torch.from_numpy(arrays.pop("head_weight")).to(torch_dtype)
        inputs = (hidden, head_weight)
        steps.excluded_bytes = (hidden.numel() + head_weight.numel()) * DTYPE_BYTES[config["dtype"]]
        if name == "torch_linear":
            options, steps.notes["torch_options"] = _torch_linear_options(rows, config["head"], vocab, torch_dtype)

            def loss_of(h, w):
                return F.linear_cross_entropy(h, w, label, options=options)
        elif name == "torch_linear_unchunked":
            def loss_of(h, w):
                return F.cross_entropy(h @ w.T, label)
        else:
            raise ValueError(f"{name!r} is not a torch head implementation")
    else:
        x = torch.from_numpy(arrays.pop("x")).to(torch_dtype)
        fixed = arrays.pop("fixed_head")
        fixed = torch.from_numpy(fixed).to(torch_dtype) if fixed is not None else None
        inputs = (x,)

        def loss_of(x):
            return F.cross_entropy(x if fixed is None else x @ fixed, label)

    def check(value):
        if not math.isfinite(float(value)):
            raise FloatingPointError(f"{name} returned a non-finite loss")

    def fwd():
        with torch.no_grad():
            check(loss_of(*inputs))

    def fwdbwd():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        value = loss_of(*leaves)
        value.backward()
        check(value)
        if any(leaf.grad is None for leaf in leaves):
            raise RuntimeError(f"{name}: no gradient reached an input")

    steps.passes = {"fwd": (lambda: None, fwd), "fwdbwd": (lambda: None, fwdbwd)}
    return steps
