"""Fixtures for the quantization tests: tiny models, token blocks, one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from osp.model import Transformer
from tests.support.models import make_model


@pytest.fixture(autouse=True)
def _single_thread():
    # These tensors are tiny: intra-op threads only add OpenMP wake-up cost, which explodes when other
    # processes share the two CI cores (measured: 20 ms per elementwise op with 2 threads under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model() -> Transformer:
    return make_model()


@pytest.fixture
def blocks() -> torch.Tensor:
    return torch.randint(0, 128, (6, 33), generator=torch.Generator().manual_seed(1))
