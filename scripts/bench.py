#!/usr/bin/env python
"""Run the side-by-side benchmark from a checkout: `python scripts/bench.py [options]`.

The same as `python -m mf_loss.bench` / `mf-loss bench`; `--help` lists the options, mf_loss/bench/ holds
the code (impls.py: the rows), e.g.
    python scripts/bench.py --quick
    python scripts/bench.py --shapes 4096x32000,2048x128256 --dtypes float32 --out docs/bench
    python scripts/bench.py --head 256 --shapes 4096x32000 --mp2 --out docs/bench/head
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mf_loss.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
