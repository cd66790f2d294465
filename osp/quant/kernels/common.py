"""Triton helpers shared by the kernels; safe under `TRITON_INTERPRET=1` (no libdevice, no bf16 math)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: True when Triton runs kernels through its CPU interpreter (read at import, as Triton does at decoration).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype a kernel should write. The interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest
    even, like torch), so under it bf16 results are written as fp32 and converted by torch afterwards."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def rows_launch(m: int, n: int) -> tuple[int, int]:
    """(rows per program, num_warps) of the row kernels (quant+pack, FWHT) for m rows of n (padded) columns.

    Interpreter: ~1 ms per program, so as many rows as fit a 64K-element tile. GPU: one tile stays in
    registers (8K fp32 elements), at least one row; 8 warps from 4K elements. The ahead-of-time compile gate
    (`osp.aot`) compiles what this returns.
    """
    budget = 1 << 16 if INTERPRET else 1 << 13
    rows = max(1, min(triton.next_power_of_2(m), budget // n))
    return rows, 8 if rows * n >= 4096 else 4


def pick_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """Autotuning needs a GPU driver: the interpreter gets the first config only (Triton's interpreter cannot
    benchmark)."""
    return configs[:1] if INTERPRET else configs


@triton.jit
def round_half_even(x):
    """Round fp32 to the nearest integer, ties to even (torch.round), without libdevice.

    floor + fraction is exact in fp32, unlike floor(x + 0.5), which rounds e.g. 0.49999997 + 0.5 up to 1.
    """
    f = tl.floor(x)
    d = x - f
    f_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & f_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def fwht_rows(x, BM: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Unnormalized Walsh–Hadamard butterflies over the rows of x (BM, N), N = 2^LOG_N, in registers.

    Stage i pairs elements 2^i apart: (a, b) -> (a + b, a - b), the same order as `hadamard.fwht_torch`.
    """
    for i in tl.static_range(LOG_N):
        y = tl.reshape(x, (BM, N // (2 << i), 2, 1 << i))
        a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, (BM, N))
    return x


@triton.jit
def unpack_low(p):
    """Sign-extended low nibbles of packed int8 p (width-independent: no reliance on int8 wrap-around)."""
    v = p.to(tl.int32)
    return ((v & 15) - ((v & 8) << 1)).to(tl.int8)


@triton.jit
def unpack_high(p):
    """Sign-extended high nibbles of packed int8 p (arithmetic shift)."""
    return (p.to(tl.int32) >> 4).to(tl.int8)
