"""The per-rank entry point that mindformers_train starts under msrun (msrun takes a script file).

    python mf_loss/integrations/mindformers_worker.py --config FILE --run-dir DIR [--set key=value ...] [--resume]

Run as a script, it drops its own directory from sys.path (its `mindformers.py` would shadow the real
MindFormers package) and puts the directory holding the `mf_loss` package there instead.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

import argparse  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mindformers_worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from mf_loss.integrations.mindformers_train import load_run_config, train_rank
    from mf_loss.launch import mark_rank_done

    config = load_run_config(args.config, args.overrides)
    ms.set_context(device_target="CPU")
    init()
    if get_group_size() != config.world_size:
        raise SystemExit(f"{config.source}: parallel_config asks for {config.data_parallel} x "
                         f"{config.model_parallel} ranks, but msrun started {get_group_size()}")
    train_rank(config, args.run_dir, resume=args.resume)
    mark_rank_done(get_rank())
    return 0


if __name__ == "__main__":
    sys.exit(main())
