"""Fused causal clipped-softmax attention in Triton: forward and backward, with GQA.

Clipped softmax clips the *normalised* probabilities, so the online-softmax trick of FlashAttention
(rescale a running output as the row max grows) does not apply. The forward therefore makes two passes
over the keys of each query block: pass 1 finds the row max and log-sum-exp, pass 2 accumulates
clip((zeta - gamma) p + gamma, 0, 1) @ V. Only the log-sum-exp (B, H, T) is saved; the backward recomputes
probabilities tile by tile, so no T x T matrix ever reaches memory.

The backward of the clip is not the FlashAttention one: rowsum(dP * P) != rowsum(dO * O) because O is
built from the clipped probabilities, so the dq kernel first sweeps the keys to get delta = rowsum(dP * P)
and stores it for the dk/dv kernel.

Numerics are defined by the torch twin (`osp.model.clipped_softmax.twin_forward/twin_backward`); the tests
compare the two under TRITON_INTERPRET=1. Launch through `osp.model.clipped_softmax.clipped_attention`,
which picks this kernel for CUDA tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter multiplies bf16 tiles as raw integers (triton-lang/triton#11584), so there every dot
# operand is upcast to fp32. On a GPU fp16/bf16 tiles go to the tensor cores as they are, and fp32 tiles
# are multiplied in IEEE fp32 (input_precision="ieee"): Triton's default would round them to TF32, and the
# kernel would no longer match its fp32 torch twin.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_rows(base, offs_t, offs_d, T, D, DOT_FP32: tl.constexpr):
    """Rows offs_t of a contiguous (T, D) matrix; zeros outside."""
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    x = tl.load(base + offs_t[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(base, x, offs_t, offs_d, T, D):
    tl.store(base + offs_t[:, None] * D + offs_d[None, :], x.to(base.dtype.element_ty),
             mask=(offs_t[:, None] < T) & (offs_d[None, :] < D))


@triton.jit
def _scores(q, k, offs_m, offs_n, T, scale):
    """Causal scores of a (BLOCK_M, BLOCK_N) tile: -inf on future and out-of-range keys."""
    valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T)
    return tl.where(valid, tl.dot(q, tl.trans(k), input_precision="ieee") * scale, float("-inf")), valid


@triton.jit
def _clipped_tile(q, k, offs_m, offs_n, lse, T, scale, gamma, zeta):
    """Softmax p, clipped c and the clip's pass-through mask of one tile, from the row log-sum-exp."""
    s, valid = _scores(q, k, offs_m, offs_n, T, scale)
    p = tl.exp(s - lse[:, None])
    u = (zeta - gamma) * p + gamma
    c = tl.where(valid, tl.minimum(tl.maximum(u, 0.0), 1.0), 0.0)
    return p, c, valid & (u > 0.0) & (u < 1.0)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, T, H, HKV, D, scale, gamma, zeta,  # noqa: E741 - osp.aot names the arguments
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * H + h; int64 so bh * T * D cannot overflow
    kv = (bh // H) * HKV + (bh % H) // (H // HKV)  # its key/value head under GQA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + bh * T * D, offs_m, offs_d, T, D, DOT_FP32)
    k_base, v_base = K + kv * T * D, V + kv * T * D
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)  # later keys are in every row's future

    # Pass 1: row max and log-sum-exp (key 0 is visible to every row, so m is finite after block 0).
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s, _ = _scores(q, _load_rows(k_base, offs_n, offs_d, T, D, DOT_FP32), offs_m, offs_n, T, scale)
        m_new = tl.maximum(m, tl.max(s, 1))
        row_sum = row_sum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    lse = m + tl.log(row_sum)

    # Pass 2: clipped probabilities times V.
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, T, D, DOT_FP32)
        v = _load_rows(v_base, offs_n, offs_d, T, D, DOT_FP32)
        _, c, _ = _clipped_tile(q, k, offs_m, offs_n, lse, T, scale, gamma, zeta)
        acc += tl.dot(c.to(v.dtype), v, input_precision="ieee")
    _store_rows(O + bh * T * D, acc, offs_m, offs_d, T, D)
    tl.store(LSE + bh * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, T, H, HKV, D, scale, gamma, zeta,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kv = (bh // H) * HKV + (bh % H) // (H // HKV)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + bh * T * D, offs_m, offs_d, T, D, DOT_FP32)
    do = _load_rows(DO + bh * T * D, offs_m, offs_d, T, D, DOT_FP32)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    k_base, v_base = K + kv * T * D, V + kv * T * D
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)

    # dP = (zeta - gamma) [0 < u < 1] dO V^T; the softmax backward needs delta = rowsum(dP * P) first.
    delta = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, T, D, DOT_FP32)
        v = _load_rows(v_base, offs_n, offs_d, T, D, DOT_FP32)
        p, _, passes = _clipped_tile(q, k, offs_m, offs_n, lse, T, scale, gamma, zeta)
        dp = tl.where(passes, (zeta - gamma) * tl.dot(do, tl.trans(v), input_precision="ieee"), 0.0)
        delta += tl.sum(dp * p, 1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, T, D, DOT_FP32)
        v = _load_rows(v_base, offs_n, offs_d, T, D, DOT_FP32)
        p, _, passes = _clipped_tile(q, k, offs_m, offs_n, lse, T, scale, gamma, zeta)
        dp = tl.where(passes, (zeta - gamma) * tl.dot(do, tl.trans(v), input_precision="ieee"), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    _store_rows(DQ + bh * T * D, dq * scale, offs_m, offs_d, T, D)
    tl.store(DELTA + bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, T, H, HKV, D, scale, gamma, zeta,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """dK, dV of one key block as seen by one query head; GQA groups are summed by the launcher."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kv = (bh // H) * HKV + (bh % H) // (H // HKV)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + kv * T * D, offs_n, offs_d, T, D, DOT_FP32)
    v = _load_rows(V + kv * T * D, offs_n, offs_d, T, D, DOT_FP32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Earlier query blocks only see earlier keys. Rows past T load q = dO = 0 and so add nothing.
    for start_m in range((pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q + bh * T * D, offs_m, offs_d, T, D, DOT_FP32)
        do = _load_rows(DO + bh * T * D, offs_m, offs_d, T, D, DOT_FP32)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        p, c, passes = _clipped_tile(q, k, offs_m, offs_n, lse, T, scale, gamma, zeta)
        dp = tl.where(passes, (zeta - gamma) * tl.dot(do, tl.trans(v), input_precision="ieee"), 0.0)
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(c).to(do.dtype), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee")
    _store_rows(DK + bh * T * D, dk * scale, offs_n, offs_d, T, D)
    _store_rows(DV + bh * T * D, dv, offs_n, offs_d, T, D)


KERNELS = ("fwd", "dq", "dkdv")


def launch_config(kernel: str, dtype: torch.dtype, head_dim: int, interpreted: bool = _INTERPRETED) -> dict:
    """Constexprs and launch options of one kernel ("fwd", "dq" or "dkdv") for inputs of dtype and head_dim.

    The only place tile sizes are chosen: `forward`/`backward` launch with it and the ahead-of-time compile
    gate (`osp.aot`, tests/kernels) compiles exactly what it returns for sm_80 and sm_90.
    64 x 64 tiles with 2 pipeline stages fit 16-bit inputs at head_dim 128. fp32 inputs take exact FMA dots
    (input_precision="ieee", no TF32), whose operands live in registers: 64 x 64 fp32 tiles spill kilobytes
    to the stack and the two-stage dq needs 262,144 B of shared memory (over an H100's 232,448 B), so on a
    GPU fp32 takes 32 x 32 tiles, one stage, and 8 warps above head_dim 64 (at most 32 B of stack, 74 KB of
    shared memory on sm_80/sm_90). Few large tiles suit the interpreter (~1 ms per program)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown clipped-attention kernel {kernel!r}; expected one of {KERNELS}")
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16 on a GPU
    dot_fp32 = interpreted or dtype == torch.float32
    block_m = block_n = 64
    num_warps, num_stages = 4, 2
    if dtype == torch.float32 and not interpreted:
        block_m = block_n = 32
        num_warps, num_stages = (8 if block_d > 64 else 4), 1
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_FP32=dot_fp32,
                num_warps=num_warps, num_stages=num_stages)


def _config(kernel: str, q: torch.Tensor, block_m: int | None, block_n: int | None) -> dict:
    cfg = launch_config(kernel, q.dtype, q.shape[-1])
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    return cfg


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: float, zeta: float,
            block_m: int | None = None, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal clipped attention; q (B, H, T, D), k, v (B, Hkv, T, D) -> out (B, H, T, D), lse (B, H, T) fp32.

    Tiles come from `launch_config`; block_m/block_n override them (tests of ragged tiles)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
    cfg = _config("fwd", q, block_m, block_n)
    grid = (triton.cdiv(t, cfg["BLOCK_M"]), b * h)
    _fwd_kernel[grid](q, k, v, out, lse, t, h, hkv, d, d**-0.5, gamma, zeta, **cfg)
    return out, lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
             gamma: float, zeta: float, block_m: int | None = None, block_n: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `forward`, recomputing probabilities from the saved log-sum-exp."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q, k, v, dout, lse = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), lse.contiguous()
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    dk_heads = torch.empty(b, h, t, d, device=q.device, dtype=torch.float32)
    dv_heads = torch.empty_like(dk_heads)
    scale = d**-0.5
    cfg = _config("dq", q, block_m, block_n)
    _bwd_dq_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), b * h)](
        q, k, v, dout, lse, delta, dq, t, h, hkv, d, scale, gamma, zeta, **cfg)
    cfg = _config("dkdv", q, block_m, block_n)
    _bwd_dkdv_kernel[(triton.cdiv(t, cfg["BLOCK_N"]), b * h)](
        q, k, v, dout, lse, delta, dk_heads, dv_heads, t, h, hkv, d, scale, gamma, zeta, **cfg)
    dk = dk_heads.view(b, hkv, h // hkv, t, d).sum(2).to(k.dtype)
    dv = dv_heads.view(b, hkv, h // hkv, t, d).sum(2).to(v.dtype)
    return dq, dk, dv
