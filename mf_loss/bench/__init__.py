"""The benchmark (`mf-loss bench`): mf_loss's losses beside other cross-entropy implementations on CPU, time
and peak memory, each configuration in a fresh process.

    cli.py       command line, the plan of processes, outputs      impls.py    the rows and their adapters
    ms_cells.py  the MindSpore cells measured                      runner.py   fresh processes, paired turns
    measure.py   peak memory, timings, memory bandwidth            mp2.py      mp=2 under msrun, collectives
    report.py    merged records, ratios, bandwidth fraction, table chart.py    the PNG chart (matplotlib)
"""
from .cli import build_parser, main, torch_available
from .impls import DEFAULT_HEAD_IMPLS, DEFAULT_IMPLS, IMPLS

__all__ = ["main", "build_parser", "torch_available", "IMPLS", "DEFAULT_IMPLS", "DEFAULT_HEAD_IMPLS"]
