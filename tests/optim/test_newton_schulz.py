"""Newton–Schulz: singular values land in the quintic's band, scale invariance, orientation and batching."""

import importlib

import pytest
import torch

from osp.optim import Muon, newton_schulz
from osp.optim.newton_schulz import MUON_COEFFICIENTS

# The module, not the function osp.optim re-exports under the same name.
newton_schulz_module = importlib.import_module("osp.optim.newton_schulz")


def _with_spectrum(m: int, n: int, s: torch.Tensor) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(m, len(s)))
    V, _ = torch.linalg.qr(torch.randn(n, len(s)))
    return U @ torch.diag(s) @ V.T


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 48)])
def test_singular_values_in_band(shape, dtype):
    # Condition number 10: a Gaussian square matrix has near-zero singular values that 5 steps
    # (slope 3.4445 at 0, so ×3.4445⁵ ≈ 490 at most) cannot lift, which is expected and harmless.
    s = torch.linspace(0.1, 1.0, min(shape))
    G = _with_spectrum(*shape, s)
    ortho = newton_schulz(G, dtype=dtype).float()
    sv = torch.linalg.svdvals(ortho)
    # 5 quintic steps put the singular values in roughly [0.5, 1.5] (Keller Jordan's Muon docstring).
    assert sv.min() > 0.5 and sv.max() < 1.5
    # The singular vectors stay G's: ortho ≈ U f(S) Vᵀ, so Uᵀ ortho V is nearly diagonal.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    core = U.mT @ ortho @ Vh.mT
    off = core - torch.diag_embed(torch.diagonal(core))
    assert off.abs().max() < 0.05


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gaussian_rectangular_in_band(dtype):
    sv = torch.linalg.svdvals(newton_schulz(torch.randn(48, 192), dtype=dtype).float())
    assert sv.min() > 0.5 and sv.max() < 1.5


def test_scaling_G_leaves_result_unchanged():
    G = torch.randn(32, 80)
    a = newton_schulz(G, dtype=torch.float32)
    b = newton_schulz(1e3 * G, dtype=torch.float32)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_transpose_equivariant_and_batched():
    G = torch.randn(3, 40, 24)
    batched = newton_schulz(G, dtype="fp32")
    assert batched.shape == G.shape and batched.dtype == torch.float32
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(G[i], dtype="fp32"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(newton_schulz(G[i].T, dtype="fp32"), batched[i].T, rtol=1e-5, atol=1e-5)


def test_bf16_matches_fp32_roughly():
    G = torch.randn(64, 128)
    low = newton_schulz(G, dtype="bf16")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), newton_schulz(G, dtype=torch.float32), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_the_device_computes_it_natively(native, monkeypatch):
    """The default: bf16 iterations where bf16 matmuls are native, fp32 where they would be emulated (~50x
    slower on an AVX2 CPU). Decided per device type, at each call."""
    asked = []
    monkeypatch.setattr(newton_schulz_module, "auto_dtype_name",
                        lambda device_type: asked.append(device_type) or ("bf16" if native else "fp32"))
    G = torch.randn(24, 40)
    out = newton_schulz(G)
    assert out.dtype == (torch.bfloat16 if native else torch.float32) and asked == ["cpu"]
    torch.testing.assert_close(out, newton_schulz(G, dtype="bf16" if native else "fp32"), rtol=0, atol=0)
    opt = Muon([torch.nn.Parameter(torch.randn(24, 40))])
    assert opt.param_groups[0]["ns_dtype"] == "auto"  # stays a name in checkpoints, decided per step


def test_per_iteration_coefficients():
    G = torch.randn(16, 32)
    same = newton_schulz(G, steps=3, coefficients=[MUON_COEFFICIENTS] * 3, dtype="fp32")
    torch.testing.assert_close(same, newton_schulz(G, steps=3, dtype="fp32"))
    # A plain cubic Newton–Schulz (1.5, -0.5, 0) converges to the exact polar factor.
    cubic = newton_schulz(G, steps=30, coefficients=[(1.5, -0.5, 0.0)] * 30, dtype="fp32")
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(cubic, U @ Vh, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="triples"):
        newton_schulz(G, steps=5, coefficients=[MUON_COEFFICIENTS] * 2)


def test_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(7))
