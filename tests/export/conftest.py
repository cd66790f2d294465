"""Fixtures of the export tests (helpers: tests/support/export.py)."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.support.export import VOCAB, make_tokenizer


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
