"""Hadamard rotations: FWHT against Sylvester's matrix, Paley-based sizes, weight folding."""

from __future__ import annotations

import math

import pytest
import torch

from osp.quant import hadamard as H


def sylvester(n: int) -> torch.Tensor:
    m = torch.ones(1, 1, dtype=torch.float64)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return m


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128])
def test_fwht_is_normalized_sylvester_and_an_involution(n):
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(H.fwht_torch(x), x @ sylvester(n) / math.sqrt(n))
    torch.testing.assert_close(H.fwht_torch(H.fwht_torch(x)), x)


@pytest.mark.parametrize("n", [12, 20, 28, 36, 40, 60, 104, 108, 140, 24, 96, 384])
def test_hadamard_matrices_are_orthonormal_with_pm1_entries(n):
    m = H.hadamard_matrix(n)
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(m.abs() * math.sqrt(n), torch.ones(n, n, dtype=torch.float64))


def test_transform_matches_its_matrix_and_folds_into_a_weight():
    n = 96  # 12 * 8: Paley I of order 12 times an 8-point FWHT
    x, w = torch.randn(7, n, dtype=torch.float64), torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(H.hadamard_transform_torch(x), x @ H.hadamard_matrix(n))
    torch.testing.assert_close(H.hadamard_transform_torch(x) @ H.hadamard_transform_torch(w).T, x @ w.T)


def test_osp_1b_ffn_width_is_supported_and_norm_preserving():
    n = 5504  # OSP 1.4B: 43 * 128, Paley I with q = 5503 (checked on vectors: the n^3 product is slow)
    x = torch.randn(4, n, dtype=torch.float64)
    y = H.hadamard_transform_torch(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(y @ y.T, x @ x.T)


def test_unsupported_size_says_what_works():
    assert not H.has_hadamard(172)
    assert H.has_hadamard(172 * 32)  # 5504 = 43 * 128: Paley I with q = 5503
    with pytest.raises(ValueError, match="power-of-two"):
        H.hadamard_transform_torch(torch.zeros(2, 172))
    with pytest.raises(ValueError):
        H.fwht_torch(torch.zeros(2, 12))
