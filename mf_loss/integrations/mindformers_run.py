"""MindFormers' own training flow (its Trainer, data loader and runner wrapper) on a MindFormers YAML that uses our
model and loss, one process or data-parallel msrun ranks.

    python -m mf_loss.integrations.mindformers_train --config configs/mindformers_trainer.yaml [--output-dir DIR]
        [--set key.path=value ...] [--steps N] [--port P] [--timeout S]

(`bash scripts/train.sh --config configs/mindformers_trainer.yaml` runs this; mindformers_train hands a YAML with a
`train_dataset_task` block, MindFormers' dataset section, to `train_command` here.) The parent builds the YAML's
corpus MindRecord (mindformers_data, cached), writes the YAML it runs to <output_dir>/<trainer.model_name>/
config.yaml (dataset_dir and output_dir filled in) and starts `use_parallel ? parallel_config.data_parallel : 1`
ranks. Each rank runs `run_mindformer`, what MindFormers' run_mindformer.py main does, after importing
mf_loss.integrations.mindformers (its registrations). Outputs in the run directory: config.yaml, loss.csv and
progress.jsonl (the `mf_loss.LossCurve` callback; the parent shows the steps as they come), summary.json/.txt,
logs/ (msrun's, one per rank), MindFormers' log/ and checkpoint/.

Run as a script (msrun's workers) it drops its own directory from sys.path (mindformers.py there would shadow the
real MindFormers package) and puts the directory holding the `mf_loss` package there instead.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import yaml  # noqa: E402

WORKER = Path(__file__).resolve()
DATASET_TASK = "train_dataset_task"
RUN_CONFIG = "config.yaml"
STOP_CALLBACK = "TrainCallBack"  # MindFormers' callback that ends training at stop_step


def is_trainer_config(tree) -> bool:
    """A YAML (tree) for MindFormers' own Trainer: it has MindFormers' dataset section."""
    return isinstance(tree, dict) and isinstance(tree.get(DATASET_TASK), dict)


def uses_mindformers_trainer(path) -> bool:
    """True when the YAML file is for MindFormers' own Trainer (see is_trainer_config)."""
    try:
        return is_trainer_config(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError):
        return False  # the trainer that reads it reports the problem


def run_mindformer(config_path) -> None:
    """What MindFormers' run_mindformer.py main does with `--config config_path` (train mode)."""
    from . import mindformers  # noqa: F401  (registers our model, loss, wrapper and callback)
    from mindformers.core.context import build_context
    from mindformers.tools.register import MindFormerConfig
    from mindformers.tools.register.template import ConfigTemplate
    from mindformers.trainer import Trainer
    from mindformers.utils.file_utils import set_output_path

    config = MindFormerConfig(str(config_path))
    ConfigTemplate.apply_template(config)  # in place (MindFormers 1.9)
    config = MindFormerConfig(**config)
    set_output_path(config.output_dir)
    build_context(config)
    Trainer(config).train()


def world_size(tree: dict) -> int:
    return int((tree.get("parallel_config") or {}).get("data_parallel", 1)) if tree.get("use_parallel") else 1


