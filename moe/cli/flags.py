"""Types of the numeric flags: argparse calls one on the flag's text and, when it raises, exits with
status 2 and one line (`moe calibrate: error: argument --ep: must be a positive integer, got '0'`).

Checking here, before any work starts, keeps a bad value from meaning something else: `--ep 0`
once fell through `args.ep or 8` to 8, and `--tokens nan` passed a `value <= 0` check.
"""

from __future__ import annotations

import argparse
import math

from ..errors import excerpt


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, lengths, counts of GPUs, the expert-parallel degree)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {excerpt(text)}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (warm-up calls)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {excerpt(text)}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (tokens, prices, bandwidths); NaN and infinity are refused."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {excerpt(text)}")
    return value


def fraction(text: str) -> float:
    """A finite number in [0, 1] (a share)."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {excerpt(text)}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {excerpt(text)}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {excerpt(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {excerpt(text)}")
    return value
