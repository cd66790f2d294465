"""Triton kernels in interpreter mode (TRITON_INTERPRET=1, set by tests/conftest.py) against torch twins.

Tolerances: integer outputs (codes, int32 accumulators) and everything derived by the same fp32 operation
sequence (scales, zeros, fake-quant values, FWHT, GEMM epilogue) are compared for exact equality. The GEMM
against the dequantized fp32 matmul is checked to 1e-5 relative to the output scale (fp32 accumulation
order only). On a GPU the epilogue may fuse multiply-adds; 1e-6 relative is the bound to expect there.
"""

from __future__ import annotations

import os

import pytest
import torch

from osp.quant import ops
from osp.quant import quantizers as Q
from tests.support.kernel_inputs import gemm_operands, outlier_input

pytestmark = pytest.mark.skipif(
    not ops.triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton in interpreter mode",
)


# (M, K, group, hadamard, sym, bits): odd row counts, non-power-of-two K, groups, fused FWHT, 8-bit.
CASES = [
    (37, 96, None, False, False, 4),
    (64, 256, 64, False, False, 4),
    (33, 128, None, True, False, 4),
    (20, 256, 32, True, True, 4),
    (5, 100, None, False, False, 4),
    (17, 384, 128, False, False, 4),
    (9, 64, None, False, True, 8),
    (3, 1024, None, True, False, 4),
]


@pytest.mark.parametrize("m,k,group,had,sym,bits", CASES)
def test_quant_rows_packed_is_identical_to_twin(m, k, group, had, sym, bits):
    x = outlier_input(m, k)
    zi = group is None
    got = ops.quant_rows(x, bits, sym, group, 1.0, zi, had, "packed", backend="triton")
    want = ops.quant_rows(x, bits, sym, group, 1.0, zi, had, "packed", backend="torch")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,group,had,sym,bits", CASES[:4])
def test_quant_rows_fake_is_identical_to_twin(m, k, group, had, sym, bits, dtype):
    x = outlier_input(m, k, dtype)
    got = ops.quant_rows(x, bits, sym, group, 0.9, group is None, had, "fake", backend="triton")
    want = ops.quant_rows(x, bits, sym, group, 0.9, group is None, had, "fake", backend="torch")
    assert got.dtype == dtype and torch.equal(got, want)


def test_quant_rows_keeps_leading_dims():
    x = torch.randn(2, 3, 5, 64)
    codes, scale, zero = ops.quant_rows(x, backend="triton")
    assert codes.shape == (2, 3, 5, 32) and scale.shape == (2, 3, 5, 1) and zero.shape == scale.shape


@pytest.mark.parametrize(
    "m,n,k,group", [(70, 50, 256, None), (33, 80, 512, 128), (16, 16, 130, None), (129, 65, 192, 64)]
)
def test_w4a4_gemm_matches_twin(m, n, k, group):
    a, codes, s_a, z_a, qw = gemm_operands(m, n, k, group)
    bias = torch.randn(n)
    args = (codes, s_a, z_a, qw.packed(), qw.scale, qw.group_sums(group), group, bias)
    got = ops.w4a4_gemm(*args, backend="triton")
    want = ops.w4a4_gemm(*args, backend="torch")
    assert torch.equal(got, want)
    deq = Q.fake_quant(a, 4, group_size=group, zero_inclusive=group is None) @ qw.dequantize().T + bias
    torch.testing.assert_close(got, deq, rtol=0, atol=1e-5 * deq.abs().max().item())


@pytest.mark.parametrize("group", [None, 64])
def test_w4a4_gemm_integer_accumulator_is_exact(group):
    # Unit scales and zero offsets expose the raw int32 accumulator (|acc| < 2^24, exact in fp32).
    m, n, k = 45, 70, 320
    g = torch.Generator().manual_seed(0)
    qa = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    ng = 1 if group is None else k // group
    ones_a, zeros_a = torch.ones(m, ng), torch.zeros(m, ng)
    wsum = torch.zeros(n, ng, dtype=torch.int32)
    out = ops.w4a4_gemm(
        Q.pack_int4(qa), ones_a, zeros_a, Q.pack_int4(qw), torch.ones(n, 1), wsum, group, backend="triton"
    )
    assert torch.equal(out.to(torch.int32), Q.int_matmul(qa, qw))


def test_w4a4_gemm_output_dtype_and_small_group_guard():
    _, codes, s_a, z_a, qw = gemm_operands(8, 8, 128, 32)
    args = (codes, s_a, z_a, qw.packed(), qw.scale, qw.group_sums(32), 32)
    with pytest.raises(ValueError, match="groups of 32"):
        ops.w4a4_gemm(*args, backend="triton")  # one 32-code group per tile cannot compile on a GPU
    _, codes, s_a, z_a, qw = gemm_operands(8, 8, 128, None)
    out = ops.w4a4_gemm(
        codes, s_a, z_a, qw.packed(), qw.scale, qw.group_sums(), out_dtype=torch.float16, backend="triton"
    )
    assert out.dtype == torch.float16


@pytest.mark.parametrize("shape", [(3, 512), (2, 5, 64), (130, 8)])
def test_fwht_kernel_identical_to_twin(shape):
    x = torch.randn(*shape)
    assert torch.equal(ops.fwht(x, backend="triton"), ops.fwht(x, backend="torch"))


def test_hadamard_transform_non_power_of_two_through_kernels():
    x = torch.randn(6, 384)
    torch.testing.assert_close(
        ops.hadamard_transform(x, backend="triton"),
        ops.hadamard_transform(x, backend="torch"),
        rtol=0,
        atol=1e-6,
    )


def test_backend_resolution(monkeypatch):
    x = torch.zeros(2, 4)
    assert ops.resolve_backend(x) == "torch"  # CPU tensor, auto
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    assert ops.resolve_backend(x) == "triton"
    assert ops.resolve_backend(x, "torch") == "torch"  # the argument wins
    with pytest.raises(ValueError, match="power of two"):
        ops.quant_rows(torch.zeros(2, 96), group_size=48)  # forced Triton refuses instead of falling back
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="not one of"):
        ops.resolve_backend(x)
    monkeypatch.delenv(ops.ENV_VAR)
    assert ops.quant_rows(torch.randn(2, 96), group_size=48, out="fake").shape == (2, 96)  # auto: torch twin
