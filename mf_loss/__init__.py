"""mf_loss: vocab-parallel cross entropy for MindSpore with MindFormers' API.

Layout: `ops/` pure per-shard math and kernels (no communication), `parallel/` the layout and the one
exchange, `nn/` the thin cells on top.
"""
from .nn.loss import CrossEntropyLoss, NonFiniteLossError
from .parallel.config import ParallelConfig, default_dpmp_config
from .registry import get_loss_class, register_loss

__all__ = ["CrossEntropyLoss", "NonFiniteLossError", "ParallelConfig", "default_dpmp_config",
           "get_loss_class", "register_loss"]
__version__ = "0.1.0"
