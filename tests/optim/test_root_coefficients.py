"""ROOT's per-shape Newton–Schulz coefficients: the exact singular-value measure, fits vs Muon's and the
official ones, official entries winning, the shipped table, run-time fits, and ROOT.step using them."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from osp.optim import ROOT, newton_schulz
from osp.optim.newton_schulz import MUON_COEFFICIENTS
from osp.optim.ns_fit import (
    EVAL_SEED,
    FITTED_COEFFICIENTS,
    MAX_EVALS,
    PROXY_MIN,
    ROOT_COEFFICIENTS,
    _load_fitted,
    fit_coefficients,
    is_stable,
    nearest_official,
    ns_coefficients,
    orthogonality_error,
    sample_singular_values,
)


def test_singular_value_measure_equals_matrix_newton_schulz():
    """The fit's shortcut (NS acts on singular values one by one) agrees with running NS in fp32."""
    G = torch.randn(64, 256, generator=torch.Generator().manual_seed(EVAL_SEED))
    s = sample_singular_values(64, 256, [EVAL_SEED])
    for abc in (MUON_COEFFICIENTS, ns_coefficients(64, 256)):
        X = newton_schulz(G, coefficients=abc, dtype=torch.float32).double()
        measured = (torch.linalg.svdvals(X) - 1).abs().mean().item()
        assert measured == pytest.approx(orthogonality_error(s, abc), abs=1e-4)


@pytest.mark.parametrize("shape", [(256, 256), (256, 1024)])
def test_fits_beat_muon_and_official_on_held_out_matrices(shape):
    """Scaled-down version of the 2048 reference check (the numbers at 2048 are in ns_fit's CLI output)."""
    s = sample_singular_values(*shape, [EVAL_SEED])
    muon = orthogonality_error(s, MUON_COEFFICIENTS)
    official = orthogonality_error(s, ROOT_COEFFICIENTS[nearest_official(*shape)])
    runtime_fit = fit_coefficients(*shape, max_evals=MAX_EVALS["runtime"], proxy_min=PROXY_MIN["runtime"])
    for abc in (ns_coefficients(*shape), runtime_fit):
        err = orthogonality_error(s, abc)
        assert err <= muon and err <= official, (abc, err, muon, official)


def test_official_entries_win_and_shipped_fits_cover_osp_shapes():
    for key, abc in ROOT_COEFFICIENTS.items():
        assert ns_coefficients(*key) == abc
        assert ns_coefficients(key[1], key[0]) == abc
    shipped = _load_fitted()
    # tiny model (d 256, ffn 768) and the 1.4B's SwiGLU (2048 x 5504) are precomputed
    for key in [(256, 256), (256, 768), (2048, 5504)]:
        assert key in shipped and ns_coefficients(key[1], key[0]) == shipped[key]
    assert not set(shipped) & set(ROOT_COEFFICIENTS)
    assert all(is_stable(abc) for abc in shipped.values())


def test_runtime_fit_is_deterministic_memoized_and_stable(monkeypatch):
    key = (12, 40)
    monkeypatch.delitem(FITTED_COEFFICIENTS, key, raising=False)
    first = ns_coefficients(40, 12)
    assert FITTED_COEFFICIENTS[key] == first and ns_coefficients(12, 40) is first
    assert fit_coefficients(*key, max_evals=MAX_EVALS["runtime"], proxy_min=PROXY_MIN["runtime"]) == first
    assert is_stable(first)
    monkeypatch.delitem(FITTED_COEFFICIENTS, key)


def test_large_shapes_fit_on_a_proxy_as_well_as_directly():
    direct = fit_coefficients(512, 2048, max_evals=MAX_EVALS["runtime"], proxy_min=None)
    proxy = fit_coefficients(512, 2048, max_evals=MAX_EVALS["runtime"], proxy_min=128)
    s = sample_singular_values(512, 2048, [EVAL_SEED])
    assert orthogonality_error(s, proxy) <= orthogonality_error(s, direct) + 0.01


def test_root_step_uses_ns_coefficients(monkeypatch):
    torch.manual_seed(0)
    W = nn.Parameter(torch.zeros(24, 12))
    g = torch.randn(24, 12)
    W.grad = g.clone()
    calls = []
    import osp.optim.root as root

    real = root.ns_coefficients
    monkeypatch.setattr(root, "ns_coefficients", lambda m, n: calls.append((m, n)) or real(m, n))
    ROOT([W], lr=1.0, weight_decay=0.0, ns_dtype="fp32").step()
    assert calls == [(12, 24)]
    u = 1.95 * g
    eps = torch.quantile(u.abs(), 0.9) + 1e-9
    ortho = newton_schulz(u.clamp(-eps, eps), coefficients=real(24, 12), dtype=torch.float32)
    torch.testing.assert_close(W.detach(), -0.2 * math.sqrt(24) * ortho, rtol=1e-5, atol=1e-6)


def test_fit_missing_false_is_the_official_code_muon_fallback():
    opt = ROOT([nn.Parameter(torch.zeros(2, 2))], fit_missing=False)
    assert opt._coefficients(torch.Size([2048, 8192])) == ROOT_COEFFICIENTS[(2048, 8192)]
    with pytest.warns(UserWarning, match=r"\(16, 32\)"):
        assert opt._coefficients(torch.Size([32, 16])) == MUON_COEFFICIENTS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (ROOT([nn.Parameter(torch.zeros(2, 2))])._coefficients(torch.Size([256, 768]))
                == ns_coefficients(256, 768))


def test_ns_fit_config_chooses_fitted_or_muon_coefficients_for_unlisted_shapes():
    from torch import nn

    from osp.optim import OptimConfig
    from osp.optim.root import ROOT

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(24, 40, bias=False)

        def parameter_roles(self):
            return {"proj.weight": "matrix"}

    fitted = OptimConfig.from_dict({"name": "root"}).build(Tiny())
    fallback = OptimConfig.from_dict({"name": "root", "ns_fit": "muon"}).build(Tiny())
    assert isinstance(fitted, ROOT) and fitted.fit_missing and not fallback.fit_missing
    with pytest.raises(ValueError, match="optim.ns_fit='exact' is not supported; allowed: fitted, muon"):
        OptimConfig.from_dict({"name": "root", "ns_fit": "exact"}).build(Tiny())
