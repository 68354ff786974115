"""`mf-loss`: the command line.

    mf-loss train --config configs/dp2_mp2.yaml [--set runner_config.train_steps=50] [--resume]
    mf-loss demo  [--dp 2 --mp 2]
    mf-loss bench [...]          (mf_loss.bench)
"""
import argparse
import sys


def _train(args) -> int:
    from .config_loader import ConfigError
    from .train.run import TrainError, train_command
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"runner_config.train_steps={args.steps}")
    try:
        train_command(args.config, overrides, resume=args.resume, output_dir=args.output_dir, port=args.port,
                      timeout=args.timeout)
    except ConfigError as error:
        print(f"mf-loss train: configuration error: {error}", file=sys.stderr)
        return 2
    except (TrainError, FileNotFoundError) as error:
        print(f"mf-loss train: {error}", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> int:
    from .train.demo import demo_command
    from .train.run import TrainError
    try:
        return demo_command(dp=args.dp, mp=args.mp, rows=args.rows, vocab=args.vocab, seed=args.seed,
                            port=args.port, timeout=args.timeout)
    except TrainError as error:
        print(f"mf-loss demo: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mf-loss", description="Vocab-parallel cross entropy for MindSpore.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the small language model on the configured dp x mp ranks")
    train.add_argument("--config", required=True, help="YAML file, e.g. configs/dp2_mp2.yaml")
    train.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set runner_config.train_steps=20 (repeatable)")
    train.add_argument("--steps", type=int, help="shortcut for --set runner_config.train_steps=N")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.add_argument("--output-dir", help="parent of the run directory (default: the config's output_dir)")
    train.add_argument("--port", type=int, help="msrun scheduler port (default: a free one)")
    train.add_argument("--timeout", type=float, default=900.0, help="seconds before the whole job is stopped")
    train.set_defaults(func=_train)
    demo = sub.add_parser("demo", help="loss and gradients on dp x mp msrun ranks beside one device")
    demo.add_argument("--dp", type=int, default=2)
    demo.add_argument("--mp", type=int, default=2)
    demo.add_argument("--rows", type=int, default=24, help="tokens in the batch (divisible by dp)")
    demo.add_argument("--vocab", type=int, default=16, help="vocabulary size (divisible by mp)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--port", type=int)
    demo.add_argument("--timeout", type=float, default=300.0)
    demo.set_defaults(func=_demo)
    sub.add_parser("bench", help="benchmarks (mf_loss.bench); options after 'bench' go to it", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from . import bench  # imported only when asked for: it is heavy and written separately
        return bench.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
