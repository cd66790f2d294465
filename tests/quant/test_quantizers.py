"""Torch reference quantizers: OSP semantics, rounding, weight MSE clip, int4 layout, integer GEMM twin."""

from __future__ import annotations

import pytest
import torch

from osp.quant import quantizers as Q


def test_rounding_is_ties_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, -2.5000002])
    scale, zero = torch.ones(1), torch.zeros(1)
    assert Q.quantize(x, scale, zero, 8).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, -3.0]


def test_asymmetric_per_token_matches_osp_formulas():
    # OSP's ActQuantizer: xmin = min(rowmin, 0) * clip, xmax = max(rowmax, 0) * clip, scale = (xmax-xmin)/15,
    # zero = round(-xmin/scale), q = clamp(round(x/scale) + zero, 0, 15), x_hat = scale * (q - zero).
    x = torch.tensor([[0.3, 1.2, 2.7, 0.9], [-3.0, -1.0, -0.2, -2.2], [0.0, 0.0, 0.0, 0.0]])
    got = Q.fake_quant(x, 4, clip=0.9)
    xmin = torch.minimum(x.min(1, keepdim=True).values, torch.zeros(3, 1)) * 0.9
    xmax = torch.maximum(x.max(1, keepdim=True).values, torch.zeros(3, 1)) * 0.9
    both_zero = (xmin == 0) & (xmax == 0)
    xmin[both_zero], xmax[both_zero] = -1.0, 1.0
    scale = (xmax - xmin) / 15
    zero = torch.round(-xmin / scale)
    want = scale * (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[0, 0] == 0.0 or xmin[0] == 0  # 0 is in range: first row's min is clamped to 0


def test_codes_and_zero_use_the_signed_frame():
    x = torch.randn(5, 16)
    codes, scale, zero = Q.quant_rows_torch(x, 4, out="packed")
    q = Q.unpack_int4(codes).float()
    assert q.min() >= -8 and q.max() <= 7
    torch.testing.assert_close(scale * (q - zero), Q.fake_quant(x, 4), rtol=0, atol=0)
    s8, z8 = Q.act_params(x, 8)
    unsigned_zero = torch.round(-torch.minimum(x.amin(1, keepdim=True), torch.zeros(5, 1)) / s8)
    torch.testing.assert_close(z8, unsigned_zero - 128)


def test_group_path_does_not_force_zero_and_handles_constant_groups():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]])
    scale, zero = Q.act_params(x.unflatten(-1, (2, 4)), 4, zero_inclusive=False)
    assert torch.isclose(scale[0, 0, 0], torch.tensor(3.0 / 15))  # range [1, 4], 0 not included
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()  # constant group 5,5,5,5
    got = Q.fake_quant(x, 4, group_size=4, zero_inclusive=False)
    torch.testing.assert_close(got[0, :4], x[0, :4], atol=1e-6, rtol=0)  # 1..4 lie exactly on the grid
    torch.testing.assert_close(got[0, 4:], x[0, 4:], atol=5.0 / 15, rtol=0)


def test_symmetric_activation_quantization():
    x = torch.tensor([[-2.0, 0.5, 1.0, 3.5]])
    scale, zero = Q.act_params(x, 4, sym=True)
    assert scale.item() == pytest.approx(3.5 / 7) and zero.item() == 0
    assert Q.quantize(x, scale, zero, 4).tolist() == [[-4.0, 1.0, 2.0, 7.0]]


