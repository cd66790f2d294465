"""Fused per-token activation quantization: [FWHT] -> min/max -> scale/zero -> round -> clamp -> pack.

One program quantizes BM whole rows, so the rotated activation and the per-element scale/zero never leave
registers (OSP's torch harness materializes both at full size). Numerics are those of
`osp.quant.quantizers.quant_rows_torch`, operation for operation: fp32 after the load, IEEE division
(`div_rn`), ties-to-even rounding, the signed code frame, the `pack_int4` nibble layout.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import fwht_rows, round_half_even, rows_launch, store_dtype


@triton.jit
def _quant_rows_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, fake_ptr,
    M, K, NUM_G, stride_x, stride_c, stride_s, stride_f,
    clip, had_scale,
    BM: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, LOG_K: tl.constexpr,
    BITS: tl.constexpr, SYM: tl.constexpr, ZERO_INCLUSIVE: tl.constexpr,
    HADAMARD: tl.constexpr, FAKE: tl.constexpr,
):  # fmt: skip
    LO: tl.constexpr = -(1 << (BITS - 1))
    HI: tl.constexpr = (1 << (BITS - 1)) - 1
    NG: tl.constexpr = BK // G
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BK)
    row_ok = rows < M
    col_ok = cols < K
    x = tl.load(
        x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
    )
    x = x.to(tl.float32)
    if HADAMARD:
        x = fwht_rows(x, BM, BK, LOG_K) * had_scale

    # Min/max per group; padding columns (beyond K) must not count, so they read as -/+inf.
    valid = tl.reshape(tl.broadcast_to(col_ok[None, :], (BM, BK)), (BM, NG, G))
    xg = tl.reshape(x, (BM, NG, G))
    xmin = tl.min(tl.where(valid, xg, float("inf")), axis=2)
    xmax = tl.max(tl.where(valid, xg, float("-inf")), axis=2)
    if ZERO_INCLUSIVE:
        xmin = tl.minimum(xmin, 0.0) * clip
        xmax = tl.maximum(xmax, 0.0) * clip
    else:
        widen = xmax <= xmin  # constant (or empty padding) group: fall back to the 0-inclusive range
        xmin = tl.where(widen, tl.minimum(xmin, 0.0), xmin) * clip
        xmax = tl.where(widen, tl.maximum(xmax, 0.0), xmax) * clip
    if SYM:
        amax = tl.maximum(tl.abs(xmin), xmax)
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, tl.full(amax.shape, HI, tl.float32)))
        zero = tl.zeros_like(scale)
    else:
        empty = (xmin == 0.0) & (xmax == 0.0)
        xmin = tl.where(empty, -1.0, xmin)
        xmax = tl.where(empty, 1.0, xmax)
        scale = tl.math.div_rn(xmax - xmin, tl.full(xmax.shape, HI - LO, tl.float32))
        zero = round_half_even(tl.math.div_rn(-xmin, scale)) + LO

    q = round_half_even(tl.math.div_rn(xg, scale[:, :, None])) + zero[:, :, None]
    q = tl.minimum(tl.maximum(q, LO), HI)
    mask2d = row_ok[:, None] & col_ok[None, :]
    if FAKE:
        y = tl.reshape(scale[:, :, None] * (q - zero[:, :, None]), (BM, BK))
        tl.store(
            fake_ptr + rows[:, None] * stride_f + cols[None, :], y.to(fake_ptr.dtype.element_ty), mask=mask2d
        )
    else:
        qi = tl.reshape(q, (BM, BK)).to(tl.int32)
        if BITS == 4:
            lo, hi = tl.split(tl.reshape(qi, (BM, BK // 2, 2)))
            packed = ((lo & 15) | (hi << 4)).to(tl.int8)
            pcols = tl.arange(0, BK // 2)
            pmask = row_ok[:, None] & (pcols < K // 2)[None, :]
            tl.store(codes_ptr + rows[:, None] * stride_c + pcols[None, :], packed, mask=pmask)
        else:
            tl.store(codes_ptr + rows[:, None] * stride_c + cols[None, :], qi.to(tl.int8), mask=mask2d)
        gcols = tl.arange(0, NG)
        gmask = row_ok[:, None] & (gcols < NUM_G)[None, :]
        offs = rows[:, None] * stride_s + gcols[None, :]
        tl.store(scale_ptr + offs, scale, mask=gmask)
        tl.store(zero_ptr + offs, zero, mask=gmask)


def quant_rows_triton(
    x: torch.Tensor,
    bits: int = 4,
    sym: bool = False,
    group_size: int | None = None,
    clip: float = 1.0,
    zero_inclusive: bool = True,
    hadamard: bool = False,
    out: str = "packed",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `quant_rows_triton` on x (..., K); same contract as `osp.quant.quantizers.quant_rows_torch`.

    Limits: a group size must be a power of two dividing K; hadamard needs K a power of two; 4-bit packed
    output needs K even. `osp.quant.ops` checks these and falls back to the torch twin.
    """
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    bk = triton.next_power_of_2(k)
    group = group_size or k
    if group == k:
        g, num_g = bk, 1
    elif k % group == 0 and group & (group - 1) == 0:
        g, num_g = group, k // group
    else:
        raise ValueError(f"group_size={group} must be a power of two dividing K={k}")
    if hadamard and bk != k:
        raise ValueError(f"the fused Hadamard needs a power-of-two row length, got {k}")
    if out == "packed" and bits == 4 and k % 2:
        raise ValueError(f"4-bit packing needs an even row length, got {k}")
    bm, num_warps = rows_launch(m, bk)
    fake = out == "fake"
    dev = x.device
    if fake:
        y = torch.empty((m, k), device=dev, dtype=store_dtype(x.dtype))
        codes = scale = zero = y  # unused pointers
    else:
        y = torch.empty((1,), device=dev, dtype=torch.float32)
        codes = torch.empty((m, k // 2 if bits == 4 else k), device=dev, dtype=torch.int8)
        scale = torch.empty((m, num_g), device=dev, dtype=torch.float32)
        zero = torch.empty((m, num_g), device=dev, dtype=torch.float32)
    _quant_rows_kernel[(triton.cdiv(m, bm),)](
        x2, codes, scale, zero, y,
        m, k, num_g, x2.stride(0), codes.stride(0), scale.stride(0), y.stride(0),
        float(clip), 1.0 / math.sqrt(k),
        BM=bm, BK=bk, G=g, LOG_K=bk.bit_length() - 1,
        BITS=bits, SYM=sym, ZERO_INCLUSIVE=zero_inclusive, HADAMARD=hadamard, FAKE=fake,
        num_warps=num_warps,
    )  # fmt: skip
    if fake:
        return y.to(x.dtype).reshape(shape)
    lead = shape[:-1]
    return codes.reshape(*lead, codes.shape[-1]), scale.reshape(*lead, num_g), zero.reshape(*lead, num_g)