def prepare_run(config_path, overrides=(), output_dir: Optional[str] = None, steps: Optional[int] = None) -> Path:
    """Check the YAML, build its corpus MindRecord, write the YAML the ranks run into a fresh run directory (with
    `steps`, TrainCallBack's stop_step); returns that file."""
    from ..config_loader import ConfigError, apply_overrides
    from ..train.run import fresh_run_dir
    from .mindformers_data import corpus_mindrecord, settings_of

    config_path = Path(config_path)
    try:
        tree = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {config_path}: {error.strerror}") from None
    overrides = list(overrides)
    tree = apply_overrides(tree, overrides)
    source = str(config_path) + (" (with overrides " + ", ".join(overrides) + ")" if overrides else "")
    if not is_trainer_config(tree):
        raise ConfigError(f"{source}: {DATASET_TASK}: missing; MindFormers' Trainer builds its data from it")
    parallel = tree.get("parallel_config") or {}
    if tree.get("use_parallel") and int(parallel.get("model_parallel", 1)) != 1:
        raise ConfigError(f"{source}: parallel_config.model_parallel: MindFormers' data-parallel mode runs 1 only "
                          "(its gradient all-reduce averages over every rank); train dp x mp with "
                          "configs/mindformers_llama.yaml (mf_loss's own trainer)")
    run_name = (tree.get("trainer") or {}).get("model_name") or config_path.stem
    run_dir = (Path(output_dir or tree.get("output_dir") or "runs") / run_name).resolve()
    if steps is not None:
        callbacks = [c for c in tree.get("callbacks") or [] if c.get("type") != STOP_CALLBACK]
        tree["callbacks"] = [{"type": STOP_CALLBACK, "stop_step": steps}] + callbacks
    fresh_run_dir(run_dir)
    for name in ("log", "checkpoint", "strategy"):  # MindFormers' own outputs of an earlier run
        shutil.rmtree(run_dir / name, ignore_errors=True)
    tree["output_dir"] = str(run_dir)
    loader = tree["train_dataset"]["data_loader"]
    if not loader.get("dataset_dir"):  # a YAML that names its own data keeps it
        loader["dataset_dir"] = str(corpus_mindrecord(settings_of(tree, source)))
    path = run_dir / RUN_CONFIG
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def train_command(config_path, overrides=(), *, steps: Optional[int] = None, output_dir: Optional[str] = None,
                  port: Optional[int] = None, timeout: float = 900.0, out=sys.stdout) -> Path:
    """Train as the YAML says (one process, or msrun ranks); returns the run directory."""
    from ..train.progress import ProgressView
    from ..train.run import TrainError, _Follower, check_port, worker_env
    from . import mindformers  # noqa: F401  (without MindFormers: an ImportError saying what to run, first)
    started = time.perf_counter()
    run_config = prepare_run(config_path, overrides, output_dir, steps)
    run_dir = run_config.parent
    tree = yaml.safe_load(run_config.read_text())
    workers = world_size(tree)
    if port is not None:
        check_port(port)
    print(f"MindFormers' Trainer on {workers} rank(s) (data parallel): {run_config}", file=out, flush=True)
    view = ProgressView(out)
    follower = _Follower(run_dir / "progress.jsonl", view)  # the LossCurve callback's events
    follower.start()
    try:
        if workers == 1:
            run_mindformer(run_config)
        else:
            from ..launch import launch
            print(f"starting {workers} ranks with msrun (start-up takes ~30-60 s); logs in {run_dir / 'logs'}",
                  file=out, flush=True)
            result = launch(str(WORKER), ["--config", str(run_config)], workers=workers,
                            log_dir=str(run_dir / "logs"), timeout=timeout, env=worker_env(), port=port, quiet=True)
            if not result.ok:
                raise TrainError(result.message)
            if result.message:
                print(result.message, file=out, flush=True)
    finally:
        follower.stop()
        view.close()
    summary = summarize(run_dir, tree, workers, time.perf_counter() - started)
    print((run_dir / "summary.txt").read_text().rstrip(), file=out, flush=True)
    if not summary["steps"]:
        raise TrainError(f"MindFormers' Trainer ran no step: {run_dir / 'loss.csv'} is empty; see {run_dir / 'log'}")
    return run_dir


def summarize(run_dir: Path, tree: dict, workers: int, seconds: float) -> dict:
    from ..train.curve import read_curve
    curve = read_curve(run_dir / "loss.csv")
    losses = [row["loss"] for row in curve]
    after_first = sorted(row["step_time_s"] for row in curve[1:])
    step_time = after_first[len(after_first) // 2] if after_first else None
    summary = {"config": str(run_dir / RUN_CONFIG), "ranks": workers, "steps": len(curve),
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "median_step_time_s": step_time,
               "loss": tree["model"]["model_config"].get("loss", {}).get("type"),
               "model": tree["model"]["arch"]["type"], "total_time_s": seconds,
               "loss_csv": str(run_dir / "loss.csv")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"run {run_dir.name}: MindFormers' Trainer, {summary['model']} with {summary['loss']}, "
             f"{workers} data-parallel rank(s)",
             f"steps: {len(curve)}" + (f", {step_time:.3f} s each (median after the first, which compiles)"
                                        if step_time else ""),
             f"loss: {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "loss: no steps",
             f"time: {seconds:.1f} s in all (start-up, data, compilation, training)",
             f"outputs: {run_dir}/loss.csv, summary.json, log/ (MindFormers'), logs/ (msrun's)"]
    (run_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    return summary


def main(argv=None) -> int:
    """The rank's entry point under msrun."""
    parser = argparse.ArgumentParser(prog="mindformers_run")
    parser.add_argument("--config", required=True, help="the YAML that prepare_run wrote")
    args = parser.parse_args(argv)
    from ..launch import mark_rank_done
    run_mindformer(args.config)
    from mindspore.communication import get_rank
    mark_rank_done(get_rank())
    return 0


if __name__ == "__main__":
    if not __package__:
        from mf_loss.integrations.mindformers_run import main as _main  # the package's module, relative imports
        sys.exit(_main())
    sys.exit(main())
