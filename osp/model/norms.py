"""Normalisation layers: per-channel RMSNorm, Single-Scale RMSNorm (one learnable scalar), and the two
gated-rescaling wrappers of Qiu et al. 2026 (PreAffine before the norm, GatedNorm after it)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, computed in fp32 and cast back (as HF Llama does)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a per-channel gain gamma in R^d."""

    folds_into_llama = True

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)

    def llama_weight(self) -> torch.Tensor:
        """The equivalent Llama RMSNorm weight vector."""
        return self.weight.detach()


class SingleScaleRMSNorm(nn.Module):
    """RMSNorm with one learnable scalar g instead of a per-channel vector (OSP's SSNorm).

    Removing the per-channel gain takes away the cheapest way for training to amplify a few
    channels; the scalar keeps the overall scale learnable. Exports exactly as weight = g * 1_d.
    """

    folds_into_llama = True

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        # Shape (1,), not (): FSDP2 cannot shard 0-d parameters.
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)

    def llama_weight(self) -> torch.Tensor:
        return self.weight.detach().expand(self.dim).clone()


class PreAffine(nn.Module):
    """norm(lambda * x) with a learnable lambda in R^d (init 1).

    Gives training a per-channel parameter in which to put a large scale, instead of growing an outlier
    dimension in the residual stream to steer the norm. Does not fold into Llama: the RMS is taken after
    the scaling.
    """

    folds_into_llama = False

    def __init__(self, norm: nn.Module, dim: int) -> None:
        super().__init__()
        self.norm = norm
        self.pre_scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.pre_scale * x)


class GatedNorm(nn.Module):
    """y = norm(x); y' = sigmoid(W_up swish(W_down y)) * y, a rank-r input-dependent elementwise gate.

    The gate can shrink the channels of a token directly, so the model need not route a huge residual
    "sink" dimension through the norm to rescale everything else. Init: W_down, W_up ~ N(0, init_std),
    like every other matrix (done by `Transformer.reset_parameters`); the gate then starts at
    sigmoid(~0) ~ 0.5 for every channel and token, and both matrices get gradient from the first step
    (a zero W_up would leave W_down without one).
    """

    folds_into_llama = False

    def __init__(self, norm: nn.Module, dim: int, rank: int) -> None:
        super().__init__()
        self.norm = norm
        self.gate_down = nn.Linear(dim, rank, bias=False)
        self.gate_up = nn.Linear(rank, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return torch.sigmoid(self.gate_up(F.silu(self.gate_down(y)))) * y


NORMS: dict[str, Callable[[int, float], nn.Module]] = {
    "rms": RMSNorm,
    "ss": SingleScaleRMSNorm,
}


def build_norm(cfg: ModelConfig) -> nn.Module:
    """The norm used everywhere (both norms of every block and the final one): `cfg.norm`, applied to
    lambda * x if `cfg.pre_affine`, and gated afterwards if `cfg.gated_norm_rank > 0`."""
    norm = NORMS[cfg.norm](cfg.d_model, cfg.norm_eps)
    if cfg.pre_affine:
        norm = PreAffine(norm, cfg.d_model)
    if cfg.gated_norm_rank > 0:
        norm = GatedNorm(norm, cfg.d_model, cfg.gated_norm_rank)
    return norm
