"""`mf-loss`: the command line.

    mf-loss train --config configs/dp2_mp2.yaml [--set runner_config.train_steps=50] [--resume]
    mf-loss train --config configs/dp2_mp2.yaml --nnodes 2 --node-rank K --master-addr HOST --master-port PORT
                                 (the same command on every node, each with its own K; node 0 at HOST)
    mf-loss demo  [--dp 2 --mp 2]
    mf-loss bench [...]          (mf_loss.bench)
"""
import argparse
import re
import sys
from importlib import metadata


def missing_extra(extra: str) -> list:
    """The distributions of mf_loss's `extra` (as its installed metadata declares them) that are not installed;
    empty when all are, or when mf_loss runs from a source tree without metadata."""
    try:
        requirements = metadata.requires("mf_loss") or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        if not re.search(r"extra\s*==\s*['\"]%s['\"]" % re.escape(extra), marker):
            continue
        name = re.match(r"\s*([A-Za-z0-9._-]+)", name).group(1)
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def require_extra(extra: str, tool: str) -> None:
    """Exit with a message naming the extra to install when `tool` (e.g. "mf-loss train") lacks its packages."""
    missing = missing_extra(extra)
    if missing:
        raise SystemExit(f"{tool} needs mf_loss's '{extra}' extra (missing: {', '.join(missing)}); install it with "
                         f"pip install 'mf_loss[{extra}]' (from a checkout: pip install -e '.[{extra}]')")


def node_options(args) -> dict:
    """The port flags as train_command's keywords, with errors naming the flag. The node rank and the layout
    against the configured world size are train_command's checks. Raises ValueError."""
    if args.port is not None and args.master_port is not None and args.port != args.master_port:
        raise ValueError(f"--port {args.port} and --master-port {args.master_port} differ; --port is the one-node "
                         "name of --master-port: give one")
    port = args.master_port if args.master_port is not None else args.port
    if args.nnodes > 1 and args.port is not None and args.master_port is None:
        raise ValueError(f"--port is the one-node flag; with --nnodes {args.nnodes} give --master-port, the same on "
                         "every node")
    if port is not None and not 1024 <= port <= 65535:
        flag = "--master-port" if args.master_port is not None else "--port"
        raise ValueError(f"{flag} {port} must be a TCP port in [1024, 65535] (msrun's range)")
    return dict(port=port, nnodes=args.nnodes, node_rank=args.node_rank,
                master_addr=args.master_addr or "127.0.0.1")


def _train(args) -> int:
    require_extra("train", "mf-loss train")
    from .config_loader import ConfigError
    from .train.run import TrainError, train_command
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"runner_config.train_steps={args.steps}")
    try:
        nodes = node_options(args)
    except ValueError as error:
        print(f"mf-loss train: {error}", file=sys.stderr)
        return 2
    try:
        train_command(args.config, overrides, resume=args.resume, output_dir=args.output_dir, timeout=args.timeout,
                      **nodes)
    except ConfigError as error:
        print(f"mf-loss train: configuration error: {error}", file=sys.stderr)
        return 2
    except (TrainError, FileNotFoundError) as error:
        print(f"mf-loss train: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # the launcher's checks of the node arguments (e.g. an unknown --master-addr)
        print(f"mf-loss train: {error}", file=sys.stderr)
        return 2
    return 0


def _demo(args) -> int:
    require_extra("train", "mf-loss demo")
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
    train.add_argument("--port", type=int, help="msrun scheduler port on one node (default: a free one)")
    several = train.add_argument_group("several nodes (the same command on every node, each with its own --node-rank)")
    several.add_argument("--nnodes", type=int, default=1, help="nodes (machines) in the job; each runs "
                         "world size / N ranks, whole model-parallel groups on one node")
    several.add_argument("--node-rank", type=int, default=0, help="this node's index in [0, N); node 0 runs the "
                         "main rank, msrun's scheduler and gets the outputs")
    several.add_argument("--master-addr", help="node 0's address, the same on every node (default 127.0.0.1)")
    several.add_argument("--master-port", type=int, help="the port of msrun's scheduler on node 0, the same on "
                         "every node (required with --nnodes > 1)")
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
        require_extra("bench", "mf-loss bench")
        from . import bench  # imported only when asked for: it is heavy and written separately
        return bench.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
