"""mf_loss: vocab-parallel cross entropy for MindSpore with MindFormers' API.

The library: `ops/` pure per-shard math and the chunking of rows, `kernels/` the C++ kernels and their
build, `parallel/` the layout and the one exchange, `functional.py` the functional core, `nn/` the thin
cells (`CrossEntropyLoss`, `LinearCrossEntropyLoss`), `options.py` and `registry.py`. The tools beside it
(`launch/`, `train/`, `bench/`, `integrations/`, `cli.py`) use the library; the library never imports them.
"""
from .functional import LossOutput
from .nn.diagnostics import NonFiniteLossError
from .nn.linear_loss import LinearCrossEntropyLoss
from .nn.loss import CrossEntropyLoss
from .nn.one_call import cross_entropy, linear_cross_entropy
from .parallel.config import ParallelConfig, default_dpmp_config
from .registry import get_loss_class, register_loss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "LossOutput", "NonFiniteLossError", "ParallelConfig",
           "cross_entropy", "default_dpmp_config", "get_loss_class", "linear_cross_entropy", "register_loss"]
__version__ = "0.1.0"
