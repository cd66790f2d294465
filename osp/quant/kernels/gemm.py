"""W4A4 GEMM on the int8 tensor-core path: packed int4 operands, int32 accumulation, dequant epilogue.

Hopper has no int4 MMA, so both operands stay two-nibbles-per-byte in memory and are unpacked in registers.
With the even-k-low / odd-k-high layout the K-sum splits into an even and an odd half, so each tile is two
int8 dots with no re-interleaving: acc += A_lo W_lo^T + A_hi W_hi^T.

Epilogue (per-row activation scales): out = ((acc - z_a wsum) * s_a) * s_w (+ bias),
wsum[n] = sum_k q_w[n, k]. Activation groups along K (OSP's o_proj, group = head_dim): one K tile per group,
accumulated in fp32 as sum_g (acc_g - z_a,g wsum_g) * s_a,g, then * s_w. Same float order as
`quantizers.w4a4_gemm_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pick_configs, store_dtype, unpack_high, unpack_low


@triton.jit
def _dot_int4(a, w):
    """int32 (BM, BN) = sum over the tile's K of unpacked A (BM, BKP) times unpacked W (BN, BKP)."""
    acc = tl.dot(unpack_low(a), tl.trans(unpack_low(w)), out_dtype=tl.int32)
    return acc + tl.dot(unpack_high(a), tl.trans(unpack_high(w)), out_dtype=tl.int32)


@triton.jit
def _w4a4_gemm_kernel(
    a_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, KP, NUM_G,
    stride_am, stride_wn, stride_sm, stride_wsn, stride_om,
    HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BKP: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BKP)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm[:, None] * stride_am
    w_rows = w_ptr + rn[:, None] * stride_wn
    if GROUPED:
        # BKP is the packed group width, so tile g is group g and KP = NUM_G * BKP.
        acc_f = tl.zeros((BM, BN), dtype=tl.float32)
        for g in range(NUM_G):
            k = g * BKP + rk
            a = tl.load(a_rows + k[None, :], mask=m_ok[:, None], other=0)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0)
            acc = _dot_int4(a, w).to(tl.float32)
            s_a = tl.load(sa_ptr + rm * stride_sm + g, mask=m_ok, other=0.0)
            z_a = tl.load(za_ptr + rm * stride_sm + g, mask=m_ok, other=0.0)
            ws = tl.load(ws_ptr + rn * stride_wsn + g, mask=n_ok, other=0).to(tl.float32)
            acc_f += (acc - z_a[:, None] * ws[None, :]) * s_a[:, None]
        out = acc_f * tl.load(sw_ptr + rn, mask=n_ok, other=0.0)[None, :]
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, KP, BKP):
            k = k0 + rk
            k_ok = k < KP
            a = tl.load(a_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            acc += _dot_int4(a, w)  # zero bytes hold two zero codes, so masked tails add nothing
        s_a = tl.load(sa_ptr + rm * stride_sm, mask=m_ok, other=0.0)
        z_a = tl.load(za_ptr + rm * stride_sm, mask=m_ok, other=0.0)
        ws = tl.load(ws_ptr + rn * stride_wsn, mask=n_ok, other=0).to(tl.float32)
        s_w = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
        out = (acc.to(tl.float32) - z_a[:, None] * ws[None, :]) * s_a[:, None] * s_w[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


_KEY = ["M", "N", "KP"]
# GPU-legal tiles only (int8 dot: K >= 32 per dot, i.e. BKP >= 32 packed = 64 codes; powers of two). The
# first config is the interpreter's: big tiles, few programs. Every config compiles for sm_80/sm_90 within
# shared memory and with at most 24 B of register spill (tests/kernels/test_aot_compile.py): the unpacked
# nibble tiles live in registers next to the int32 accumulator, so 128 x 256 tiles (300-500 B of spill at
# any stage count) and 128 x 128 groups at head_dim 128 (248 B on sm_80) are left out.
_ROW_CONFIGS = [
    triton.Config({"BM": 64, "BN": 64, "BKP": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BKP": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BKP": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BKP": 128}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BKP": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 16, "BN": 128, "BKP": 128}, num_warps=4, num_stages=4),
]
_GROUP_CONFIGS = [
    triton.Config({"BM": 64, "BN": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 64, "BN": 256}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 16, "BN": 128}, num_warps=4, num_stages=4),
]
_gemm_rows = triton.autotune(configs=pick_configs(_ROW_CONFIGS), key=_KEY)(_w4a4_gemm_kernel)
_gemm_groups = triton.autotune(configs=pick_configs(_GROUP_CONFIGS), key=_KEY + ["BKP"])(_w4a4_gemm_kernel)


def w4a4_gemm_triton(
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
    """Triton W4A4 GEMM; same contract as `osp.quant.quantizers.w4a4_gemm_torch`.

    a_packed [M, K/2] int8, s_a/z_a [M, G] fp32, w_packed [N, K/2] int8, s_w [N] or [N, 1] fp32,
    wsum [N, G] int32, G = K / group_size (1 without groups). Groups need group_size >= 64 on GPU.
    """
    m, kp = a_packed.shape
    n = w_packed.shape[0]
    if w_packed.shape[1] != kp:
        raise ValueError(f"packed K differs: activations {kp}, weights {w_packed.shape[1]}")
    out = torch.empty((m, n), device=a_packed.device, dtype=store_dtype(out_dtype))
    s_a, z_a = s_a.float().contiguous(), z_a.float().contiguous()
    s_w = s_w.float().reshape(-1).contiguous()
    wsum = wsum.to(torch.int32).contiguous()
    a_packed, w_packed = a_packed.contiguous(), w_packed.contiguous()
    bias_arg = bias.contiguous() if bias is not None else s_w
    args = (a_packed, w_packed, s_a, z_a, s_w, wsum, bias_arg, out, m, n, kp)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))

    if group_size is None:
        _gemm_rows[grid](
            *args, 1, a_packed.stride(0), w_packed.stride(0), s_a.stride(0), wsum.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, GROUPED=False,
        )  # fmt: skip
    else:
        if group_size % 2 or (2 * kp) % group_size:
            raise ValueError(f"group_size={group_size} must be even and divide K={2 * kp}")
        _gemm_groups[grid](
            *args, 2 * kp // group_size, a_packed.stride(0), w_packed.stride(0), s_a.stride(0),
            wsum.stride(0), out.stride(0), HAS_BIAS=bias is not None, GROUPED=True, BKP=group_size // 2,
        )  # fmt: skip
    return out.to(out_dtype)
