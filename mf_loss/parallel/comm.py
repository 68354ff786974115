"""The communication layer: which ranks share a vocabulary, and the one exchange they make.

Everything that talks to other ranks lives here. The loss math never calls a collective itself.
"""
from dataclasses import dataclass

import mindspore as ms
from mindspore import nn, ops
from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank

from .config import ParallelConfig

_created_groups = set()


@dataclass(frozen=True)
class RankLayout:
    """Where this process sits: global rank, data-parallel index and model-parallel index, and the
    name of the communication group of the `mp` ranks that split its vocabulary."""

    rank: int
    dp_rank: int
    mp_rank: int
    mp_size: int
    group: str

    def describe(self) -> str:
        return f"rank {self.rank} (dp {self.dp_rank}, mp {self.mp_rank})"

    def all_reduce_sum(self):
        """The one collective the loss makes: a SUM all-reduce over the model-parallel group. A layout that runs
        several ranks in one process (tests) gives its own, which adds up what every rank hands it."""
        return ops.AllReduce(ops.ReduceOp.SUM, self.group)


def rank_layout(config: ParallelConfig) -> RankLayout:
    """This process's place in `config`'s layout; creates (once) the model-parallel group it belongs to.

    Ranks are model-parallel adjacent: `rank = dp_rank * mp + mp_rank` (pipeline stages outermost).
    """
    mp = config.model_parallel
    if not GlobalComm.INITED:
        if config.world_size > 1:
            raise RuntimeError(
                f"parallel_config asks for data_parallel={config.data_parallel} x model_parallel={mp} x "
                f"pipeline_stage={config.pipeline_stage} = {config.world_size} ranks, but "
                "mindspore.communication is not initialised: launch the job with msrun and call "
                "mindspore.communication.init() before building the loss")
        return RankLayout(rank=0, dp_rank=0, mp_rank=0, mp_size=1, group=GlobalComm.WORLD_COMM_GROUP)
    world = get_group_size()
    if world != config.world_size:
        raise ValueError(
            f"parallel_config gives data_parallel={config.data_parallel} x model_parallel={mp} x "
            f"pipeline_stage={config.pipeline_stage} = {config.world_size} ranks, but the job has "
            f"world size {world}")
    rank = get_rank()
    mp_rank = rank % mp
    dp_rank = (rank // mp) % config.data_parallel
    if mp == world:
        group = GlobalComm.WORLD_COMM_GROUP
    else:
        first = rank - mp_rank
        group = f"mf_loss_mp{mp}_from{first}"
        # A rank may only create the groups it belongs to (CPU backend), so each creates its own.
        if group not in _created_groups and mp > 1:
            create_group(group, list(range(first, first + mp)))
            _created_groups.add(group)
    return RankLayout(rank=rank, dp_rank=dp_rank, mp_rank=mp_rank, mp_size=mp, group=group)


def data_parallel_group(config: ParallelConfig, mp_rank: int):
    """The group of ranks holding the same vocabulary slice (same model-parallel rank), for a training step's
    gradient all-reduce; created once per process; None when data_parallel is 1."""
    dp, mp = config.data_parallel, config.model_parallel
    if dp == 1:
        return None
    if mp == 1:
        return GlobalComm.WORLD_COMM_GROUP
    group = f"mf_loss_dp{dp}_mp{mp_rank}"
    if group not in _created_groups:
        create_group(group, [d * mp + mp_rank for d in range(dp)])
        _created_groups.add(group)
    return group


class RowStatsExchange(nn.Cell):
    """Gathers every model-parallel rank's per-row statistics: (N, K) here -> (mp, N, K) everywhere.

    Built as ONE sum all-reduce of a zero buffer in which each rank fills its own slot: adding zeros
    is exact, it works on sub-groups on every backend (CPU has no sub-group all-gather and no MAX
    all-reduce), and it costs mp * N * K floats, never anything vocabulary sized.
    With mp = 1 it is a reshape and no collective is issued.
    """

    def __init__(self, layout: RankLayout):
        super().__init__()
        self.mp_size = layout.mp_size
        self.mp_rank = layout.mp_rank
        if self.mp_size > 1:
            self.all_reduce = layout.all_reduce_sum()
        self.zeros = ops.Zeros()
        self.concat = ops.Concat(0)

    def construct(self, stats):
        slot = stats.reshape((1,) + stats.shape)
        if self.mp_size == 1:
            return slot
        rows, cols = stats.shape
        parts = []
        if self.mp_rank > 0:
            parts.append(self.zeros((self.mp_rank, rows, cols), ms.float32))
        parts.append(slot)
        if self.mp_rank < self.mp_size - 1:
            parts.append(self.zeros((self.mp_size - 1 - self.mp_rank, rows, cols), ms.float32))
        return self.all_reduce(self.concat(parts))

    def bytes_per_call(self, rows: int, cols: int) -> int:
        """Bytes all-reduced for an (rows, cols) statistics block as handed to construct (the loss sends
        N token rows plus one row carrying its logits width)."""
        return 0 if self.mp_size == 1 else self.mp_size * rows * cols * 4


class ModelParallelSum(nn.Cell):
    """SUM over the model-parallel group (identity when mp = 1): the lm head's input gradient, of which each
    rank holds only the share of its vocabulary slice (Megatron's copy-to-tensor-parallel backward)."""

    def __init__(self, layout: RankLayout):
        super().__init__()
        self.mp_size = layout.mp_size
        if self.mp_size > 1:
            self.all_reduce = layout.all_reduce_sum()

    def construct(self, x):
        if self.mp_size == 1:
            return x
        return self.all_reduce(x)
