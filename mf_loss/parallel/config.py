"""The data/model-parallel layout a loss runs under, in MindFormers' terms."""
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are split: `data_parallel` x `model_parallel` (x `pipeline_stage`).

    Ranks are laid out model-parallel-adjacent: `rank = (stage * dp + dp_rank) * mp + mp_rank`.
    """

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel_config.{field.name} must be a positive int, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


default_dpmp_config = ParallelConfig()


def as_parallel_config(config) -> ParallelConfig:
    """Accepts our ParallelConfig, a dict, None, or any object with `data_parallel`/`model_parallel`
    attributes (MindFormers' OpParallelConfig and TransformerOpParallelConfig work as they are)."""
    if config is None:
        return default_dpmp_config
    if isinstance(config, ParallelConfig):
        return config
    if isinstance(config, dict):
        known = {f.name for f in fields(ParallelConfig)}
        # MindFormers' YAML blocks carry more keys (micro_batch_num, vocab_emb_dp, ...) that the loss
        # does not use; only the layout keys matter here, the YAML loader validates the rest.
        return ParallelConfig(**{k: v for k, v in config.items() if k in known})
    if hasattr(config, "data_parallel") and hasattr(config, "model_parallel"):
        return ParallelConfig(data_parallel=config.data_parallel, model_parallel=config.model_parallel,
                              pipeline_stage=getattr(config, "pipeline_stage", 1))
    raise TypeError("parallel_config must be a ParallelConfig, a dict, or an object with data_parallel and "
                    f"model_parallel attributes, got {type(config).__name__}")
