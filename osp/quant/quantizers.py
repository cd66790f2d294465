"""Torch reference quantizers: the numerics that the Triton kernels and the W4A4 view must reproduce.

One code convention for every quantizer: signed integer codes q in [-2^(b-1), 2^(b-1) - 1], a scale s and a
zero point z (also in the signed frame), x_hat = s * (q - z).

* Symmetric: z = 0, s = absmax / (2^(b-1) - 1), q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1).
* Asymmetric: OSP's unsigned codes u in [0, 2^b - 1] with zero round(-xmin / s), shifted by 2^(b-1):
  q = u - 2^(b-1), z = zero - 2^(b-1). The shift is exact in fp32 and keeps one signed int8 GEMM path
  (the W4A4 GEMM's); s * (q - z) equals OSP's s * (u - zero) bit for bit.

All math is fp32 (osp's choice; OSP's harness runs in bf16 and differs on a few codes next to .5
boundaries). Rounding is `torch.round`, i.e. round half to even, like OSP's harness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hadamard import fwht_torch


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range [-2^(b-1), 2^(b-1) - 1]."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# ---------------------------------------------------------------------------------------------------------
# Activations (dynamic, per row or per group of a row)
# ---------------------------------------------------------------------------------------------------------


def act_params(
    x: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0, zero_inclusive: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (signed-frame) zero of min/max quantization over the last dim of x; fp32, keepdim.

    zero_inclusive widens the range to contain 0 (OSP's per-token path). Without it (OSP's group path,
    used for o_proj groups and V) a constant row would get a zero range, where OSP divides by zero; such
    rows fall back to the 0-inclusive range.
    """
    x = x.float()
    xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    zero = torch.zeros_like(xmin)
    widen = torch.ones_like(xmin, dtype=torch.bool) if zero_inclusive else xmax <= xmin
    xmin = torch.where(widen, torch.minimum(xmin, zero), xmin) * clip
    xmax = torch.where(widen, torch.maximum(xmax, zero), xmax) * clip
    lo, hi = qrange(bits)
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / hi)
        return scale, zero
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / (hi - lo)
    return scale, torch.round(-xmin / scale) + lo


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (as fp32 integers) of x under (scale, zero), clamped to the b-bit range."""
    lo, hi = qrange(bits)
    return torch.clamp(torch.round(x.float() / scale) + zero, lo, hi)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x_hat = s * (q - z), fp32."""
    return scale * (q.float() - zero)


def quant_rows_torch(
    x: torch.Tensor,
    bits: int = 4,
    sym: bool = False,
    group_size: int | None = None,
    clip: float = 1.0,
    zero_inclusive: bool = True,
    hadamard: bool = False,
    out: str = "packed",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) quantization of x (..., K), optionally after a normalized FWHT.

    group_size splits each row into K / group_size groups with their own scale and zero (None = one group).
    out="fake": the dequantized tensor in x's dtype (in the rotated basis when hadamard=True).
    out="packed": (codes, scale, zero); codes int8 (..., K/2) packed by `pack_int4` for 4 bits, else int8
    (..., K); scale and zero fp32 (..., K / group_size). The torch twin of `kernels.quant_rows_triton`.
    """
    if out not in ("fake", "packed"):
        raise ValueError(f"out={out!r}; choose 'fake' or 'packed'")
    k = x.shape[-1]
    group = group_size or k
    if k % group:
        raise ValueError(f"row length {k} is not a multiple of group_size={group}")
    xf = fwht_torch(x.float()) if hadamard else x.float()
    xg = xf.unflatten(-1, (k // group, group))
    scale, zero = act_params(xg, bits, sym, clip, zero_inclusive)
    q = quantize(xg, scale, zero, bits)
    if out == "fake":
        return dequantize(q, scale, zero).flatten(-2).to(x.dtype)
    codes = q.flatten(-2).to(torch.int8)
    codes = pack_int4(codes) if bits == 4 else codes
    return codes, scale.squeeze(-1), zero.squeeze(-1)


def static_fake_quant(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Quantize-dequantize x with one fixed symmetric scale for the whole tensor (static per-tensor
    quantization, the scale calibrated offline); same dtype as x."""
    lo, hi = qrange(bits)
    return (torch.clamp(torch.round(x.float() / scale), lo, hi) * scale).to(x.dtype)


