"""Checkpoints of a run, for both trainers: per-rank MindSpore checkpoints written atomically, one directory per
saved step with its step.json, `latest.json` naming the newest, resuming, and the full weights of a step.

    <run>/checkpoints/step_000050/rank_<r>.ckpt   this rank's parameters and optimizer state
    <run>/checkpoints/step_000050/step.json       step, layout, the model's parameter names, the split ones
    <run>/checkpoints/latest.json                 the same as the newest step.json
"""
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import Tensor

from ..config_loader import ConfigError
from .step import barrier

STEP_INFO = "step.json"
# Optimizer parameters that hold settings, not state: rebuilt from the config, never restored.
_OPTIMIZER_SETTINGS = ("learning_rate", "momentum")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def read_latest(ckpt_dir) -> Optional[dict]:
    path = Path(ckpt_dir) / "latest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def training_state(model_params, optimizer) -> list:
    """Every parameter a rank's checkpoint holds: the model's, then the optimizer's own state (moments, step
    count), each once."""
    state = {p.name: p for p in model_params}
    for _, param in optimizer.parameters_and_names():
        if not param.name.startswith(_OPTIMIZER_SETTINGS):
            state.setdefault(param.name, param)
    return list(state.values())


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temporary name beside `path`, then renames it: a reader sees the old or the new file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_rank_checkpoint(params, directory: Path, rank: int) -> Path:
    """This rank's state -> directory/rank_<r>.ckpt, written to a temporary name and renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"rank_{rank}.ckpt"
    tmp = directory / f".rank_{rank}.partial.ckpt"
    ms.save_checkpoint([{"name": p.name, "data": p} for p in params], str(tmp))
    os.replace(tmp, final)
    return final


def load_rank_checkpoint(params, path: Path) -> None:
    loaded = ms.load_checkpoint(str(path))
    for p in params:
        if p.name not in loaded:
            raise ValueError(f"checkpoint {path} has no parameter {p.name!r}")
        value = loaded[p.name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"checkpoint {path}: {p.name} has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
        p.set_data(Tensor(value.asnumpy()))


def save_step(state, ckpt_dir: Path, step: int, rank: int, world_size: int, info: dict, *, keep: int,
              writes_index: bool) -> None:
    """Every rank saves its `state` for `step`; once all have, the ranks with `writes_index` (the first rank of
    each node) write step.json and latest.json (`info`: data_parallel, model_parallel, model_parameters,
    split_parameters, anything else to keep) and drop all but the newest `keep` steps (0: keep all)."""
    name = f"step_{step:06d}"
    save_rank_checkpoint(state, ckpt_dir / name, rank)
    barrier(world_size)  # every rank's file is complete before latest.json points at them
    if not writes_index:
        return
    text = json.dumps({"step": step, "dir": name, "world_size": world_size, **info}, indent=1)
    write_atomic(ckpt_dir / name / STEP_INFO, text)
    write_atomic(ckpt_dir / "latest.json", text)
    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def step_info(path: Path):
    """(step.json or latest.json contents, the step's directory) of a step_* directory, or of a checkpoints/
    directory's latest step; (None, None) when `path` holds neither."""
    if (path / STEP_INFO).exists():
        return json.loads((path / STEP_INFO).read_text()), path
    latest = read_latest(path)
    return (latest, path / latest["dir"]) if latest is not None else (None, None)


def resume_source(load_checkpoint: Optional[str], run_dir, data_parallel: int, model_parallel: int,
                  config_source: str):
    """(directory of the step to resume from, its step.json/latest.json): `load_checkpoint` (a run directory, its
    checkpoints/, or one checkpoints/step_*) when set, else the run's own latest. Raises when there is none or
    its layout differs from data_parallel x model_parallel."""
    source = Path(load_checkpoint) if load_checkpoint else checkpoint_dir(run_dir)
    if (source / "checkpoints").is_dir():
        source = source / "checkpoints"
    latest, step_dir = step_info(source)
    if latest is None:
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {source} (no latest.json); train "
                                "without --resume first, or set load_checkpoint to a run directory")
    if (latest["data_parallel"], latest["model_parallel"]) != (data_parallel, model_parallel):
        raise ConfigError(f"{config_source}: --resume: the checkpoint in {step_dir} was written by data_parallel="
                          f"{latest['data_parallel']} x model_parallel={latest['model_parallel']}, but the config "
                          f"asks for {data_parallel} x {model_parallel}; resume with the layout that wrote it")
    return step_dir, latest


def load_full_weights(path) -> dict:
    """The model's weights at full shapes from a run's checkpoints/ (its latest step) or one step directory:
    replicated parameters from rank 0, the split ones concatenated over the model-parallel ranks of
    data-parallel rank 0."""
    path = Path(path)
    info, directory = step_info(path)
    if info is None:
        raise FileNotFoundError(f"no checkpoint in {path} (neither latest.json nor {STEP_INFO})")
    missing = [key for key in ("model_parameters", "split_parameters", "model_parallel") if key not in info]
    if missing:
        raise ValueError(f"checkpoint {directory}: its step.json/latest.json has no {', '.join(missing)} (written "
                         "before both trainers shared mf_loss.train.checkpoints); train the run again to read its "
                         "weights at full shapes")
    shards = [ms.load_checkpoint(str(directory / f"rank_{r}.ckpt")) for r in range(info["model_parallel"])]
    split = set(info["split_parameters"])
    return {name: (np.concatenate([s[name].asnumpy() for s in shards], axis=0) if name in split
                   else shards[0][name].asnumpy()) for name in info["model_parameters"]}
