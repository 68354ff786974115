"""The per-rank entry point that `mf-loss train` / `mf-loss demo` start under msrun.

    python mf_loss/train/worker.py train --config FILE --run-dir DIR [--set key=value ...] [--resume] [--nnodes N]
    python mf_loss/train/worker.py demo --out DIR [demo options]

Run as a script (msrun takes a file), it drops its own directory from sys.path (its module names would
shadow others) and puts the directory holding the `mf_loss` package there instead.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

import argparse  # noqa: E402


def distributed_world_size() -> int:
    """The number of ranks msrun started (1 outside msrun)."""
    return int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1)


def init_communication() -> int:
    """Initialise MindSpore's collectives when started by msrun; returns the world size."""
    if distributed_world_size() == 1 and "MS_ROLE" not in os.environ:
        return 1
    import mindspore as ms
    from mindspore.communication import get_group_size, init
    ms.set_context(device_target="CPU")
    init()
    return get_group_size()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mf_loss.train.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    train.add_argument("--config", required=True)
    train.add_argument("--run-dir", required=True)
    train.add_argument("--set", action="append", default=[], dest="overrides")
    train.add_argument("--resume", action="store_true")
    train.add_argument("--nnodes", type=int, default=1)
    demo = sub.add_parser("demo")
    demo.add_argument("--out", required=True)
    demo.add_argument("--spec", required=True, help="JSON of the demo problem")
    args = parser.parse_args(argv)

    world = init_communication()
    if args.command == "demo":
        from mf_loss.train.demo import rank_main
        code = rank_main(args.out, args.spec)
    else:
        from mf_loss.config_loader import load_config
        from mf_loss.train.trainer import train as run_training
        config = load_config(args.config, args.overrides, world_size=world)
        run_training(config, args.run_dir, resume=args.resume or config["resume_training"], echo=world == 1,
                     nnodes=args.nnodes)
        code = 0
    if world > 1 and code == 0:
        from mindspore.communication import get_rank

        from mf_loss.launch import mark_rank_done
        mark_rank_done(get_rank())
    return code


if __name__ == "__main__":
    sys.exit(main())
