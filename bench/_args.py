"""The command line of the benchmarks that time one existing file (bench_mapping, bench_quantile_walk)."""

from __future__ import annotations

import argparse
import warnings


def file_args(rounds: int) -> argparse.Namespace:
    """``PATH [--rounds N] [--layout LETTERS]``, parsed; bnstat's warnings silenced (a layout
    assumed, a first run's compile notes) so that only the figures print."""
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--layout", default="NCHW")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    return args
