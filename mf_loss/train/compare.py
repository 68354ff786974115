"""Compare two runs of `mf-loss train`: loss curves and final weights.

    python -m mf_loss.train.compare runs/single runs/dp2_mp2 [--tolerance 1e-5]
"""
import argparse
import sys
from pathlib import Path

import numpy as np


def compare_runs(run_a, run_b) -> dict:
    """Max |difference| of the loss curves (step by step) and of every final weight (full shapes)."""
    from .checkpoints import checkpoint_dir, load_full_weights
    from .curve import read_curve
    curve_a, curve_b = read_curve(Path(run_a) / "loss.csv"), read_curve(Path(run_b) / "loss.csv")
    if [r["step"] for r in curve_a] != [r["step"] for r in curve_b]:
        raise ValueError(f"the runs cover different steps: {len(curve_a)} in {run_a}, {len(curve_b)} in {run_b}")
    weights_a = load_full_weights(checkpoint_dir(run_a))
    weights_b = load_full_weights(checkpoint_dir(run_b))
    if sorted(weights_a) != sorted(weights_b):
        raise ValueError("the runs' checkpoints hold different parameters")
    per_weight = {name: float(np.abs(weights_a[name] - weights_b[name]).max()) for name in weights_a}
    worst = max(per_weight, key=per_weight.get)
    return {
        "steps": len(curve_a),
        "loss_max_diff": max((abs(a["loss"] - b["loss"]) for a, b in zip(curve_a, curve_b)), default=0.0),
        "counted_tokens_equal": [r["counted_tokens"] for r in curve_a] == [r["counted_tokens"] for r in curve_b],
        "weight_max_diff": per_weight[worst], "worst_weight": worst, "per_weight": per_weight,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mf_loss.train.compare", description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    result = compare_runs(args.run_a, args.run_b)
    ok = (result["loss_max_diff"] <= args.tolerance and result["weight_max_diff"] <= args.tolerance
          and result["counted_tokens_equal"])
    print(f"{result['steps']} steps: loss curve max |diff| {result['loss_max_diff']:.2e}; final weights max |diff| "
          f"{result['weight_max_diff']:.2e} ({result['worst_weight']}); counted tokens "
          f"{'equal' if result['counted_tokens_equal'] else 'DIFFER'} -> "
          f"{'within' if ok else 'NOT within'} {args.tolerance:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
