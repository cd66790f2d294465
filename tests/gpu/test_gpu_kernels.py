"""The compiled Triton kernels on a CUDA device against their torch twins (run on the same device).

What the interpreter suite (tests/quant/test_kernels.py, tests/model/test_clipped_softmax.py) cannot cover:
GPU code generation (bf16/fp16 tensor-core dots, FMA contraction, register tiling), the autotuned GEMM
configs, and shapes that take too long to interpret (M = 4096).

Tolerances:
* quant_rows (codes, scales, zeros, fake-quant values): exact. The kernel is the twin's fp32 operation
  sequence (IEEE division `div_rn`, ties-to-even rounding, no multiply-add pairs to contract), so any
  difference is a bug.
* w4a4_gemm: the int32 accumulator is exact (checked with unit scales and zero offsets). The dequant
  epilogue `(acc - z_a * wsum) * s_a * s_w (+ bias)` is not bit-exact on a GPU: the compiler contracts
  `acc - z_a * wsum` (and `... * s_w + bias`) into fused multiply-adds, which skip one fp32 rounding of the
  product, so each element may differ by a few ulps of the *terms* (not of the result, which can cancel).
  The bound used, per element: 2^-22 (G + 2) times the sum of the terms' magnitudes (`_epilogue_magnitude`),
  i.e. about two fp32 roundings of the running sum per activation group (G groups) plus the two scale
  multiplies, each at most 2^-24 relative, with a factor 2 of margin.
* fwht: fp32 allclose (torch's default fp32 tolerances); the butterflies are the twin's additions.
* clipped attention: fp32 inputs take IEEE fp32 dots (no TF32): close to the fp32 twin up to summation
  order and the GPU's exp. bf16 inputs take tensor-core dots with bf16 operands (probabilities and dS are
  rounded to bf16 before their dots), compared with the fp32 twin of the same bf16 inputs at a tolerance
  relative to each output's largest magnitude. These bounds are estimates, not yet calibrated on a device.
"""

from __future__ import annotations

import pytest
import torch

from osp.model import clipped_softmax as cs
from osp.model.kernels import clipped_attention as attn_kernels
from osp.quant import ops
from osp.quant import quantizers as Q
from osp.quant.kernels import gemm as gemm_kernels
from tests.support.kernel_inputs import gemm_operands, outlier_input, qkv

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _same(got, want) -> None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device
        if not torch.equal(g, w):
            bad = (g != w).sum().item()
            raise AssertionError(f"{bad} of {g.numel()} elements differ "
                                 f"(dtype {g.dtype}, shape {tuple(g.shape)})")


