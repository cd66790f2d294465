"""Fixtures of the export tests (helpers live in export_helpers.py, importable from the test modules)."""

import pytest
import torch
from export_helpers import VOCAB, make_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
