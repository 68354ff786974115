"""MindFormers integration: our losses in MindFormers' LOSS registry, and a Llama whose output layer is split
over the model-parallel ranks and feeds our vocabulary-parallel loss.

Importing this module imports MindFormers (build its environment with `bash scripts/mindformers_env.sh`) and
registers:
- every loss of `mf_loss.registry` (CrossEntropyLoss, LinearCrossEntropyLoss when the library has it) as a
  MindFormers LOSS under the name `mf_loss.<Name>` (MindFormers has its own `CrossEntropyLoss`), so
  `mindformers.core.build_loss({"type": "mf_loss.CrossEntropyLoss", ...})` builds ours;
- `VocabParallelLlamaForCausalLM` under MODELS, selectable with `model.arch.type` in a MindFormers YAML;
- `mf_loss.CPUTrainOneStepCell` under WRAPPER: MindFormers' MFTrainOneStepCell whose overflow check runs on CPU
  (`runner_wrapper.type` for MindFormers' own Trainer on CPU; on other devices it is MFTrainOneStepCell);
- `mf_loss.LossCurve` under CALLBACK: the loss curve of MindFormers' own Trainer as loss.csv.

How the Llama runs on dp x mp ranks (stand-alone mode on each rank, the vocabulary split done by hand: MindSpore's
semi-auto sharding does not compile on CPU): the trunk is replicated on every rank; model-parallel rank r holds
rows [r*V/mp, (r+1)*V/mp) of the output layer, computes its slice of the logits and feeds it to our loss, which
combines the slices with one all-reduce. The hidden state enters the head through CopyToModelParallel (its
gradient is summed over the model-parallel ranks in the backward). With LinearCrossEntropyLoss the rank hands
its hidden state and head rows to the loss instead, which never makes the logits and sums the hidden state's
gradient itself. MindFormers' own loss can be selected too (for comparisons), with model_parallel = 1 only.

Under MindFormers' own Trainer in its data-parallel mode (`use_parallel: True`, `parallel.parallel_mode: 0`) the
Trainer resets parallel_config to 1 x 1 before it builds the model, and its runner wrapper averages every gradient
over all ranks: the model then takes data_parallel from the world size, and refuses model_parallel > 1 (an average
over the ranks holding different rows of the output layer would mix those rows; our own trainer,
mf_loss.integrations.mindformers_train, runs dp x mp).
"""
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

# MindFormers writes its logs to $LOCAL_DEFAULT_PATH/log, by default ./output/log in whatever directory the
# process runs in; keep them out of the working tree unless the caller chose a place.
os.environ.setdefault("LOCAL_DEFAULT_PATH", str(Path(tempfile.gettempdir()) / f"mf_loss_mindformers_{os.getuid()}"))

try:
    from mindformers.core.loss import build_loss as mindformers_build_loss
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
    from mindformers.modules.layers import Linear
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from mindformers.wrapper import MFTrainOneStepCell
except ImportError as error:
    raise ImportError(
        f"mf_loss.integrations.mindformers needs MindFormers, and {sys.executable} cannot import it ({error}). "
        "Build the MindFormers environment with `bash scripts/mindformers_env.sh` (it prints the python to use; "
        "delete .venv-mindformers to rebuild a broken one) and run with that python.") from error

import numpy as np  # noqa: E402

import mindspore as ms  # noqa: E402
from mindspore import Tensor, ops  # noqa: E402
from mindspore.common import dtype as mstype  # noqa: E402
from mindspore.communication import GlobalComm, get_group_size  # noqa: E402
from mindspore.train.callback import Callback  # noqa: E402

from ..config_loader import ConfigError, build_loss, resolve_loss_class  # noqa: E402
from ..parallel.comm import rank_layout  # noqa: E402
from ..parallel.config import ParallelConfig, as_parallel_config  # noqa: E402
from ..registry import registered_losses  # noqa: E402
from ..train.model import CopyToModelParallel  # noqa: E402

ALIAS_PREFIX = "mf_loss."
DEFAULT_LOSS = {"type": ALIAS_PREFIX + "CrossEntropyLoss"}
FUSED_LOSS = "LinearCrossEntropyLoss"


def register_losses() -> list:
    """Registers every mf_loss loss as a MindFormers LOSS named `mf_loss.<Name>`; returns those names."""
    names = []
    for name, cls in sorted(registered_losses().items()):
        MindFormerRegister.register_cls(cls, module_type=MindFormerModuleType.LOSS, alias=ALIAS_PREFIX + name)
        names.append(ALIAS_PREFIX + name)
    return names


