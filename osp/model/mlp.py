"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# Smooth-SwiGLU's running per-channel max: a moving average of each training step's max over ~100 steps.
ABSMAX_DECAY = 0.99


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), Llama's FFN; names match Hugging Face so export is a copy.

    With `cfg.smooth_swiglu` (Smooth-SwiGLU, Fishman et al., arXiv 2409.12517) it also tracks the per-channel
    max |silu(gate(x)) * up(x)| of the training batches in the buffer `output_absmax`. Nothing it computes
    changes: the W4A4 view and the export scale the down_proj input per channel by it (osp.quant.smooth),
    folded into the rows of up_proj and the columns of down_proj, so the deployed model reads a
    channel-balanced input with no calibration step.
    """

    folds_into_llama = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.output_absmax: torch.Tensor | None
        if cfg.smooth_swiglu:
            self.register_buffer("output_absmax", torch.zeros(cfg.ffn_hidden))
        else:
            self.output_absmax = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.output_absmax is not None and self.training:
            self._track(h.detach())
        return self.down_proj(h)

    @torch.no_grad()
    def _track(self, h: torch.Tensor) -> None:
        peak = h.abs().flatten(0, -2).amax(0).float()
        seen = self.output_absmax > 0
        self.output_absmax.copy_(torch.where(seen,
                                             ABSMAX_DECAY * self.output_absmax + (1 - ABSMAX_DECAY) * peak,
                                             peak))
