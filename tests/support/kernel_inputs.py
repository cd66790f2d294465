"""Seeded inputs of the kernel tests, shared by the CPU (interpreter) and the GPU suites."""

from __future__ import annotations

import torch

from osp.quant import quantizers as Q


def qkv(b=2, h=4, hkv=2, t=37, d=16, dtype=torch.float32):
    """Random q (B, H, T, D), k, v (B, Hkv, T, D); scaled so some probabilities reach the clip bounds."""
    q = (2.0 * torch.randn(b, h, t, d, dtype=dtype)).requires_grad_()
    k = (2.0 * torch.randn(b, hkv, t, d, dtype=dtype)).requires_grad_()
    v = torch.randn(b, hkv, t, d, dtype=dtype).requires_grad_()
    return q, k, v


def outlier_input(m: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """Seeded activations with an outlier channel, an all-zero row, a constant row and exact ties."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g) * 2
    x[:, 3 % k] *= 20  # an outlier channel
    x[m // 2] = 0.0  # an all-zero row (range -1..1 fallback)
    if m > 2:
        x[1] = 0.75  # a constant row (degenerate group range)
    # values exactly halfway between codes exercise ties-to-even in both paths
    x[0, : min(k, 8)] = torch.tensor([0.5, 1.5, 2.5, -0.5, 3.5, -1.5, 0.0, 7.5])[: min(k, 8)]
    return x.to(dtype)


def gemm_operands(m: int, n: int, k: int, group: int | None):
    """Seeded activations, their 4-bit row codes (scale, zero) and a 4-bit RTN weight for the W4A4 GEMM."""
    g = torch.Generator().manual_seed(m + n + k)
    a, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    codes, s_a, z_a = Q.quant_rows_torch(a, 4, group_size=group, zero_inclusive=group is None)
    qw = Q.quantize_weight(w, 4, mse=False)
    return a, codes, s_a, z_a, qw
