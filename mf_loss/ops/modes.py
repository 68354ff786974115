"""How a call runs: compiled (GRAPH mode, ms.jit) or eagerly (PYNATIVE), and whether anything differentiates it.

Callers test these in an `if ...:  # @jit.cond: True` line, which MindSpore's parser takes as a constant branch.
"""
import mindspore as ms

try:  # True while MindSpore compiles a graph (GRAPH mode, ms.jit), False when running eagerly
    from mindspore.graph.api import _run_in_jit as run_in_jit
except ImportError:  # pragma: no cover - other MindSpore layouts
    def run_in_jit():
        return False

from mindspore.graph.api import _pynative_executor


def eager_without_grad() -> bool:
    """True for a PYNATIVE call that nothing differentiates (an evaluation loop); False in GRAPH mode, where
    the compiler drops whatever the outputs do not need."""
    if run_in_jit() or ms.get_context("mode") == ms.GRAPH_MODE:  # @jit.cond: True
        return False
    return not _pynative_executor.requires_grad()
