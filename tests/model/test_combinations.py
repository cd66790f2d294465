"""Every mitigation, alone and combined, trains: a short AdamW run on a repetitive sequence ends with a
finite, falling loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from osp.model import ModelConfig, Transformer

COMBINATIONS = {
    "plain": dict(),
    "ssnorm": dict(norm="ss"),
    "embproj": dict(emb_proj=True),
    "clipped_alpha": dict(attn_softmax="clipped", clip_alpha=4.0),
    "clipped_gamma_zeta": dict(attn_softmax="clipped", clip_gamma=-0.03, clip_zeta=1.03),
    "head_slice": dict(attn_gate="head_slice"),
    "head_slice_mlp": dict(attn_gate="head_slice", gate_hidden=4),
    "headwise": dict(attn_gate="headwise"),
    "elementwise": dict(attn_gate="elementwise"),
    "gated_norm": dict(gated_norm_rank=4),
    "pre_affine": dict(pre_affine=True),
    "osp_gated": dict(norm="ss", emb_proj=True, attn_gate="headwise", attn_softmax="clipped", clip_alpha=4.0),
    "everything": dict(norm="ss", emb_proj=True, attn_gate="elementwise", attn_softmax="clipped",
                       clip_alpha=4.0, gated_norm_rank=4, pre_affine=True),
    "qualcomm_both": dict(attn_gate="head_slice", gate_hidden=4, attn_softmax="clipped", clip_gamma=-0.02,
                          gated_norm_rank=4),
}

VOCAB, SEQ, PERIOD = 16, 24, 5


def repetitive_batch(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of one fixed period-5 pattern at random phases: learnable from context after a few tokens."""
    pattern = torch.tensor([3, 7, 1, 12, 9])
    phase = torch.randint(0, PERIOD, (batch, 1), generator=generator)
    return pattern[(phase + torch.arange(SEQ + 1)) % PERIOD]


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_combination_trains(name):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ,
                      **COMBINATIONS[name])
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        batch = repetitive_batch(8, generator)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[0] > 0.8 * math.log(VOCAB)  # started near chance
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
