"""Tiny models with non-trivial weights, and a tiny offline tokenizer, for the export tests."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from osp.model import ModelConfig, Transformer

VOCAB = 97
# fp32 agreement of osp and transformers logits / hidden states. A pure copy is exact; folding EmbProj
# (an fp64 matmul cast to fp32) and an explicit-matrix clipped softmax differ by ~1e-6 in practice.
ATOL = 1e-5


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    values.update(overrides)
    return ModelConfig(**values)


def trained_like(cfg: ModelConfig) -> Transformer:
    """A model whose every parameter is moved off its init (SSNorm scalars != 1, EmbProj not orthogonal,
    gates not at gate_init), so a fold or a forgotten parameter cannot go unnoticed."""
    model = Transformer(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of VOCAB entries, the model's vocabulary (an export refuses any other size but
    the model's padded to a multiple of 64 or 128)."""
    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                   bos_token="<eos>", pad_token="<eos>")



def assert_same_function(model: Transformer, hf_model, input_ids: torch.Tensor) -> None:
    """transformers' logits and hidden states equal osp's (HF hidden_states[0] = the embedding output
    after the EmbProj merge = osp tap 0; the last = the final-norm output, before the merged R2)."""
    with torch.no_grad():
        logits, taps = model(input_ids, output_hidden_states=True)
        out = hf_model(input_ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=ATOL)
    assert len(out.hidden_states) == len(taps) == model.cfg.n_layers + 1
    for theirs, mine in zip(out.hidden_states, taps, strict=True):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=ATOL)