def fake_quant(
    x: torch.Tensor,
    bits: int,
    sym: bool = False,
    group_size: int | None = None,
    clip: float = 1.0,
    zero_inclusive: bool = True,
) -> torch.Tensor:
    """Quantize-dequantize x per row (or per group of a row); same dtype as x."""
    return quant_rows_torch(x, bits, sym, group_size, clip, zero_inclusive, out="fake")  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# Weights (symmetric, per output channel, optional MSE clip sweep)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """A weight W[out, in] as signed int codes and one fp32 scale per output channel:
    W_hat = scale * codes."""

    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32 [out, 1]
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.scale * self.codes.float()).to(dtype)

    def packed(self) -> torch.Tensor:
        """int8 [out, in/2] in the `pack_int4` layout (4-bit only)."""
        if self.bits != 4:
            raise ValueError(f"only 4-bit weights pack two codes per byte, got {self.bits} bits")
        return pack_int4(self.codes)

    def group_sums(self, group_size: int | None = None) -> torch.Tensor:
        """int32 [out, in / group_size]: sum of codes per output channel and input group (GEMM epilogue)."""
        group = group_size or self.codes.shape[1]
        return self.codes.to(torch.int32).unflatten(1, (-1, group)).sum(-1, dtype=torch.int32)


def _sym_quant_dequant(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = qrange(bits)
    return scale * torch.clamp(torch.round(w / scale), lo, hi)


def weight_scale(
    w: torch.Tensor,
    bits: int = 4,
    mse: bool = True,
    grid: int = 100,
    maxshrink: float = 0.8,
    norm: float = 2.4,
) -> torch.Tensor:
    """Per-output-channel symmetric scale [out, 1] (fp32) of w[out, in], as OSP's WeightQuantizer.

    absmax = max(|min(w, 0)|, max(w, 0)) clamped >= 1e-5; scale = absmax / (2^(b-1) - 1). With mse, each row
    keeps the clip ratio p = 1 - i/grid (i < maxshrink * grid) minimizing sum |w_hat - w|^norm; ties keep the
    larger p (strict improvement only, as OSP's loop).
    """
    w = w.float()
    hi = qrange(bits)[1]
    zero = torch.zeros(w.shape[0], 1, device=w.device)
    xmin = torch.minimum(w.amin(1, keepdim=True), zero)
    xmax = torch.maximum(w.amax(1, keepdim=True), zero)
    absmax = torch.maximum(xmin.abs(), xmax).clamp(min=1e-5)
    scale = absmax / hi
    if not mse:
        return scale
    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * grid)):
        candidate = (1 - i / grid) * absmax / hi
        err = (_sym_quant_dequant(w, candidate, bits) - w).abs_().pow_(norm).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, candidate, scale)
    return scale


def quantize_weight_with_scale(w: torch.Tensor, scale: torch.Tensor, bits: int) -> QuantizedWeight:
    lo, hi = qrange(bits)
    codes = torch.clamp(torch.round(w.float() / scale), lo, hi).to(torch.int8)
    return QuantizedWeight(codes, scale, bits)


def quantize_weight(
    w: torch.Tensor,
    bits: int = 4,
    mse: bool = True,
    grid: int = 100,
    maxshrink: float = 0.8,
    norm: float = 2.4,
) -> QuantizedWeight:
    """Round-to-nearest symmetric per-channel quantization of w[out, in] (scale from `weight_scale`)."""
    return quantize_weight_with_scale(w, weight_scale(w, bits, mse, grid, maxshrink, norm), bits)


# ---------------------------------------------------------------------------------------------------------
# int4 packing and the integer GEMM reference
# ---------------------------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes (..., K) (K even, values in [-8, 7]) into int8 (..., K/2).

    Layout (osp's single source of truth, QuaRot's order): byte j holds code 2j in its low nibble and code
    2j+1 in its high nibble, both two's complement. The Triton kernels read and write exactly this.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dim, got {q.shape[-1]}")
    q = q.to(torch.int32)
    lo, hi = q[..., 0::2], q[..., 1::2]
    return ((lo & 0xF) | (hi << 4)).to(torch.int8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 (..., K/2) -> int8 codes (..., K) in [-8, 7]."""
    p = p.to(torch.int32)
    lo = (p & 0xF) - ((p & 0x8) << 1)  # sign-extend the low nibble
    hi = p >> 4  # arithmetic shift sign-extends the high nibble
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 A[M, K] @ W[N, K]^T for small integer codes (float64 products are exact below 2^53)."""
    return (a.double() @ w.double().T).to(torch.int32)


def w4a4_gemm_torch(
    a_packed: torch.Tensor,
    s_a: torch.Tensor,
    z_a: torch.Tensor,
    w_packed: torch.Tensor,
    s_w: torch.Tensor,
    wsum: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch twin of the Triton W4A4 GEMM: out[m, n] = sum_k s_a (q_a - z_a) * s_w q_w.

    Rows: out = ((acc - z_a * wsum) * s_a) * s_w with acc = sum_k q_a q_w (int32) and wsum = sum_k q_w.
    Groups of the activation along K: out = (sum_g (acc_g - z_a,g * wsum_g) * s_a,g) * s_w, groups summed in
    order. The float ops are written in the kernel's order so both give the same fp32 result.
    Shapes: a_packed [M, K/2], s_a/z_a [M, G], w_packed [N, K/2], s_w [N, 1], wsum [N, G] (G = K/group).
    """
    a, w = unpack_int4(a_packed), unpack_int4(w_packed)
    sw = s_w.reshape(1, -1).float()
    if group_size is None:
        acc = int_matmul(a, w).float()
        out = (acc - z_a.reshape(-1, 1) * wsum.reshape(1, -1).float()) * s_a.reshape(-1, 1) * sw
    else:
        out = torch.zeros(a.shape[0], w.shape[0], device=a.device)
        for g in range(a.shape[1] // group_size):
            cols = slice(g * group_size, (g + 1) * group_size)
            acc = int_matmul(a[:, cols], w[:, cols]).float()
            out = out + (acc - z_a[:, g : g + 1] * wsum[:, g].reshape(1, -1).float()) * s_a[:, g : g + 1]
        out = out * sw
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
