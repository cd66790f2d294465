"""Fixtures for the quantization tests: tiny models, token blocks, one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from osp.model import ModelConfig, Transformer


@pytest.fixture(autouse=True)
def _single_thread():
    # These tensors are tiny: intra-op threads only add OpenMP wake-up cost, which explodes when other
    # processes share the two CI cores (measured: 20 ms per elementwise op with 2 threads under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(**overrides) -> Transformer:
    values = {
        "vocab_size": 128,
        "d_model": 128,
        "n_layers": 2,
        "n_heads": 2,
        "max_seq_len": 32,
        "ffn_hidden": 256,
    }
    values.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**values))


@pytest.fixture
def tiny_model() -> Transformer:
    return make_model()


@pytest.fixture
def blocks() -> torch.Tensor:
    return torch.randint(0, 128, (6, 33), generator=torch.Generator().manual_seed(1))