def is_our_loss(type_name: str) -> bool:
    return type_name.startswith(ALIAS_PREFIX)


def build_model_loss(block, parallel: ParallelConfig):
    """The loss named by a YAML loss block. `mf_loss.<Name>` builds ours for the dp x mp layout, checked key by
    key (unknown keys get the closest valid name); any other name goes to MindFormers' registry."""
    block = dict(block or DEFAULT_LOSS)
    type_name = block.get("type")
    if not isinstance(type_name, str):
        raise ConfigError(f"loss.type: expected a registered loss name such as {DEFAULT_LOSS['type']!r}, "
                          f"got {type_name!r}")
    if is_our_loss(type_name):
        return build_loss(block, parallel_config=parallel)
    if parallel.model_parallel != 1:
        raise ConfigError(f"loss.type {type_name!r} is not an mf_loss loss: it needs the whole vocabulary on each "
                          f"rank, but parallel_config.model_parallel is {parallel.model_parallel}; use "
                          f"{DEFAULT_LOSS['type']!r} (vocabulary-parallel) or model_parallel: 1")
    try:
        return mindformers_build_loss(block)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"loss: MindFormers cannot build {block!r}: {error}") from error


def _trainer_parallel_config() -> ParallelConfig:
    """The layout this rank's model serves. Under MindFormers' data-parallel mode with more than one rank, the
    Trainer has reset parallel_config to 1 x 1 and averages the gradients over every rank: data_parallel is the
    world size, and the YAML's model_parallel (kept by MindFormers' Context, built from the YAML before the reset)
    must be 1. None elsewhere: parallel_config is the layout."""
    if ms.get_auto_parallel_context("parallel_mode") != "data_parallel" or not GlobalComm.INITED:
        return None
    world = get_group_size()
    if world == 1:
        return None
    from mindformers.core.context.build_context import Context
    asked = as_parallel_config(Context().parallel_opr.parallel) if Context.is_exists() else None
    if asked is not None and asked.model_parallel != 1:
        raise ConfigError(
            f"parallel_config.model_parallel: {asked.model_parallel} under MindFormers' data-parallel mode "
            f"(use_parallel: True, parallel.parallel_mode: 0), which runs model_parallel 1 only: its gradient "
            f"all-reduce averages over all {world} ranks, so the ranks holding different rows of the output layer "
            "would average those rows. Set model_parallel: 1 (data_parallel becomes the world size), or train "
            "dp x mp with mf_loss's own trainer: bash scripts/train.sh --config configs/mindformers_llama.yaml")
    return ParallelConfig(world, 1)