def test_fp32_reference_vs_bf16_arithmetic_reference():
    # OSP's harness runs the same formulas in bf16 (x / scale rounded to 8 mantissa bits before rounding to
    # a code, and a bf16 zero point); fp32 (osp's choice) moves ~3% of the codes, and the two are
    # equally accurate.
    torch.manual_seed(0)
    x = (torch.randn(256, 512) * torch.linspace(0.2, 3.0, 512)).bfloat16()
    codes32 = Q.unpack_int4(Q.quant_rows_torch(x, 4)[0]).float()
    xb = x  # bf16 throughout, as OSP's ActQuantizer
    xmin = torch.minimum(xb.amin(1, keepdim=True), torch.zeros_like(xb[:, :1]))
    xmax = torch.maximum(xb.amax(1, keepdim=True), torch.zeros_like(xb[:, :1]))
    scale = (xmax - xmin) / 15
    zero = torch.round(-xmin / scale)
    codes16 = torch.clamp(torch.round(xb / scale) + zero, 0, 15).float() - 8
    mismatch = (codes32 != codes16).float().mean().item()
    assert mismatch < 0.05, mismatch
    err32 = (Q.fake_quant(x, 4).float() - x.float()).abs().mean()
    err16 = (scale * (codes16 + 8 - zero) - xb).float().abs().mean()
    assert abs(err32 / err16 - 1) < 0.05


def test_weight_scale_mse_sweep_matches_brute_force():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 0] = 9.0  # an outlier makes clipping worthwhile on row 0
    scale = Q.weight_scale(w, 4, mse=True)
    absmax = w.abs().amax(1).clamp(min=1e-5)
    for r in range(w.shape[0]):
        errs = []
        for i in range(80):
            s = (1 - i / 100) * absmax[r] / 7
            errs.append(((s * torch.clamp(torch.round(w[r] / s), -8, 7) - w[r]).abs() ** 2.4).sum())
        best = int(torch.argmin(torch.stack(errs)))
        assert scale[r, 0] == pytest.approx(((1 - best / 100) * absmax[r] / 7).item(), rel=1e-6)
    assert scale[0, 0] < absmax[0] / 7  # the outlier row was clipped
    torch.testing.assert_close(Q.weight_scale(w, 4, mse=False), (absmax / 7).unsqueeze(1))


def test_quantize_weight_codes_and_dequantize():
    w = torch.randn(8, 32)
    qw = Q.quantize_weight(w, 4)
    assert qw.codes.dtype == torch.int8 and qw.codes.min() >= -8 and qw.codes.max() <= 7
    assert qw.scale.shape == (8, 1)
    assert (qw.dequantize() - w).abs().max() <= qw.scale.max() * 4  # bounded by clipping + half a step
    assert torch.equal(qw.group_sums(16).sum(1, dtype=torch.int32), qw.codes.sum(1, dtype=torch.int32))


def test_pack_layout_even_low_odd_high():
    q = torch.tensor([[1, -2, 7, -8, 0, 3]], dtype=torch.int8)
    p = Q.pack_int4(q)
    assert p.dtype == torch.int8 and p.shape == (1, 3)
    assert [int(b) & 0xFF for b in p[0]] == [0xE1, 0x87, 0x30]
    assert torch.equal(Q.unpack_int4(p), q)
    every = torch.arange(-8, 8, dtype=torch.int8)
    grid = torch.cartesian_prod(every, every).to(torch.int8).reshape(1, -1)
    assert torch.equal(Q.unpack_int4(Q.pack_int4(grid)), grid)
    with pytest.raises(ValueError):
        Q.pack_int4(torch.zeros(1, 3, dtype=torch.int8))


@pytest.mark.parametrize("group", [None, 32])
def test_integer_gemm_twin_equals_dequantized_matmul(group):
    torch.manual_seed(0)
    a, w = torch.randn(9, 128), torch.randn(5, 128)
    codes, s_a, z_a = Q.quant_rows_torch(a, 4, group_size=group, zero_inclusive=group is None)
    qw = Q.quantize_weight(w, 4)
    out = Q.w4a4_gemm_torch(codes, s_a, z_a, qw.packed(), qw.scale, qw.group_sums(group), group,
                            bias=torch.ones(5))
    want = Q.fake_quant(a, 4, group_size=group, zero_inclusive=group is None) @ qw.dequantize().T + 1
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
