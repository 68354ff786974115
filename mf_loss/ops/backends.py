"""Which implementation of the two per-shard steps (row statistics, logits gradient) a loss uses.

Both backends expose `local_row_stats` and `logits_grad` with the signatures of `shard_math`; the
composed one is MindSpore ops (every device), the fused one is a one-pass C++ kernel (CPU).
"""
from types import SimpleNamespace

from . import shard_math


def select(backend: str) -> SimpleNamespace:
    if backend == "composed" or backend == "auto":
        return SimpleNamespace(name="composed", local_row_stats=shard_math.local_row_stats,
                               logits_grad=shard_math.logits_grad)
    raise ValueError(f"backend={backend!r} is not available in this build; use 'auto' or 'composed'")
