"""argparse value types shared by the commands (osp/cli) and the benches (osp/bench): a bad value is one usage
line, never a traceback."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """Counts (blocks, steps, batch sizes): an integer >= 1, else one usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value