# ---- quant_rows ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["packed", "fake"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "had"])
@pytest.mark.parametrize("group", [None, 128], ids=["rows", "g128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_rows_identical_to_twin(device, dtype, group, hadamard, bits, out):
    x = outlier_input(37, 256, dtype).to(device)
    zi = group is None
    got = ops.quant_rows(x, bits, False, group, 0.9, zi, hadamard, out, backend="triton")
    want = ops.quant_rows(x, bits, False, group, 0.9, zi, hadamard, out, backend="torch")
    _same(got, want)


@pytest.mark.parametrize(
    "m,k,group,hadamard,sym,bits,dtype",
    [
        (1, 4096, None, True, False, 4, torch.bfloat16),  # one row: BM = 2 (register budget), masked rows
        (4096, 128, None, False, False, 4, torch.float16),  # many rows per program
        (300, 1024, 128, True, False, 4, torch.bfloat16),  # groups after the fused FWHT, 8 warps
        (33, 512, None, True, True, 4, torch.float32),  # symmetric
        (33, 512, 128, False, True, 8, torch.bfloat16),  # symmetric, 8-bit, grouped
        (17, 384, 128, False, False, 4, torch.float32),  # K not a power of two: padded columns
    ],
)
def test_quant_rows_shapes_identical_to_twin(device, m, k, group, hadamard, sym, bits, dtype):
    x = outlier_input(m, k, dtype).to(device)
    for out in ("packed", "fake"):
        got = ops.quant_rows(x, bits, sym, group, 1.0, group is None, hadamard, out, backend="triton")
        want = ops.quant_rows(x, bits, sym, group, 1.0, group is None, hadamard, out, backend="torch")
        _same(got, want)


# ---- w4a4_gemm -----------------------------------------------------------------------------------------


def _operands(m: int, n: int, k: int, group: int | None, device: torch.device) -> dict:
    """The interpreter suite's operands (built on the CPU, deterministic), moved to the device."""
    _, codes, s_a, z_a, qw = gemm_operands(m, n, k, group)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
    return dict(a_packed=codes.to(device), s_a=s_a.to(device), z_a=z_a.to(device),
                w_packed=qw.packed().to(device), s_w=qw.scale.to(device),
                wsum=qw.group_sums(group).to(device), group_size=group, bias=bias.to(device))


def _epilogue_magnitude(args: dict) -> torch.Tensor:
    """sum_g (|acc_g| + |z_a,g * wsum_g|) * s_a,g * s_w + |bias|: the size of the terms whose products the
    GPU may fuse into multiply-adds (per output element)."""
    a, w = Q.unpack_int4(args["a_packed"]), Q.unpack_int4(args["w_packed"])
    group = args["group_size"] or a.shape[1]
    mag = torch.zeros(a.shape[0], w.shape[0], device=a.device, dtype=torch.float64)
    for g in range(a.shape[1] // group):
        cols = slice(g * group, (g + 1) * group)
        acc = Q.int_matmul(a[:, cols], w[:, cols]).double().abs()
        zw = (args["z_a"][:, g : g + 1].double() * args["wsum"][:, g].double()[None, :]).abs()
        mag += (acc + zw) * args["s_a"][:, g : g + 1].double()
    return mag * args["s_w"].reshape(1, -1).double() + args["bias"].double().abs()[None, :]


def _epilogue_bound(args: dict) -> torch.Tensor:
    groups = args["s_a"].shape[1]
    return 2.0**-22 * (groups + 2) * _epilogue_magnitude(args)


def _assert_epilogue_close(got: torch.Tensor, want: torch.Tensor, args: dict) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.double() - want.double()).abs()
    bound = _epilogue_bound(args)
    worst = (err / bound.clamp_min(1e-30)).max().item()
    exact = (err == 0).double().mean().item()
    assert bool((err <= bound).all()), f"epilogue error up to {worst:.2f}x the FMA bound ({exact:.1%} exact)"


GEMM_SHAPES = [(1, 768), (17, 2112), (4096, 768), (4096, 2112), (17, 768), (1, 2112)]


@pytest.mark.parametrize("group", [None, 128], ids=["rows", "g128"])
@pytest.mark.parametrize("m,n", GEMM_SHAPES)
def test_w4a4_gemm_matches_twin(device, m, n, group):
    """Autotuned (every config timed, the fastest kept per shape): M from 1 to 4096, N 768 and 2048 + 64."""
    args = _operands(m, n, 1024, group, device)
    got = ops.w4a4_gemm(**args, backend="triton")
    want = ops.w4a4_gemm(**args, backend="torch")
    _assert_epilogue_close(got, want, args)


@pytest.mark.parametrize("group", [None, 128], ids=["rows", "g128"])
def test_w4a4_gemm_every_autotune_config(device, monkeypatch, group):
    """Each config of the autotuner alone (a one-config Autotuner launches it without timing), at ragged
    M and N, so a config that the autotuner happens not to pick on this GPU is still checked."""
    tuner, configs = ((gemm_kernels._gemm_rows, gemm_kernels._ROW_CONFIGS) if group is None
                      else (gemm_kernels._gemm_groups, gemm_kernels._GROUP_CONFIGS))
    args = _operands(129, 2112, 768, group, device)  # K = 768: ragged K tiles for BKP = 128 (rows)
    want = ops.w4a4_gemm(**args, backend="torch")
    for config in configs:
        monkeypatch.setattr(tuner, "configs", [config])
        monkeypatch.setattr(tuner, "cache", {})
        got = ops.w4a4_gemm(**args, backend="triton")
        try:
            _assert_epilogue_close(got, want, args)
        except AssertionError as err:
            raise AssertionError(f"config {config}: {err}") from None


INT_CASES = [(m, n, k, g) for m, n, k in [(1, 768, 512), (4096, 2112, 1024), (45, 70, 320)]
             for g in (None, 64, 128) if g is None or k % g == 0]


@pytest.mark.parametrize("m,n,k,group", INT_CASES)
def test_w4a4_gemm_integer_accumulator_is_exact(device, m, n, k, group):
    """Unit scales and zero offsets: the output is the int32 accumulator itself (|acc| < 2^24), exactly."""
    g = torch.Generator().manual_seed(m + n + k)
    qa = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8).to(device)
    qw = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8).to(device)
    ng = 1 if group is None else k // group
    out = ops.w4a4_gemm(Q.pack_int4(qa), torch.ones(m, ng, device=device), torch.zeros(m, ng, device=device),
                        Q.pack_int4(qw), torch.ones(n, 1, device=device),
                        torch.zeros(n, ng, dtype=torch.int32, device=device), group, backend="triton")
    assert torch.equal(out.to(torch.int32), Q.int_matmul(qa, qw))


