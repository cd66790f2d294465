"""Switching a model into eval mode for a measurement and back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() for the body; afterwards every submodule gets back its own training flag.

    Restoring each module's flag (not just the root's) matters when a caller had put parts of the model
    in eval mode on purpose, e.g. frozen blocks during fine-tuning.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
