"""Small models for the quantization and GPU tests."""

from __future__ import annotations

import torch

from osp.model import ModelConfig, Transformer


def make_model(**overrides) -> Transformer:
    """A seeded 2-layer Transformer (d 128, vocab 128); `overrides` are ModelConfig fields."""
    values = {"vocab_size": 128, "d_model": 128, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
              "ffn_hidden": 256}
    values.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**values))