def _as_dict(block):
    """A MindFormerConfig / dict / None loss block as a plain dict (MindFormerConfig is a dict subclass)."""
    if block is None:
        return None
    return {k: (_as_dict(v) if isinstance(v, dict) else v) for k, v in dict(block).items()}


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class VocabParallelLlamaForCausalLM(LlamaForCausalLM):
    """MindFormers' Llama with our vocabulary-parallel loss; the loss comes from `config.loss` (a YAML loss block,
    default `{type: mf_loss.CrossEntropyLoss}`), the layout from `config.parallel_config` (data_parallel x
    model_parallel ranks, stand-alone mode on each).

    Training output: what the loss returns; with `calculate_per_token_loss: true`, (sum of token losses, counted
    tokens) of this rank's batch. Evaluation output: (this rank's logits slice (B*S, V/mp), tokens, input_mask).
    """

    def __init__(self, config: LlamaConfig = None):
        parallel = _trainer_parallel_config() or as_parallel_config(config.parallel_config)
        if parallel.pipeline_stage != 1:
            raise ConfigError(f"parallel_config.pipeline_stage: only 1 is supported, got {parallel.pipeline_stage}")
        parallel = ParallelConfig(parallel.data_parallel, parallel.model_parallel)
        mp = parallel.model_parallel
        if config.vocab_size % mp:
            raise ConfigError(f"model_config.vocab_size {config.vocab_size} is not divisible by "
                              f"parallel_config.model_parallel = {mp} (each model-parallel rank holds vocab_size / "
                              f"model_parallel rows of the output layer); pad it to {-(-config.vocab_size // mp) * mp}")
        if mp > 1 and config.tie_word_embeddings:
            raise ConfigError("model_config.tie_word_embeddings: the output layer is split over the model-parallel "
                              "ranks and the embedding is not; set it to false or model_parallel to 1")
        if config.use_past:
            raise ConfigError("model_config.use_past: VocabParallelLlamaForCausalLM trains; use LlamaForCausalLM "
                              "for incremental inference")
        loss_block = _as_dict(getattr(config, "loss", None)) or dict(DEFAULT_LOSS)
        # The trunk runs whole on every rank (stand-alone mode): MindFormers' own sharding stays at 1 x 1.
        trunk_config = copy.deepcopy(config)
        trunk_config.parallel_config = TransformerOpParallelConfig()
        # By keyword: MindFormers' @lazy_inline reads `disable_lazy_inline` from `config=` only, and lazy inline
        # left on fails to compile outside stand-alone mode.
        super().__init__(config=trunk_config)
        self.parallel = parallel
        self.layout = rank_layout(parallel)
        self.loss = build_model_loss(loss_block, parallel)
        self.loss_type = loss_block["type"]
        self.fused_head = is_our_loss(self.loss_type) and \
            resolve_loss_class(self.loss_type).__name__ == FUSED_LOSS
        self.copy_to_mp = CopyToModelParallel(self.layout.group) if mp > 1 and not self.fused_head else None
        self.hidden_size = config.hidden_size
        if mp > 1:
            # Every rank drew the whole head from the same seed; it keeps its own rows, so all layouts start
            # from the same weights.
            rows = config.vocab_size // mp
            full = self.lm_head.weight.asnumpy()
            local = np.ascontiguousarray(full[self.layout.mp_rank * rows:(self.layout.mp_rank + 1) * rows])
            self.lm_head = Linear(in_channels=config.hidden_size, out_channels=rows, has_bias=False,
                                  compute_dtype=config.compute_dtype, param_init_type=config.param_init_type,
                                  weight_init=Tensor(local, self.lm_head.weight.dtype))

    def construct(self, input_ids, labels=None, input_position=None, position_ids=None, attention_mask=None,
                  input_embeds=None, init_reset=None, batch_valid_length=None, batch_index=None, zactivate_len=None,
                  block_tables=None, slot_mapping=None, prefix_keys_values=None, llm_boost_inputs=None,
                  q_seq_lens=None, loss_mask=None, gather_index=None, seq_range=None, actual_seq_len=None):
        """Tokens, labels and input_mask as LlamaForCausalLM makes them (training shifts input_ids by one;
        labels equal to ignore_token_id and pad tokens get mask 0 unless a loss_mask is given)."""
        has_loss_mask = loss_mask is not None
        bsz, seqlen = self.shape(input_ids)
        if self.training:
            tokens = self.slice(input_ids, (0, 0), (bsz, seqlen - 1), (1, 1))
            if has_loss_mask:
                loss_mask = self.slice(loss_mask, (0, 0), (bsz, seqlen - 1), (1, 1))
        else:
            tokens = input_ids
        output = self.model(tokens, input_embeds, None, None, None, None, None, None, attention_mask, position_ids,
                            None, seq_range, actual_seq_len)
        input_mask = loss_mask if has_loss_mask \
            else self.cast(self.not_equal(tokens, self.pad_token_id), mstype.float32)
        if labels is None:
            labels = self.slice(input_ids, (0, 1), (bsz, seqlen), (1, 1))
        else:
            if self.training:
                labels = self.slice(labels, (0, 1), (bsz, seqlen), (1, 1))
            if not has_loss_mask:
                input_mask = self.mul(input_mask, self.cast(self.not_equal(labels, self.ignore_token_id),
                                                            mstype.float32))
        hidden = self.reshape(output, (-1, self.hidden_size))
        labels = self.reshape(labels, (-1,))
        input_mask = self.reshape(self.cast(input_mask, mstype.float32), (-1,))
        if self.fused_head:
            # hidden and this rank's head rows; the loss sums hidden's gradient over the model-parallel ranks
            return self.loss(hidden, self.lm_head.weight, labels, input_mask)
        if self.copy_to_mp is not None:
            hidden = self.copy_to_mp(hidden)
        logits = self.cast(self.lm_head(hidden), mstype.float32)
        if not self.training:
            return logits, tokens, input_mask
        return self.loss(logits, labels, input_mask)

    def head_parameter_names(self) -> tuple:
        """Parameters split over the model-parallel ranks (their gradient norm is summed over those ranks)."""
        return (self.lm_head.weight.name,) if self.parallel.model_parallel > 1 else ()


