"""Causal self-attention: RoPE (half-split layout), grouped-query attention, softmax variants (softmax,
clipped) and output gates (head-slice, headwise, elementwise)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .clipped_softmax import clipped_attention
from .config import ModelConfig


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) for the half-split ("rotate_half") RoPE layout used by HF Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of x (B, H, T, D) by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Standard causal softmax attention through PyTorch's fused SDPA (GQA handled by SDPA)."""

    folds_into_llama = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class ClippedSoftmaxAttention(nn.Module):
    """Causal attention with clipped softmax, clip((zeta - gamma) softmax + gamma, 0, 1) (Bondarenko et al.).

    gamma = clip_gamma, or the length-invariant -clip_alpha / max_seq_len (T = the training block size,
    kept fixed at evaluation so the clip does not change with the prompt length).
    """

    folds_into_llama = False  # HF Llama hard-codes softmax

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gamma = cfg.clip_gamma if cfg.clip_gamma is not None else -cfg.clip_alpha / cfg.max_seq_len
        self.zeta = cfg.clip_zeta

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return clipped_attention(q, k, v, self.gamma, self.zeta)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:.6g}, zeta={self.zeta:.6g}"


# name -> class(cfg), called as core(q (B,H,T,D), k, v (B,Hkv,T,D)) -> (B,H,T,D)
ATTENTION_CORES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "softmax": SoftmaxAttention,
    "clipped": ClippedSoftmaxAttention,
}


class Attention(nn.Module):
    """Multi-head causal self-attention with GQA; Hugging Face Llama parameter names."""

    folds_into_llama = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # A parameter-free submodule rather than a function, so that it declares how it exports.
        self.core = ATTENTION_CORES[cfg.attn_softmax](cfg)
        # Set by the W4A4 view for the duration of an evaluation: (k, v) -> (k, v), after RoPE.
        self.kv_quantizer: (
            Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
        ) = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_quantizer is not None:
            k, v = self.kv_quantizer(k, v)
        out = self.core(q, k, v)
        out = self.gate(out, x)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def gate(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Hook for output gating (B, H, T, D) given the block input x; identity for plain attention."""
        return out


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _head_gate(head_dim: int, hidden: int) -> nn.Module:
    """G_h: Linear(d_head -> 1), or the MLP d_head -> hidden -> ReLU -> 1 when hidden > 0."""
    if hidden == 0:
        return nn.Linear(head_dim, 1)
    return nn.Sequential(nn.Linear(head_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class HeadSliceGatedAttention(Attention):
    """Per-head output gate computed from the head's own slice of the block input (Bondarenko et al. 2023).

    o_h <- sigmoid(G_h(x_h)) * o_h, x_h = the h-th d_head slice of the normed block input, one G_h per head.
    A head that wants to "do nothing" can close its gate instead of learning the huge softmax logits that
    make outliers. The output bias starts at logit(gate_init) (the weights start near 0, so the gate starts
    near gate_init; 0.25 is the OPT recipe's value).
    """

    folds_into_llama = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.gate_init = cfg.gate_init
        self.head_gates = nn.ModuleList(_head_gate(cfg.head_dim, cfg.gate_hidden) for _ in range(cfg.n_heads))

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        for head_gate in self.head_gates:
            output_layer = head_gate if isinstance(head_gate, nn.Linear) else head_gate[-1]
            nn.init.constant_(output_layer.bias, _logit(self.gate_init))

    def gate(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        slices = x.view(b, t, self.n_heads, self.head_dim)
        logits = torch.cat([g(slices[:, :, i]) for i, g in enumerate(self.head_gates)], dim=-1)  # (B, T, H)
        return out * torch.sigmoid(logits).transpose(1, 2).unsqueeze(-1)


class HeadwiseGatedAttention(Attention):
    """Output gate sigmoid(x W_g), one scalar per head and token (Qwen's "G1", Qiu et al. 2025).

    x is the normed block input (the tensor that feeds q/k/v); the gate multiplies the attention output
    before o_proj. No bias; W_g is initialised like every other matrix (N(0, init_std)), so the gate
    starts near sigmoid(0) = 0.5.
    """

    folds_into_llama = False
    per_channel = False  # one gate per head (headwise) or per channel of every head (elementwise)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        width = cfg.n_heads * (cfg.head_dim if self.per_channel else 1)
        self.gate_proj = nn.Linear(cfg.d_model, width, bias=False)

    def gate(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        gates = torch.sigmoid(self.gate_proj(x)).view(b, t, self.n_heads, -1)  # (B, T, H, 1 or D)
        return out * gates.transpose(1, 2)


class ElementwiseGatedAttention(HeadwiseGatedAttention):
    """Qwen G1 gate with one sigmoid per channel of every head (d x H*d_head extra parameters)."""

    per_channel = True


# model.attn_gate -> attention class; every class takes the ModelConfig.
ATTENTION_GATES: dict[str, type[Attention]] = {
    "none": Attention,
    "head_slice": HeadSliceGatedAttention,
    "headwise": HeadwiseGatedAttention,
    "elementwise": ElementwiseGatedAttention,
}


def build_attention(cfg: ModelConfig) -> Attention:
    """The attention block chosen by `cfg.attn_gate` (its softmax by `cfg.attn_softmax`)."""
    return ATTENTION_GATES[cfg.attn_gate](cfg)
