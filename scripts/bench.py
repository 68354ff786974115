#!/usr/bin/env python
"""Run the side-by-side benchmark from a checkout: `python scripts/bench.py [options]`.

The same as `python -m mf_loss.bench` / `mf-loss bench`; see mf_loss/bench.py for the options, e.g.
    python scripts/bench.py --quick
    python scripts/bench.py --shapes 4096x32000,2048x128256 --dtypes float32 --out docs/bench
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mf_loss.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