# IsFinite over each gradient: 0 where every element is finite, 1 otherwise (what MindSpore's infnan-mode check on
# Ascend uses; MFTrainOneStepCell's own check on a CPU target is NPUGetFloatStatusV2, an Ascend-only kernel).
_nonfinite_flag = ops.MultitypeFuncGraph("_nonfinite_flag")


@_nonfinite_flag.register("Tensor")
def _tensor_nonfinite_flag(grad):
    return ops.reshape(Tensor(1.0, mstype.float32) - ops.IsFinite()(grad).all().astype(mstype.float32), (-1,))


@MindFormerRegister.register(MindFormerModuleType.WRAPPER, alias=ALIAS_PREFIX + "CPUTrainOneStepCell")
class CPUTrainOneStepCell(MFTrainOneStepCell):
    """MindFormers' MFTrainOneStepCell (loss scale, clipping, the data-parallel gradient mean) whose overflow status
    on a CPU target is "some gradient holds a non-finite value" (summed over the ranks); on other targets it is
    MFTrainOneStepCell's own check."""

    def __init__(self, network, optimizer, **kwargs):
        super().__init__(network, optimizer, **kwargs)
        self.on_cpu = ms.get_context("device_target") == "CPU"

    def get_overflow_status(self, status, compute_output):
        if self.on_cpu:
            return self._get_distributed_overflow_status_on_infnan_mode(_nonfinite_flag, compute_output)
        return super().get_overflow_status(status, compute_output)


@MindFormerRegister.register(MindFormerModuleType.CALLBACK, alias=ALIAS_PREFIX + "LossCurve")
class LossCurve(Callback):
    """Writes the loss curve of MindFormers' Trainer, one row per step, to `path` (default
    <output_dir>/loss.csv), and the same steps as progress events to progress.jsonl beside it (what mf_loss's
    launcher shows live), on rank 0. Reads the runner wrapper's outputs (loss, overflow, loss scale, learning rate,
    global norm). With data-parallel ranks the loss is the mean of the ranks' losses (each its own rows' mean; the
    global batch's mean when the ranks count equally many tokens, as MindFormers' gradient mean assumes);
    counted_tokens is the global batch's tokens (global_batch_size x seq_length)."""

    def __init__(self, path: str = None, global_batch_size: int = 1, seq_length: int = 1):
        super().__init__()
        self.path = path
        self.tokens = int(global_batch_size) * int(seq_length)
        self.writer = self.events = None
        self.total_steps = None
        self.started = None

    def on_train_step_begin(self, run_context):
        self.started = time.perf_counter()

    def on_train_step_end(self, run_context):
        from mindformers.tools.utils import get_output_root_path, get_real_rank
        from ..train.curve import CurveWriter
        from ..train.progress import EventLog
        elapsed = time.perf_counter() - self.started
        params = run_context.original_args()
        outputs = params.net_outputs
        loss = outputs[0]
        if GlobalComm.INITED and get_group_size() > 1:  # every rank joins the sum
            loss = ops.AllReduce()(loss.reshape((1,)).astype(mstype.float32)) / get_group_size()
        loss = float(np.asarray(loss.asnumpy()).reshape(()))
        if get_real_rank() != 0:
            return
        if self.writer is None:
            path = Path(self.path or Path(get_output_root_path()) / "loss.csv")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = CurveWriter(path, [])
            self.events = EventLog(path.with_name("progress.jsonl"))
            self.total_steps = _planned_steps(params)
        learning_rate = float(np.asarray(outputs[3].asnumpy()).reshape(-1)[0])
        norm = outputs[4] if len(outputs) > 4 and outputs[4] is not None else None
        step = int(params.cur_step_num)
        self.writer.append({"step": step, "loss": loss, "counted_tokens": self.tokens,
                            "learning_rate": learning_rate,
                            "grad_norm": float(norm.asnumpy()) if norm is not None else float("nan"),
                            "step_time_s": elapsed, "tokens_per_s": self.tokens / elapsed})
        self.events.step(step, self.total_steps, loss, self.tokens / elapsed)

    def on_train_end(self, run_context):
        if self.writer is not None:
            self.writer.close()
            self.events.close()


def _planned_steps(params) -> int:
    """The steps a training will run: the epochs' batches, or fewer where a callback (MindFormers' TrainCallBack)
    stops it at its stop_step."""
    steps = int(params.epoch_num) * int(params.batch_num)
    for callback in getattr(params, "list_callback", None) or ():
        stop = getattr(callback, "stop_step", None)
        if isinstance(stop, int) and stop > 0:
            steps = min(steps, stop)
    return steps


REGISTERED_LOSSES = register_losses()
