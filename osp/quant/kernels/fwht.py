"""Fast Walsh–Hadamard transform over rows: log2(N) radix-2 butterfly stages, all in registers."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import fwht_rows, rows_launch, store_dtype


@triton.jit
def _fwht_kernel(x_ptr, y_ptr, M, stride_x, stride_y, scale, BM: tl.constexpr, N: tl.constexpr,
                 LOG_N: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = fwht_rows(x, BM, N, LOG_N) * scale
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def fwht_triton(x: torch.Tensor) -> torch.Tensor:
    """Normalized FWHT over the last dim (a power of two), fp32 inside; same result as
    `hadamard.fwht_torch`."""
    shape = x.shape
    n = shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=store_dtype(x.dtype))
    bm, num_warps = rows_launch(m, n)
    _fwht_kernel[(triton.cdiv(m, bm),)](
        x2, y, m, x2.stride(0), y.stride(0), 1.0 / math.sqrt(n), BM=bm, N=n, LOG_N=n.bit_length() - 1,
        num_warps=num_warps,
    )  # fmt: skip
    return y.to(x.dtype).reshape(shape)