def test_w4a4_gemm_bf16_output(device):
    args = _operands(17, 2112, 1024, None, device)
    got = ops.w4a4_gemm(**args, out_dtype=torch.bfloat16, backend="triton")
    want = ops.w4a4_gemm(**args, backend="torch")  # fp32
    assert got.dtype == torch.bfloat16
    # one bf16 rounding (2^-9 relative) on top of the fp32 epilogue bound
    bound = 2.0**-8 * want.abs() + _epilogue_bound(args).float()
    assert bool(((got.float() - want).abs() <= bound).all())


# ---- fwht ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 512), (2, 5, 64), (130, 8), (4096, 128), (1, 8192)])
def test_fwht_matches_twin(device, shape, dtype):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(device, dtype)
    got, want = ops.fwht(x, backend="triton"), ops.fwht(x, backend="torch")
    assert got.dtype == dtype
    torch.testing.assert_close(got, want)  # dtype defaults: fp32 rtol 1.3e-6 / atol 1e-5


def test_hadamard_transform_non_power_of_two(device):
    x = torch.randn(64, 384, generator=torch.Generator().manual_seed(3)).to(device)
    torch.testing.assert_close(ops.hadamard_transform(x, backend="triton"),
                               ops.hadamard_transform(x, backend="torch"))


# ---- clipped attention ---------------------------------------------------------------------------------

ATTN_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # max error relative to the output's max |value|


def _close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == dtype
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= ATTN_TOL[dtype] * scale, f"{name}: max error {err:.3e} vs max |ref| {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b,h,hkv,t", [(2, 8, 2, 200), (1, 4, 4, 64), (1, 4, 1, 333)],
                         ids=["gqa", "mha", "mqa"])
def test_clipped_attention_matches_twin(device, dtype, d, b, h, hkv, t):
    """Causal forward and backward at the launch config the model uses; the twin runs in fp32 on the same
    (dtype-rounded) inputs. bf16 is the tensor-core path the interpreter cannot run."""
    gamma, zeta = -0.08, 1.03
    q, k, v = (x.detach().to(device, dtype) for x in qkv(b, h, hkv, t, d))
    out, lse = attn_kernels.forward(q, k, v, gamma, zeta)
    out_ref, lse_ref = cs.twin_forward(q.float(), k.float(), v.float(), gamma, zeta)
    _close("out", out, out_ref, dtype)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-4, atol=1e-4)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(t)).to(device, dtype)
    got = attn_kernels.backward(dout, q, k, v, lse, gamma, zeta)
    want = cs.twin_backward(dout.float(), q.float(), k.float(), v.float(), lse_ref, gamma, zeta)
    for name, mine, theirs in zip(("dq", "dk", "dv"), got, want, strict=True):
        _close(name, mine, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_clipped_attention_op_dispatches_to_the_kernel(device, dtype):
    """The op the model calls (`clipped_softmax.clipped_attention`) runs the Triton kernel on CUDA tensors:
    its forward and autograd backward equal the kernel's, bit for bit."""
    q, k, v = (x.detach().to(device, dtype).requires_grad_() for x in qkv(2, 4, 2, 96, 64))
    out = cs.clipped_attention(q, k, v, -0.05, 1.0)
    ref, lse = attn_kernels.forward(q.detach(), k.detach(), v.detach(), -0.05, 1.0)
    assert torch.equal(out, ref)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = attn_kernels.backward(dout, q.detach(), k.detach(), v.detach(), lse, -0.05, 1.0)
    for mine, theirs in zip(grads, expected, strict=True):
        assert torch.equal(mine, theirs)
